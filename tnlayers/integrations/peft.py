"""Hugging Face PEFT adapters as core groups: which factors of a PEFT tuner layer are one scale-invariant set.

Used by :func:`tnlayers.core_groups` (and so by DAS, BAR, SAM, ``NormDynamics`` and ``norm_report``) only when
the user has imported peft: this module never imports peft itself, it finds PEFT's layer classes in
``sys.modules``. Per tuner layer and per adapter name, the group is:

- **LoRA** (``peft.tuners.lora``: Linear, Conv1d/2d/3d, Embedding, MultiheadAttention, the quantized and
  tensor-parallel Linears, and DoRA): ΔW = s·B A is bilinear in (A, B), so (A, B) → (cA, B/c) leaves every
  output unchanged. Group ``[A, B]``: ``lora_A[name].weight``, ``lora_B[name].weight`` (Embedding:
  ``lora_embedding_A[name]``, ``lora_embedding_B[name]``, ParameterDicts). Not in it: ``lora_B``'s bias
  (``lora_bias=True``; B A x + b, and b is not scaled with B) and DoRA's magnitude vector m (W' = m ⊙
  (W + sBA)/‖W + sBA‖ depends on A, B only through BA, so the pair stays invariant; m is a single factor).
  Left out entirely: the other LoRA variants (aLoRA, QA-LoRA, Arrow, BD-LoRA, VeLoRA, MonteCLoRA, MiCA, KaSA:
  extra factors, stochastic or approximated gradients, not checked here) and AdaLoRA (a LoRA subclass whose
  orthogonality regularizer on A and B is not scale-invariant).
- **LoHa** (ΔW = s·(W1a W1b) ⊙ (W2a W2b)): each entry is a product of one entry of W1a W1b and one of
  W2a W2b, so ΔW is linear in each of the four factors separately. Scaling them by c1..c4 multiplies ΔW by
  c1·c2·c3·c4: any rescaling with product 1 leaves it unchanged, within a product (W1a → cW1a, W1b → W1b/c)
  and across the Hadamard product ((W1a W1b) → c(W1a W1b), (W2a W2b) → (W2a W2b)/c) alike. Group
  ``[hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b]``; with ``use_effective_conv2d`` each product is a Tucker
  rebuild t ×1 Wa ×2 Wb, linear in t too, and the group has six factors (+ ``hada_t1``, ``hada_t2``).
- **LoKr** (ΔW = s·W1 ⊗ W2): the Kronecker product is bilinear ((cW1) ⊗ (W2/c) = W1 ⊗ W2), and each side
  is one full matrix or a product of factors (W1 = W1a W1b; W2 = W2a W2b, or the Tucker rebuild of
  ``lokr_t2``, ``lokr_w2_a``, ``lokr_w2_b``), so ΔW is multilinear in every factor present: the group is all
  of them (2 to 5 factors).

Every factor of a group is a leaf parameter that enters ΔW exactly once, so Euler's identity
⟨G_k, ∂L/∂G_k⟩ = ⟨ΔW, ∂L/∂ΔW⟩ holds for each, the property DAS, BAR and the norm-deviation theory use
(docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov'). Nothing else of a PEFT model is a group (IA3, VeRA,
OFT, prompt tuning, the ``modules_to_save`` copies, biases, LayerNorms).

Markers: the optimizers find groups by markers on the parameters (:mod:`tnlayers.groups`). ``core_groups(model)``
sets them; DAS and BAR, built on parameters of which some are unmarked while peft is imported, look the PEFT
layers up among the live objects (:func:`live_tuner_layers`, one scan of the garbage collector's objects) and mark
the groups holding those parameters, so ``DAS(model.parameters(), torch.optim.AdamW, ...)`` works on a PEFT
model without a prior ``core_groups`` call.
"""
from __future__ import annotations

import gc
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["loaded", "loaded_class", "adapter_groups", "live_tuner_layers"]

