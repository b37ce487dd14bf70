"""Tucker tensor completion of tensorly's COVID-19 serology tensor: Adam vs SAM vs DAS vs HOOI.

Reproduces Table 1 of the DAS paper (arXiv 2508.10435, appendix B): a rank-(8, 6, 8) Tucker model of the
438 x 6 x 11 tensor (samples x antigens x receptors) is fitted by MSE on 30% of the entries, and the other
70% are predicted; the score is R^2 = 1 - SSE/SST on those held-out entries (SST about their own mean),
mean +- std over 3 random splits. The HOOI baseline is tensorly's ``tucker`` with ``mask=``: HOOI with
EM-style imputation (missing entries are refilled from the current Tucker reconstruction every sweep).

    python examples/tensor_completion.py                 # full setting: 50,000 iterations, 3 splits
    python examples/tensor_completion.py --quick         # a ~30 s check

Results go to ``--out-dir`` (default ``examples/results/local``, git-ignored; ``examples/results`` updates the
committed ones): ``tensor_completion.json`` (settings, per-split
R^2, learning curves), ``tensor_completion.csv`` (one row per method and split) and a PNG.
See ``benchmarks/results/tensor_completion.md`` for how the defaults were chosen and how they compare
with the paper's numbers.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import tnlayers
from tnlayers.optim import DAS, SAM

METHODS = ("hooi", "adam", "sam", "das")
PAPER_R2 = {"hooi": (0.9268, 0.0063), "adam": (0.9482, 0.0012), "sam": (0.9485, 0.0013), "das": (0.9484, 0.0017)}
PREPROCESSING = ("none", "standardize")
INITS = ("random", "hooi")


def load_covid_tensor() -> np.ndarray:
    """The bundled serology tensor (no download). It ships already centered per (antigen, receptor)."""
    from tensorly.datasets import load_covid19_serology
    return np.asarray(load_covid19_serology().tensor, dtype=np.float64)


def random_observed_mask(shape: Sequence[int], observed_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask with exactly round(fraction * size) True entries, drawn uniformly without replacement."""
    size = int(np.prod(shape))
    observed = np.zeros(size, dtype=bool)
    observed[np.random.default_rng(seed).permutation(size)[: int(round(observed_fraction * size))]] = True
    return observed.reshape(shape)


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination 1 - SSE/SST, SST taken about the mean of ``y_true`` (paper, App. B)."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    residual = y_true - y_pred
    centered = y_true - y_true.mean()
    return float(1.0 - residual @ residual / (centered @ centered))


class FeatureScaler:
    """Per-(antigen, receptor) centering and scaling, fitted on the observed entries only (no peeking at
    the held-out ones). ``mode="none"`` is the identity."""

    def __init__(self, tensor: np.ndarray, observed: np.ndarray, mode: str):
        self.mean = np.zeros((1,) + tensor.shape[1:])
        self.scale = np.ones((1,) + tensor.shape[1:])
        if mode == "standardize":
            counts = observed.sum(axis=0, keepdims=True).clip(min=1)
            self.mean = (tensor * observed).sum(axis=0, keepdims=True) / counts
            variance = (((tensor - self.mean) * observed) ** 2).sum(axis=0, keepdims=True) / counts
            self.scale = np.sqrt(variance).clip(min=1e-8)

    def transform(self, tensor: np.ndarray) -> np.ndarray:
        return (tensor - self.mean) / self.scale

    def inverse(self, tensor: np.ndarray) -> np.ndarray:
        return tensor * self.scale + self.mean


def fit_hooi(train: np.ndarray, observed: np.ndarray, rank: Sequence[int], n_iter: int = 200):
    """tensorly HOOI with mask (EM-style imputation of the missing entries); returns (core, factors)."""
    import tensorly as tl
    from tensorly.decomposition import tucker
    with tl.backend_context("numpy"):
        core, factors = tucker(np.where(observed, train, 0.0), rank=list(rank), mask=observed.astype(np.float64),
                               init="svd", n_iter_max=n_iter, tol=1e-9)
    return np.asarray(core), [np.asarray(f) for f in factors]


