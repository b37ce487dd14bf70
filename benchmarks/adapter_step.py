"""Median training-step time of adapter fine-tuning with Adam, SAM and DAS, as ratios to Adam.

    python benchmarks/adapter_step.py --threads 1       # CPU, writes benchmarks/results/adapter_step_cpu.md
    python benchmarks/adapter_step.py --model roberta   # a random-config transformers RoBERTa (no download)
    python benchmarks/adapter_step.py --peft            # PEFT LoRA r=8 on tiny GPT-2 and RoBERTa: AdamW, DAS, SAM

A frozen transformer whose query/value projections carry adapters (FLoRA-style Tucker-2 rank 8,
LoRETTA-style TT rank 16, LoRA rank 8); a step is forward + backward + optimizer step (SAM: two passes).
Per adapter format, the methods are timed in interleaved rounds, so a background load affects them alike;
the median over all measured steps is reported. The optimizer-step column times ``step()`` alone, the
part DAS adds to. Targets (paper Table 6 on OPT-6.7B): DAS <= 1.05x Adam, SAM ~2x.

``--peft``: Hugging Face PEFT's own LoRA (r 8, alpha 16) on the attention of a tiny random-config GPT-2
(``c_attn``; causal-LM loss) and RoBERTa (query/key/value; classification), width 32, 2 layers, 2 heads, vocabulary
50 unless ``--dim``/``--depth``/``--heads`` say otherwise; AdamW vs DAS(AdamW) vs SAM(AdamW), DAS and SAM built on
the trainable parameters as they are (DAS finds the LoRA groups itself).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import FLAG_HELP, apply_flag  # noqa: E402
from _output import default_out  # noqa: E402
from step_time import machine_description, synchronize  # noqa: E402

from examples.finetune_adapters import Block  # noqa: E402  (the example's transformer block)

from tnlayers import DAS, SAM, core_groups  # noqa: E402
from tnlayers.adapters import adapt, named_adapters, trainable_parameters  # noqa: E402

# the paper's adapters (tnlayers.adapters.PAPER_PRESETS), TT modes split for a dim-wide model
ADAPTERS = {
    "tucker": lambda dim: dict(format="tucker", rank=8, alpha=16),
    "tt": lambda dim: dict(format="tt", rank=16, alpha=16, shapes={"*": loretta_shapes(dim)}),
    "lora": lambda dim: dict(format="lora", rank=8, alpha=16),
}
METHODS = ("Adam", "SAM", "DAS")


def loretta_shapes(dim: int) -> dict:
    """LoRETTA's split of 4096 is out (4, 4, 16, 16), in (16, 16, 4, 4); for other sizes: 4s, then the rest."""
    if dim == 4096:
        return {"out_shape": (4, 4, 16, 16), "in_shape": (16, 16, 4, 4)}
    if dim % 16:
        raise ValueError(f"--dim must be a multiple of 16 for the TT split, got {dim}")
    return {"out_shape": (4, 4, dim // 16), "in_shape": (dim // 16, 4, 4)}


class Classifier(nn.Module):
    """Token embeddings -> transformer blocks -> mean pool -> linear head."""

    def __init__(self, dim: int, depth: int, heads: int, vocab: int = 1000, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))).mean(1))


def build_model(args, device) -> nn.Module:
    if args.model == "roberta":
        import transformers

        config = transformers.RobertaConfig(vocab_size=1000, hidden_size=args.dim, num_hidden_layers=args.depth,
                                            num_attention_heads=args.heads, intermediate_size=4 * args.dim,
                                            max_position_embeddings=args.seq + 4, num_labels=2)
        return transformers.RobertaForSequenceClassification(config).to(device)
    return Classifier(args.dim, args.depth, args.heads).to(device)


def logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def make_optimizer(method: str, params):
    base = dict(lr=3e-4, weight_decay=0.01)  # Adam as in the paper's LoRETTA runs (Table 11)
    if method == "Adam":
        return torch.optim.Adam(params, **base)
    if method == "SAM":
        return SAM(params, torch.optim.Adam, rho=0.1, **base)
    return DAS(params, torch.optim.Adam, alpha=1.0, **base)  # backend "auto": torch on CPU, triton on CUDA