# LoHa's factor sets: (w1a, w1b, w2a, w2b) or, with use_effective_conv2d, the same plus the two Tucker cores
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOHA_SETS = (frozenset(LOHA_FACTORS[:4]), frozenset(LOHA_FACTORS))
# LoKr: W1 full or W1a W1b; W2 full, W2a W2b, or the Tucker rebuild of (t2, w2a, w2b)
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOKR_SETS = tuple(frozenset(one | two) for one in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
                  for two in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_t2", "lokr_w2_a", "lokr_w2_b"}))
# where PEFT's LoRA, LoHa and LoKr layer base classes live
TUNER_CLASSES = (("peft.tuners.lora.layer", "LoraLayer"), ("peft.tuners.loha.layer", "LoHaLayer"),
                 ("peft.tuners.lokr.layer", "LoKrLayer"))
# the LoRA variants whose factors stay the scale-invariant pair (A, B): DoRA (Linear, Embedding, ConvNd)
DORA_VARIANTS = ("DoraLinearVariant", "_DoraConvNdVariant")


def loaded() -> bool:
    """Whether the user has imported peft (this module never does)."""
    return "peft" in sys.modules


def loaded_class(module: str, name: str) -> Optional[type]:
    """``module.name`` if the user's imports have loaded that module, else None (never imports it).

        >>> loaded_class("no.such.module", "Thing") is None
        True
    """
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _tuner_classes() -> Tuple[type, ...]:
    """PEFT's LoRA, LoHa and LoKr layer base classes, as far as peft has loaded them."""
    return tuple(c for c in (loaded_class(*where) for where in TUNER_CLASSES) if c is not None)


def _parameter(value) -> Optional[nn.Parameter]:
    return value if isinstance(value, nn.Parameter) else None


def _group(factors: Sequence[Optional[torch.Tensor]]) -> Optional[List[nn.Parameter]]:
    """The factors as a group: all present, distinct parameters, at least two; else None."""
    if any(f is None for f in factors) or len({id(f) for f in factors}) != len(factors) or len(factors) < 2:
        return None
    return list(factors)


def _lora_variant_ok(module: nn.Module, adapter: str) -> bool:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is None:
        return True
    dora = tuple(c for c in (loaded_class("peft.tuners.lora.variants", n) for n in DORA_VARIANTS) if c is not None)
    return bool(dora) and isinstance(variant, dora)


def _lora_groups(module: nn.Module) -> List[Tuple[str, List[nn.Parameter]]]:
    adalora = loaded_class("peft.tuners.adalora.layer", "AdaLoraLayer")
    if adalora is not None and isinstance(module, adalora):
        return []
    out = []
    pairs = (("lora_A", "lora_B", lambda m: _parameter(getattr(m, "weight", None))),
             ("lora_embedding_A", "lora_embedding_B", _parameter))
    for name_a, name_b, factor in pairs:
        first, second = getattr(module, name_a, None), getattr(module, name_b, None)
        if first is None or second is None:
            continue
        for adapter in first.keys():
            if adapter in second.keys() and _lora_variant_ok(module, adapter):
                group = _group([factor(first[adapter]), factor(second[adapter])])
                if group is not None:
                    out.append((adapter, group))
    return out


def _factor_groups(module: nn.Module, factors: Sequence[str], valid: Sequence[frozenset],
                   first: str, alternative: str) -> List[Tuple[str, List[nn.Parameter]]]:
    """LoHa/LoKr: per adapter, the factors present, when they form one of the ``valid`` sets."""
    dicts = {f: getattr(module, f, None) for f in factors}
    if any(d is None for d in dicts.values()):
        return []
    adapters = dict.fromkeys([*dicts[first].keys(), *dicts[alternative].keys()])
    out = []
    for adapter in adapters:
        present = [f for f in factors if adapter in dicts[f].keys()]
        if frozenset(present) in valid:
            group = _group([_parameter(dicts[f][adapter]) for f in present])
            if group is not None:
                out.append((adapter, group))
    return out


def adapter_groups(module: nn.Module) -> List[Tuple[str, List[nn.Parameter]]]:
    """``[(adapter_name, [factor, ...]), ...]``: the scale-invariant groups of one PEFT tuner layer, in the order
    the layer holds its adapters; ``[]`` for any other module, or when peft is not imported."""
    if not loaded():
        return []
    lora, loha, lokr = (loaded_class(*where) for where in TUNER_CLASSES)
    if lora is not None and isinstance(module, lora):
        return _lora_groups(module)
    if loha is not None and isinstance(module, loha):
        return _factor_groups(module, LOHA_FACTORS, LOHA_SETS, "hada_w1_a", "hada_w1_a")
    if lokr is not None and isinstance(module, lokr):
        return _factor_groups(module, LOKR_FACTORS, LOKR_SETS, "lokr_w1", "lokr_w1_a")
    return []


def live_tuner_layers() -> List[nn.Module]:
    """Every live PEFT LoRA/LoHa/LoKr layer of this process (one pass over the garbage collector's objects,
    ~50 ms with transformers and peft loaded); ``[]`` when peft is not imported."""
    kinds = _tuner_classes() if loaded() else ()
    if not kinds:
        return []
    found = []
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance: no object's __class__ property is run
        if issubclass(kind, nn.Module) and issubclass(kind, kinds):
            found.append(obj)
    return found
