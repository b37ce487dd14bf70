"""The Embedding section of benchmarks/layers.py: a 100,000 x 128 table (index modes (50, 50, 40), dim modes
(8, 4, 4), the same for tnlayers and tensorly-torch) looked up by 4096 uniformly drawn indices, every format at
ranks that keep 0.2%, 1% and 5% of the table's parameters, against nn.Embedding and tensorly-torch 0.5's
FactorizedEmbedding ('blocktt' for TT, 'cp', 'tucker'; it has no TR, and one implementation, listed as its
"factorized"). train: forward + backward from a given upstream gradient; inference: a no-grad forward.

And issue 22's acceptance measurement (``lookup_vs_rebuild``): a 1,000,000 x 256 table at TT rank 16, 4096
lookups from the cores against rebuilding the 1 GB table and indexing it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from tnlayers.layers.embedding_layout import dim_shape, index_shape

NUM, DIM, LOOKUPS = 100_000, 128, 4096
RANKS = (0.002, 0.01, 0.05)
TLTORCH_NAMES = {"tt": "blocktt", "cp": "cp", "tucker": "tucker"}


def tltorch_embeddings(fmt, rank, device):
    """{"factorized": tensorly-torch FactorizedEmbedding} at this format and rank; {} when missing or lacking it."""
    try:
        from tltorch import FactorizedEmbedding
    except ImportError:
        return {}
    if fmt not in TLTORCH_NAMES:
        return {}
    layer = FactorizedEmbedding(NUM, DIM, auto_tensorize=False, tensorized_num_embeddings=index_shape(NUM),
                                tensorized_embedding_dim=dim_shape(DIM), factorization=TLTORCH_NAMES[fmt], rank=rank,
                                device=device)
    return {"factorized": layer}  # its own init (TT-Rec's), done in its constructor


def our_embedding(fmt, rank, strategy, device):
    return tnlayers.TensorizedEmbedding(NUM, DIM, format=fmt, rank=rank, strategy=strategy, device=device,
                                        in_shape=index_shape(NUM), out_shape=dim_shape(DIM))


def embedding_inputs(device):
    """(indices, dense nn.Embedding, upstream gradient of the lookups)."""
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, NUM, (LOOKUPS,), generator=gen).to(device)
    return indices, nn.Embedding(NUM, DIM, device=device), torch.randn(LOOKUPS, DIM, generator=gen).to(device)


def _ms(fn, device, rounds):
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def lookup_vs_rebuild(device, rounds=3):
    """Lines for the acceptance measurement: min ms over ``rounds`` (interleaved) of 4096 lookups from the cores
    (forward; forward + backward) and of rebuilding the table then indexing it (forward only: its backward
    would add a 1 GB gradient on top)."""
    torch.manual_seed(0)
    emb = tnlayers.TTEmbedding(1_000_000, 256, rank=16, strategy="factorized", device=device)
    indices = torch.randint(0, 1_000_000, (LOOKUPS,), device=device)
    grad = torch.randn(LOOKUPS, 256, device=device)

    def rebuild():
        with torch.no_grad():
            F.embedding(indices, emb.plan.table(emb.core_parameters()))

    def lookup():
        with torch.no_grad():
            emb(indices)

    def train():
        emb.zero_grad(set_to_none=True)
        emb(indices).backward(grad)

    for fn in (lookup, train, rebuild):  # warm-up
        fn()
    best = {"lookup": [], "train": [], "rebuild": []}
    for _ in range(rounds):
        for name, fn in (("lookup", lookup), ("train", train), ("rebuild", rebuild)):
            best[name].append(_ms(fn, device, 1))
    ms = {k: min(v) for k, v in best.items()}
    ratio = ms["rebuild"] / ms["lookup"]
    return [f"- 1,000,000 x 256 table (1 GB in float32) at TT rank 16 ({emb.network.num_params:,} parameters, "
            f"index modes {emb.in_shape}, dim modes {emb.out_shape}), {LOOKUPS} lookups, min of {rounds} rounds: "
            f"lookup from the cores {ms['lookup']:.1f} ms (forward + backward {ms['train']:.1f} ms); rebuilding the "
            f"table and indexing it {ms['rebuild']:.0f} ms: **{ratio:.0f}x** faster (target >= 10x: "
            f"{'met' if ratio >= 10 else 'MISSED'})"]