def timed_step(compute_loss, opt, device) -> tuple:
    """(whole step seconds, optimizer-step seconds) of one training step on ``compute_loss()`` (SAM: two passes)."""
    synchronize(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    compute_loss().backward()
    if isinstance(opt, SAM):
        opt.first_step()
        compute_loss().backward()
    synchronize(device)
    before_step = time.perf_counter()
    opt.step()
    synchronize(device)
    end = time.perf_counter()
    return end - start, end - before_step


def interleaved_times(steps: dict, args, device) -> dict:
    """Medians, spread and sample count of :func:`timed_step` for ``steps`` ({method: (optimizer, compute_loss)}):
    ``args.warmup`` steps each, then ``args.rounds`` interleaved rounds of ``args.steps`` steps per method."""
    for opt, compute_loss in steps.values():
        for _ in range(args.warmup):
            timed_step(compute_loss, opt, device)
    times = {m: ([], []) for m in steps}
    for _ in range(args.rounds):
        for method, (opt, compute_loss) in steps.items():
            for _ in range(args.steps):
                whole, step = timed_step(compute_loss, opt, device)
                times[method][0].append(whole)
                times[method][1].append(step)
    return dict(medians={m: (statistics.median(w), statistics.median(s)) for m, (w, s) in times.items()},
                spread={m: (min(w), max(w)) for m, (w, _) in times.items()},
                samples=len(next(iter(times.values()))[0]))


def run_format(args, fmt: str, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (args.batch, args.seq), generator=gen).to(device)
    y = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    setups = {}
    for method in METHODS:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TT's first and last bonds exceed 4 on 4-sized modes: a one-time note
            model = adapt(build_model(args, device), target_modules=["query", "value"], **ADAPTERS[fmt](args.dim))
        model.train()
        setups[method] = (model, make_optimizer(method, [p for p in model.parameters() if p.requires_grad]))
    timed = interleaved_times({m: (opt, lambda model=model: F.cross_entropy(logits(model, ids), y))
                               for m, (model, opt) in setups.items()}, args, device)
    model = setups["Adam"][0]
    counts = trainable_parameters(model)
    return dict(timed, adapters=len(named_adapters(model)), trainable=counts.trainable, total=counts.total)


def _preamble(args, machine: str, title: str, methods: str, setting: list) -> list:
    """The lines above a results table: title, machine, command, the setting, the sample."""
    return [f"# {title} on {args.device.upper()}: {methods}", "", f"- Machine: {machine}",
            f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`", *setting,
            f"- Median over {args.rounds * args.steps} steps per method ({args.rounds} interleaved rounds of "
            f"{args.steps}, after {args.warmup} warm-up steps)", ""]


def _timings(result: dict, baseline: str) -> list:
    """Per method, the table cells from the method on: median, min, max (ms), x ``baseline``, optimizer step."""
    base = result["medians"][baseline][0]
    rows = []
    for method, (whole, step) in result["medians"].items():
        low, high = result["spread"][method]
        rows.append(f"{method} | {whole * 1e3:.2f} | {low * 1e3:.2f} | {high * 1e3:.2f} | {whole / base:.3f} | "
                    f"{step * 1e3:.3f} |")
    return rows


def report(args, results: dict, machine: str) -> str:
    model = ("transformers RobertaForSequenceClassification (random config)" if args.model == "roberta"
             else "pre-norm transformer classifier (nn.Linear query/key/value/out, 4x MLP)")
    lines = _preamble(args, machine, "Adapter training-step time", "Adam vs SAM vs DAS", [
        f"- Model: {model}, width {args.dim}, {args.depth} blocks, {args.heads} heads; batch {args.batch} x "
        f"{args.seq} tokens; base frozen, adapters on query and value (alpha 16)",
        "- Optimizers: Adam(lr 3e-4, weight decay 0.01); SAM rho 0.1 and DAS alpha 1.0 around it (DAS backend auto)"])
    lines += ["| adapter | trainable / total params | method | training step median (ms) | min | max | x Adam | "
              "optimizer step (ms) |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for fmt, result in results.items():
        lines += [f"| {fmt} | {result['trainable']:,} / {result['total']:,} | {cells}"
                  for cells in _timings(result, "Adam")]
    lines += ["", "Targets (the paper's Table 6, LoRETTA on OPT-6.7B: SAM 2x, DAS 1.04x): DAS <= 1.05x "
              "Adam, SAM about 2x per training step. SAM's optimizer-step column is its second_step; its first_step "
              "sits in the whole step."]
    return "\n".join(lines) + "\n"


PEFT_METHODS = ("AdamW", "DAS", "SAM")


def build_peft_model(name: str, args, device) -> nn.Module:
    """A tiny random-config GPT-2 or RoBERTa (nothing downloaded) with PEFT LoRA r=8 on its attention."""
    import peft
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=args.depth, n_embd=args.dim, n_head=args.heads, vocab_size=args.vocab,
                                         n_positions=args.seq, bos_token_id=0, eos_token_id=1)
        model, targets = transformers.GPT2LMHeadModel(config), ["c_attn"]
    else:
        config = transformers.RobertaConfig(vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=args.depth,
                                            num_attention_heads=args.heads, intermediate_size=4 * args.dim,
                                            max_position_embeddings=args.seq + 4, pad_token_id=1, bos_token_id=0,
                                            eos_token_id=2, num_labels=2)
        model, targets = transformers.RobertaForSequenceClassification(config), ["query", "key", "value"]
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, fan_in_fan_out=name == "gpt2")
    return peft.get_peft_model(model, lora).to(device)


def make_peft_optimizer(method: str, params):
    base = dict(lr=3e-4, weight_decay=0.01)
    if method == "AdamW":
        return torch.optim.AdamW(params, **base)
    if method == "SAM":
        return SAM(params, torch.optim.AdamW, rho=0.1, **base)
    return DAS(params, torch.optim.AdamW, alpha=1.0, **base)


def run_peft(args, name: str, device) -> dict:
    import peft

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    y = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    setups = {}
    for method in PEFT_METHODS:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on random configs
            model = build_peft_model(name, args, device)
        model.train()
        opt = make_peft_optimizer(method, [p for p in model.parameters() if p.requires_grad])
        labels = ids if name == "gpt2" else y
        setups[method] = (model, opt, lambda model=model, labels=labels: model(input_ids=ids, labels=labels).loss)
    timed = interleaved_times({m: (opt, compute_loss) for m, (_, opt, compute_loss) in setups.items()}, args, device)
    model, das = setups["DAS"][0], setups["DAS"][1]
    wrapped = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    rescaled = 0 if das.last_lambdas is None else len(das.last_lambdas[0])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(timed, lora_layers=wrapped, core_groups=len(core_groups(model)), cores_rescaled_by_das=rescaled,
                trainable=trainable, total=sum(p.numel() for p in model.parameters()))


def peft_report(args, results: dict, machine: str) -> str:
    lines = _preamble(args, machine, "PEFT LoRA training-step time", "AdamW vs DAS(AdamW) vs SAM(AdamW)", [
        f"- Models: random-config transformers GPT2LMHeadModel (causal-LM loss, LoRA on c_attn) and "
        f"RobertaForSequenceClassification (LoRA on query/key/value), width {args.dim}, {args.depth} layers, "
        f"{args.heads} heads, vocabulary {args.vocab}; batch {args.batch} x {args.seq} tokens; peft LoRA r 8, "
        "alpha 16, base frozen, train mode",
        "- Optimizers: AdamW(lr 3e-4, weight decay 0.01); DAS alpha 1.0 (backend auto) and SAM rho 0.1 around it, "
        "each built on the trainable parameters (DAS marks the LoRA groups itself)"])
    lines += ["| model | LoRA layers / core groups / cores DAS rescales | trainable / total params | method | "
              "training step median (ms) | min | max | x AdamW | optimizer step (ms) |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        groups = f"{result['lora_layers']} / {result['core_groups']} / {result['cores_rescaled_by_das']}"
        lines += [f"| {name} | {groups} | {result['trainable']:,} / {result['total']:,} | {cells}"
                  for cells in _timings(result, "AdamW")]
    lines += ["", "Targets: DAS <= 1.05x AdamW, SAM about 2x per training step. SAM's optimizer-step column "
              "is its second_step; its first_step sits in the whole step."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="transformer", choices=["transformer", "roberta"])
    parser.add_argument("--formats", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--peft", action="store_true",
                        help="PEFT LoRA r=8 on tiny random-config GPT-2 and RoBERTa: AdamW vs DAS vs SAM")
    parser.add_argument("--peft-models", nargs="+", default=["gpt2", "roberta"], choices=["gpt2", "roberta"])
    parser.add_argument("--dim", type=int, default=None, help="width (default 256; --peft: 32)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default 4; --peft: 2)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 4; --peft: 2)")
    parser.add_argument("--vocab", type=int, default=50, help="--peft: vocabulary size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1: steadier on a shared CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2, help="steps per method per round")
    parser.add_argument("--keep-freed-memory", action="store_true", help=FLAG_HELP)
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/adapter_step_<device>.md, git-ignored; "
                        "name a committed table to update it)")
    args = parser.parse_args(argv)
    for key, default, tiny in (("dim", 256, 32), ("depth", 4, 2), ("heads", 4, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.peft else default)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_flag(args)
    device = torch.device(args.device)
    if args.peft:
        return main_peft(args, device)
    results = {}
    for fmt in args.formats:
        results[fmt] = run_format(args, fmt, device)
        print(f"{fmt}: " + ", ".join(f"{m} {w * 1e3:.1f} ms" for m, (w, _) in results[fmt]["medians"].items()),
              flush=True)
    machine = machine_description(device)
    write(report(args, results, machine), args, results, machine, f"adapter_step_{device.type}.md")


def write(text: str, args, results: dict, machine: str, default_name: str) -> None:
    """Print the table and write it (+ a .json of the raw results) to --out or the git-ignored default."""
    print(text)
    out = Path(args.out) if args.out else default_out(default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(command=sys.argv, machine=machine, settings=vars(args),
                                                        results=results), indent=2))
    print(f"written to {out} and {out.with_suffix('.json')}")


def main_peft(args, device) -> None:
    results = {}
    for name in args.peft_models:
        results[name] = run_peft(args, name, device)
        print(f"{name}: " + ", ".join(f"{m} {w * 1e3:.2f} ms" for m, (w, _) in results[name]["medians"].items()),
              flush=True)
    machine = machine_description(device)
    write(peft_report(args, results, machine), args, results, machine, f"adapter_step_{device.type}_peft.md")


if __name__ == "__main__":
    main()