def tucker_to_numpy(core: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    return np.einsum("abc,ia,jb,kc->ijk", core, *factors)


def fit_gradient(method: str, train: np.ndarray, observed: np.ndarray, held_out_true: np.ndarray,
                 scaler: FeatureScaler, args, seed: int, hooi_init=None, progress: Optional[tqdm] = None):
    """Fit a FactorizedTensor by masked MSE with Adam, SAM(Adam) or DAS(Adam).

    Returns the prediction (original scale) and the learning curve [(iteration, train MSE, held-out R^2)].
    """
    torch.manual_seed(seed)
    dtype = torch.float64 if args.float64 else torch.float32
    model = tnlayers.FactorizedTensor(train.shape, "tucker", rank=tuple(args.rank), std=args.init_std, dtype=dtype)
    if hooi_init is not None:
        with torch.no_grad():
            for core, value in zip(model.cores, [hooi_init[0], *hooi_init[1]]):
                core.copy_(torch.as_tensor(value, dtype=dtype))
    target = torch.as_tensor(np.where(observed, train, 0.0), dtype=dtype)
    mask = torch.as_tensor(observed, dtype=dtype)
    n_observed = float(observed.sum())
    held_out = ~observed

    adam = dict(lr=args.lr, weight_decay=args.weight_decay)
    if method == "adam":
        optimizer = torch.optim.Adam(model.parameters(), **adam)
    elif method == "sam":
        optimizer = SAM(model.parameters(), torch.optim.Adam, rho=args.rho, **adam)
    elif method == "das":
        optimizer = DAS(model.parameters(), torch.optim.Adam, alpha=args.alpha, **adam)
    else:
        raise ValueError(f"unknown gradient method {method!r}")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        # Multiplying by the mask (rather than boolean indexing) keeps the step cheap: no gather/scatter.
        loss = ((model() - target) * mask).square().sum() / n_observed
        loss.backward()
        return loss

    def predict() -> np.ndarray:
        with torch.no_grad():
            return scaler.inverse(model().double().numpy())

    curve: List = []
    for iteration in range(1, args.iterations + 1):
        if method == "sam":
            loss = optimizer.step(closure)
        else:
            loss = closure()
            optimizer.step()
        if iteration % args.log_every == 0 or iteration == args.iterations:
            curve.append((iteration, float(loss.detach()), r2_score(held_out_true, predict()[held_out])))
        if progress is not None:
            progress.update(1)
    return predict(), curve


def fit_one(split: int, method: str, args, progress: Optional[tqdm] = None) -> Dict:
    """One method on one split: held-out and train R^2 (original scale), seconds, learning curve."""
    tensor = load_covid_tensor()
    split_seed = args.seed + split
    observed = random_observed_mask(tensor.shape, args.observed_fraction, split_seed)
    scaler = FeatureScaler(tensor, observed, args.preprocess)
    train = scaler.transform(tensor)
    tic = time.perf_counter()
    curve: List = []
    hooi = fit_hooi(train, observed, args.rank) if method == "hooi" or args.init == "hooi" else None
    if method == "hooi":
        prediction = scaler.inverse(tucker_to_numpy(*hooi))
    else:
        prediction, curve = fit_gradient(method, train, observed, tensor[~observed], scaler, args, seed=split_seed,
                                         hooi_init=hooi, progress=progress)
    return {"split": split, "method": method, "seconds": time.perf_counter() - tic, "curve": curve,
            "r2": r2_score(tensor[~observed], prediction[~observed]),
            "train_r2": r2_score(tensor[observed], prediction[observed])}


def run(args) -> Dict:
    """Every method on every split; returns the results dict (also written to ``args.out_dir``)."""
    results: Dict = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                     "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
                     "torch": torch.__version__, "threads_per_fit": 1,
                     "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "paper_r2": PAPER_R2}
    tasks = [(split, method) for split in range(args.splits) for method in args.methods]
    started = time.time()
    if args.jobs == 1:
        total = args.splits * args.iterations * sum(m != "hooi" for m in args.methods)
        with tqdm(total=total, desc="completion", unit="it", disable=args.no_progress) as progress:
            fits = []
            for split, method in tasks:
                progress.set_postfix(split=split, method=method)
                fits.append(fit_one(split, method, args, progress))
    else:
        # Fits are independent: spread them over processes (one thread each), slowest (SAM) first.
        # "spawn": forked workers inherit the parent's thread pools and ran ~50x slower here.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        cost = {"hooi": 0, "adam": 1, "das": 2, "sam": 3}
        ordered = sorted(tasks, key=lambda task: -cost[task[1]])
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(fit_one, split, method, args) for split, method in ordered]
            fits = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="completion",
                                             unit="fit", disable=args.no_progress)]
    results["seconds_total"] = time.time() - started
    results["splits"] = []
    for split in range(args.splits):
        mine = {fit["method"]: fit for fit in fits if fit["split"] == split}
        results["splits"].append({"split": split, "seed": args.seed + split,
                                  **{key: {m: mine[m][key] for m in args.methods}
                                     for key in ("r2", "train_r2", "seconds", "curve")}})
    results["summary"] = {}
    for method in args.methods:
        values = [s["r2"][method] for s in results["splits"]]
        results["summary"][method] = {  # std over splits with ddof=1 (sample std); 0 for a single split
            "r2_mean": float(np.mean(values)), "r2_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "train_r2_mean": float(np.mean([s["train_r2"][method] for s in results["splits"]]))}
    write_outputs(results, args)
    return results


def write_outputs(results: Dict, args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / args.name
    with open(f"{stem}.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "split", "heldout_r2", "train_r2", "seconds"])
        for entry in results["splits"]:
            for method, value in entry["r2"].items():
                writer.writerow([method, entry["split"], f"{value:.6f}", f"{entry['train_r2'][method]:.6f}",
                                 f"{entry['seconds'][method]:.2f}"])
    plot(results, f"{stem}.png")


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summary = results["summary"]
    methods = list(summary)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(methods))
    bars.bar(x - 0.2, [summary[m]["r2_mean"] for m in methods], 0.4,
             yerr=[summary[m]["r2_std"] for m in methods], capsize=3, label="this run")
    bars.bar(x + 0.2, [PAPER_R2[m][0] for m in methods], 0.4, yerr=[PAPER_R2[m][1] for m in methods], capsize=3,
             label="paper (Table 7)", alpha=0.6)
    bars.set_xticks(x, [m.upper() for m in methods])
    low = min(min(summary[m]["r2_mean"] for m in methods), 0.85)
    bars.set_ylim(max(0.0, low - 0.05), 1.0)
    bars.set_ylabel("held-out R²")
    bars.set_title(f"Tucker{tuple(results['settings']['rank'])} completion, {len(results['splits'])} splits")
    bars.legend(loc="lower right")
    for method, curve in results["splits"][0]["curve"].items():
        if not curve:  # HOOI: drawn as a line below
            continue
        steps, _, r2 = zip(*curve)
        curves.plot(steps, r2, label=method.upper())
    if "hooi" in summary:
        curves.axhline(results["splits"][0]["r2"]["hooi"], color="gray", ls="--", label="HOOI")
    curves.set_xlabel("iteration")
    curves.set_ylabel("held-out R² (split 0)")
    curves.set_ylim(max(0.0, low - 0.05), 1.0)
    curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50_000, help="optimizer steps per fit")
    parser.add_argument("--splits", type=int, default=3, help="random 30/70 splits (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CI setting: 1 split, 1,000 iterations")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, nargs=3, default=[8, 6, 8], help="Tucker multilinear rank")
    parser.add_argument("--observed-fraction", type=float, default=0.3, help="fraction of entries trained on")
    parser.add_argument("--preprocess", choices=PREPROCESSING, default="none",
                        help="'standardize': per-(antigen, receptor) z-score from the observed entries")
    parser.add_argument("--init", choices=INITS, default="random", help="random cores, or the masked-HOOI fit")
    parser.add_argument("--init-std", type=float, default=1.0, help="std of the random initial full tensor")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=5e-3,
                        help="Adam's coupled L2 weight decay (paper: 0.01; 5e-3 was best here, see benchmarks/results)")
    parser.add_argument("--rho", type=float, default=0.01, help="SAM radius (paper: 0.01)")
    parser.add_argument("--alpha", type=float, default=0.001, help="DAS strength (paper: 0.001)")
    parser.add_argument("--float64", action="store_true", help="train in float64 (slower)")
    parser.add_argument("--log-every", type=int, default=500, help="learning-curve interval (iterations)")
    parser.add_argument("--out-dir", default="examples/results/local",
                        help="default: a git-ignored folder; pass examples/results to update the committed results")
    parser.add_argument("--name", default="tensor_completion", help="output file stem")
    parser.add_argument("--jobs", type=int, default=1, help="fits run in parallel processes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.splits, args.iterations, args.log_every = 1, 1_000, 250
    for name in ("iterations", "splits", "log_every", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.observed_fraction < 1.0:
        raise ValueError(f"--observed-fraction must be in (0, 1), got {args.observed_fraction}")
    if any(r < 1 for r in args.rank) or any(r > n for r, n in zip(args.rank, (438, 6, 11))):
        raise ValueError(f"--rank must be within the tensor's shape (438, 6, 11), got {args.rank}")
    for name in ("lr", "init_std"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("weight_decay", "rho", "alpha"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    args = parse_args(argv)
    results = run(args)
    print(f"{'method':<6} {'held-out R2 (mean +- std)':>26} {'paper':>16} {'train R2':>9}")
    for method, row in results["summary"].items():
        paper = PAPER_R2[method]
        print(f"{method:<6} {row['r2_mean']:>17.4f} +- {row['r2_std']:.4f} {paper[0]:>9.4f} +- {paper[1]:.4f}"
              f" {row['train_r2_mean']:>9.4f}")
    print(f"wrote {Path(args.out_dir) / args.name}.{{json,csv,png}} in {results['seconds_total']:.0f} s")
    return results


if __name__ == "__main__":
    main()
