"""The DAS paper's adapter settings (arXiv 2508.10435, appendix B, Tables 10 and 11), as presets.

Each preset has ``adapter`` (keyword arguments of :func:`tnlayers.adapt`) and ``training`` (the paper's
grids: base-optimizer learning rates, DAS α, SAM ρ, and the rest of its schedule). The model names are
the paper's; nothing here downloads anything. Note the two α: the adapter's ``alpha`` (scale = α / r) and
DAS's ``alpha`` (its strength) are different numbers: ``preset["adapter"]["alpha"]`` is the adapter's,
``preset["training"]["das_alpha"]`` DAS's grid.

    >>> import torch, tnlayers
    >>> from tnlayers.adapters import PAPER_PRESETS
    >>> sorted(PAPER_PRESETS)
    ['flora', 'lora-opt', 'lora-roberta', 'loretta']
    >>> PAPER_PRESETS["flora"]["adapter"]
    {'format': 'tucker', 'rank': 8, 'alpha': 16, 'target_modules': ['query', 'value']}
    >>> PAPER_PRESETS["flora"]["training"]["das_alpha"]
    (0.1, 0.5, 0.7)
    >>> class Attention(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.query, self.key, self.value = (torch.nn.Linear(32, 32) for _ in range(3))
    >>> model = tnlayers.adapt(Attention(), **PAPER_PRESETS["flora"]["adapter"])
    >>> [name for name, _ in tnlayers.adapters.named_adapters(model)]
    ['query', 'value']
"""
from __future__ import annotations

__all__ = ["PAPER_PRESETS"]

PAPER_PRESETS = {
    # FLoRA on RoBERTa-large, GLUE few-shot (512 examples per class), Table 4 / Table 10:
    # ΔW = A G Bᵀ, A (O, r), G (r, r), B (I, r) on the query and value linears
    "flora": {
        "adapter": dict(format="tucker", rank=8, alpha=16, target_modules=["query", "value"]),
        "training": dict(model="roberta-large", base_optimizer="Adam", lr=(1e-4, 3e-4, 5e-4),
                         das_alpha=(0.1, 0.5, 0.7), sam_rho=(0.001, 0.01, 0.1), batch_size=16, steps=1000),
    },
    # LoRETTA on OPT-6.7B, SuperGLUE / SQuAD / DROP with 1000 training examples, Table 5 / Table 11:
    # TT over the 4096 x 4096 update with modes [4, 4, 16, 16 | 16, 16, 4, 4] (out | in), rank 16
    "loretta": {
        "adapter": dict(format="tt", rank=16, alpha=16, target_modules=["q_proj", "v_proj"],
                        shapes={"*": {"out_shape": (4, 4, 16, 16), "in_shape": (16, 16, 4, 4)}}),
        "training": dict(model="facebook/opt-6.7b", base_optimizer="Adam", lr=(1e-4, 3e-4, 5e-4),
                         betas=(0.9, 0.999), weight_decay=0.01, das_alpha=(0.5, 1.0, 2.0),
                         sam_rho=(0.05, 0.1, 0.2), epochs=3, batch_size={"COPA": 8, "WSC": 8, "BoolQ": 2, "other": 1}),
    },
    # the LoRA baselines of Tables 4 (RoBERTa-large, r = 8) and 5 (OPT-6.7B, r = 16)
    "lora-roberta": {
        "adapter": dict(format="lora", rank=8, alpha=16, target_modules=["query", "value"]),
        "training": dict(model="roberta-large", base_optimizer="Adam", lr=(1e-4, 3e-4, 5e-4), batch_size=16,
                         steps=1000),
    },
    "lora-opt": {
        "adapter": dict(format="lora", rank=16, alpha=16, target_modules=["q_proj", "v_proj"]),
        "training": dict(model="facebook/opt-6.7b", base_optimizer="Adam", lr=(1e-4, 3e-4, 5e-4),
                         weight_decay=0.01, epochs=3),
    },
}
