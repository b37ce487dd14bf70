"""Median training-step time of adapter fine-tuning with Adam, SAM and DAS, as ratios to Adam.

    python benchmarks/adapter_step.py --threads 1       # CPU, writes benchmarks/results/adapter_step_cpu.md
    python benchmarks/adapter_step.py --model roberta   # a random-config transformers RoBERTa (no download)

A frozen transformer whose query/value projections carry adapters (FLoRA-style Tucker-2 rank 8,
LoRETTA-style TT rank 16, LoRA rank 8); a step is forward + backward + optimizer step (SAM: two passes).
Per adapter format, the methods are timed in interleaved rounds, so a background load affects them alike;
the median over all measured steps is reported. The optimizer-step column times ``step()`` alone, the
part DAS adds to. Targets (paper Table 6 on OPT-6.7B): DAS <= 1.05x Adam, SAM ~2x.
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

from tnlayers import DAS, SAM  # noqa: E402
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


def training_step(model, opt, ids, y, device) -> tuple:
    """(whole step seconds, optimizer-step seconds)."""
    synchronize(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(logits(model, ids), y).backward()
    if isinstance(opt, SAM):
        opt.first_step()
        F.cross_entropy(logits(model, ids), y).backward()
    synchronize(device)
    before_step = time.perf_counter()
    opt.step()
    synchronize(device)
    end = time.perf_counter()
    return end - start, end - before_step


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
    for model, opt in setups.values():
        for _ in range(args.warmup):
            training_step(model, opt, ids, y, device)
    times = {m: ([], []) for m in METHODS}
    for _ in range(args.rounds):
        for method, (model, opt) in setups.items():
            for _ in range(args.steps):
                whole, step = training_step(model, opt, ids, y, device)
                times[method][0].append(whole)
                times[method][1].append(step)
    model = setups["Adam"][0]
    counts = trainable_parameters(model)
    return dict(medians={m: (statistics.median(w), statistics.median(s)) for m, (w, s) in times.items()},
                spread={m: (min(w), max(w)) for m, (w, _) in times.items()}, adapters=len(named_adapters(model)),
                trainable=counts.trainable, total=counts.total, samples=len(times["Adam"][0]))


def report(args, results: dict, machine: str) -> str:
    model = ("transformers RobertaForSequenceClassification (random config)" if args.model == "roberta"
             else "pre-norm transformer classifier (nn.Linear query/key/value/out, 4x MLP)")
    lines = [
        f"# Adapter training-step time on {args.device.upper()}: Adam vs SAM vs DAS", "",
        f"- Machine: {machine}",
        f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
        f"- Model: {model}, width {args.dim}, {args.depth} blocks, {args.heads} heads; batch {args.batch} x "
        f"{args.seq} tokens; base frozen, adapters on query and value (alpha 16)",
        "- Optimizers: Adam(lr 3e-4, weight decay 0.01); SAM rho 0.1 and DAS alpha 1.0 around it (DAS backend auto)",
        f"- Median over {args.rounds * args.steps} steps per method ({args.rounds} interleaved rounds of {args.steps}, "
        f"after {args.warmup} warm-up steps)", "",
        "| adapter | trainable / total params | method | training step median (ms) | min | max | x Adam | "
        "optimizer step (ms) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for fmt, result in results.items():
        adam = result["medians"]["Adam"][0]
        for method, (whole, step) in result["medians"].items():
            low, high = result["spread"][method]
            lines.append(f"| {fmt} | {result['trainable']:,} / {result['total']:,} | {method} | {whole * 1e3:.2f} | "
                         f"{low * 1e3:.2f} | {high * 1e3:.2f} | {whole / adam:.3f} | {step * 1e3:.3f} |")
    lines += ["", "Targets (the paper's Table 6, LoRETTA on OPT-6.7B: SAM 2x, DAS 1.04x): DAS <= 1.05x "
              "Adam, SAM about 2x per training step. SAM's optimizer-step column is its second_step; its first_step "
              "sits in the whole step."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="transformer", choices=["transformer", "roberta"])
    parser.add_argument("--formats", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_flag(args)
    device = torch.device(args.device)
    results = {}
    for fmt in args.formats:
        results[fmt] = run_format(args, fmt, device)
        print(f"{fmt}: " + ", ".join(f"{m} {w * 1e3:.1f} ms" for m, (w, _) in results[fmt]["medians"].items()),
              flush=True)
    machine = machine_description(device)
    text = report(args, results, machine)
    print(text)
    out = Path(args.out) if args.out else default_out(f"adapter_step_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(command=sys.argv, machine=machine, settings=vars(args),
                                                        results=results), indent=2))
    print(f"written to {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
