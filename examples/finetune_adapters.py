"""Tensorized adapter fine-tuning with Adam, SAM and DAS, on a task that needs no download.

    python examples/finetune_adapters.py            # ~10 min on one CPU core; writes examples/results/local/*
    python examples/finetune_adapters.py --quick    # seconds: a smoke run

The DAS paper fine-tunes RoBERTa-large with FLoRA (Tucker-2 ΔW = A·G·Bᵀ, rank 8) and OPT-6.7B with LoRETTA
(TT ΔW, rank 16) on the query and value projections (appendix B, Tables 4-6). Here, at laptop scale:

1. pretrain a small transformer on scikit-learn's digits (8x8 images read as 8 tokens of 8 pixels);
2. shift the task: the same digits rotated by 90 degrees (the pretrained model is at chance there);
3. freeze it and adapt its query/value projections with FLoRA-, LoRETTA- and LoRA-style adapters, from a
   few-shot training set (20 images per class), with Adam, SAM and DAS around Adam.

SAM's ρ and DAS's α are picked on a validation split from the paper's FLoRA grids (Table 10); Adam's lr once,
for all formats, from {1e-3, 3e-3, 1e-2} on the same split (3e-3). Test accuracy is the mean over seeds.
Step times are medians of whole training steps (forward, backward, step; SAM's two passes) at the chosen
ρ/α, the methods timed in interleaved rounds; ``benchmarks/adapter_step.py`` times a larger model.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tnlayers import DAS, SAM  # noqa: E402
from tnlayers.adapters import PAPER_PRESETS, adapt, trainable_parameters  # noqa: E402
from tnlayers.optim import training_step  # noqa: E402

# The paper's settings (tnlayers.adapters.PAPER_PRESETS) scaled to a 64-wide model: the formats, the
# adapter α = 16 and the query/value targets are the paper's; LoRETTA's rank 16 on 4096 = 4·4·16·16 becomes
# rank 8 on 64 = 4·4·4 (rank 16 exceeds what TT bonds of a 64 x 64 matrix can use).
PRESETS = {
    "FLoRA (tucker)": dict(PAPER_PRESETS["flora"]["adapter"]),
    "LoRETTA (tt)": dict(PAPER_PRESETS["loretta"]["adapter"], rank=8, target_modules=["query", "value"],
                         shapes={"*": {"out_shape": (4, 4, 4), "in_shape": (4, 4, 4)}}),
    "LoRA": dict(PAPER_PRESETS["lora-roberta"]["adapter"]),
    "CP": dict(format="cp", rank=8, alpha=16, target_modules=["query", "value"]),
}
ADAM_LR = 3e-3
GRIDS = {"Adam": [None], "SAM": list(PAPER_PRESETS["flora"]["training"]["sam_rho"]),
         "DAS": list(PAPER_PRESETS["flora"]["training"]["das_alpha"])}


class Block(nn.Module):
    """Pre-norm transformer block; its projections are plain nn.Linear named as in RoBERTa (query, value)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)))
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitTransformer(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(8, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 8 rows, 8 pixels)
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))


def load_tasks(shots: int = 20, val: int = 300, seed: int = 0) -> dict:
    """Source task: digits (1200 to pretrain on, the rest to test). Target task: the same images rotated
    90 degrees; ``shots`` per class to fine-tune on, ``val`` images to choose ρ/α, the rest to test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    few = torch.cat([perm[y[perm] == c][:shots] for c in range(10)])
    chosen = set(few.tolist())
    rest = torch.tensor([i for i in perm.tolist() if i not in chosen])
    rotated = torch.rot90(x, 1, (1, 2))
    return dict(source_train=(x[perm[:1200]], y[perm[:1200]]), source_test=(x[perm[1200:]], y[perm[1200:]]),
                train=(rotated[few], y[few]), val=(rotated[rest[:val]], y[rest[:val]]),
                test=(rotated[rest[val:]], y[rest[val:]]))


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def pretrain(tasks: dict, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = tasks["source_train"]
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(32):
            training_step(model, opt, lambda: F.cross_entropy(model(x[idx]), y[idx]))
    return model


def make_optimizer(method: str, params, value):
    if method == "Adam":
        return torch.optim.Adam(params, lr=ADAM_LR)
    if method == "SAM":
        return SAM(params, torch.optim.Adam, rho=value, lr=ADAM_LR)
    return DAS(params, torch.optim.Adam, alpha=value, lr=ADAM_LR)


def adapted(pretrained: nn.Module, preset: dict, method: str, value):
    """A copy of the pretrained model with adapters, and its optimizer over the adapter cores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoRETTA's first/last TT bonds exceed 4 on 4-sized modes: one-time note
        model = adapt(copy.deepcopy(pretrained), **preset)
    return model, make_optimizer(method, [p for p in model.parameters() if p.requires_grad], value)


def step(model, opt, x, y) -> None:
    model.train()
    training_step(model, opt, lambda: F.cross_entropy(model(x), y))


def finetune(pretrained: nn.Module, preset: dict, method: str, value, tasks: dict, epochs: int, seed: int) -> dict:
    """Adapt a copy of the pretrained model and train its adapter cores; validation and test accuracy."""
    torch.manual_seed(seed)
    model, opt = adapted(pretrained, preset, method, value)
    x, y = tasks["train"]
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(16):
            step(model, opt, x[idx], y[idx])
    return dict(val=accuracy(model, tasks["val"]), test=accuracy(model, tasks["test"]),
                trainable=trainable_parameters(model).trainable)


def step_times(pretrained: nn.Module, preset: dict, chosen: dict, tasks: dict, rounds: int, steps: int = 5) -> dict:
    """Median ms of a whole training step per method, timed in interleaved rounds (a background load on a
    shared machine then slows every method alike)."""
    setups = {method: adapted(pretrained, preset, method, value) for method, value in chosen.items()}
    x, y = tasks["train"]
    idx = torch.arange(16) % len(y)
    times = {method: [] for method in setups}
    for r in range(rounds + 1):  # round 0 warms up
        for method, (model, opt) in setups.items():
            for _ in range(steps):
                start = time.perf_counter()
                step(model, opt, x[idx], y[idx])
                if r:
                    times[method].append(time.perf_counter() - start)
    return {method: 1e3 * statistics.median(t) for method, t in times.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tasks = load_tasks(args.shots)
    pretrained = pretrain(tasks, args.pretrain_epochs)
    result = dict(source_test=accuracy(pretrained, tasks["source_test"]),
                  zero_shot=accuracy(pretrained, tasks["test"]), rows=[])
    for name in args.formats:
        rows = []
        for method, grid in GRIDS.items():
            grid = grid[:1] if args.quick and method != "Adam" else grid
            runs = {v: [finetune(pretrained, PRESETS[name], method, v, tasks, args.epochs, s) for s in range(args.seeds)]
                    for v in grid}
            best = max(grid, key=lambda v: statistics.mean(r["val"] for r in runs[v]))  # chosen on validation
            tests = [r["test"] for r in runs[best]]
            rows.append(dict(adapter=name, method=method, hyper=best, trainable=runs[best][0]["trainable"],
                             val=statistics.mean(r["val"] for r in runs[best]), test=statistics.mean(tests),
                             test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0))
        times = step_times(pretrained, PRESETS[name], {r["method"]: r["hyper"] for r in rows}, tasks, args.rounds)
        for row in rows:
            row["step_ms"] = times[row["method"]]
            print(f"{name:15s} {row['method']:4s} {str(row['hyper']):6s} test {row['test']:.3f} ± {row['test_std']:.3f} "
                  f"step {row['step_ms']:.2f} ms", flush=True)
        result["rows"] += rows
    return result


def report(args, result: dict) -> str:
    lines = [
        "# Adapter fine-tuning: Adam vs SAM vs DAS (rotated digits, few-shot)", "",
        f"- Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        f"- Pretrained on upright digits: {result['source_test']:.3f} test accuracy; on the rotated task before "
        f"fine-tuning: {result['zero_shot']:.3f} (chance 0.1)",
        f"- Fine-tuning: {args.shots} rotated images per class, {args.epochs} epochs of batch 16, Adam lr {ADAM_LR}; "
        f"query/value adapters, everything else frozen; {args.seeds} seeds; ρ (SAM) and α (DAS) chosen on "
        f"validation from the paper's FLoRA grids {GRIDS['SAM']} and {GRIDS['DAS']}",
        f"- Step: median whole training step (batch 16; SAM: two forward/backward passes) at the chosen ρ/α, "
        f"{args.rounds} interleaved rounds of 5 steps per method; torch threads {args.threads}; a tiny model, so "
        "the optimizer's fixed cost weighs more than at scale (see benchmarks/adapter_step.py)", "",
        "| adapter | trainable params | method | ρ / α | val acc | test acc (mean ± std) | step (ms) | x Adam |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    adam = {r["adapter"]: r["step_ms"] for r in result["rows"] if r["method"] == "Adam"}
    for r in result["rows"]:
        hyper = "-" if r["hyper"] is None else f"{r['hyper']:g}"
        lines.append(f"| {r['adapter']} | {r['trainable']:,} | {r['method']} | {hyper} | {r['val']:.3f} | "
                     f"{r['test']:.3f} ± {r['test_std']:.3f} | {r['step_ms']:.2f} | {r['step_ms'] / adam[r['adapter']]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run in seconds")
    parser.add_argument("--formats", nargs="+", default=None, choices=sorted(PRESETS), metavar="ADAPTER",
                        help=f"default: all of {sorted(PRESETS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=20, help="rotated training images per class")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per adapter")
    parser.add_argument("--out", default=None, help="results stem (default examples/results/local/finetune_adapters, git-ignored; "
                        "examples/results/finetune_adapters updates the committed one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.shots, args.epochs, args.pretrain_epochs, args.rounds = 1, 5, 2, 1, 1
        args.formats = args.formats or ["FLoRA (tucker)", "LoRETTA (tt)"]
    args.formats = args.formats or list(PRESETS)
    result = run(args)
    text = report(args, result)
    print(text)
    if args.out or not args.quick:
        out = Path(args.out) if args.out else Path(__file__).parent / "results" / "local" / "finetune_adapters"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(dict(command=sys.argv, settings=vars(args), result=result),
                                                       indent=2))
        print(f"written to {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
