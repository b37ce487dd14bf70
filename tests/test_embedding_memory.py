"""The acceptance test of tensorized lookups (issue 22): a 1,000,000 x 256 table at TT rank 16 (1 GB as a float32
table) serves a batch of 4096 lookups, forward and backward, without any tensor anywhere near the table's size:
every tensor any aten op returns is recorded by a dispatch mode, the largest must stay under 64 MB. (The speed
against rebuilding the table is measured in benchmarks/layers.py, not asserted here: timings on a shared
machine are no test.)"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tnlayers

LIMIT = 64 << 20  # bytes; the table would be 1,000,000 x 256 x 4 = 1,024,000,000


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) among the outputs of every aten op run inside it, with the op."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.ops = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest:
                self.largest, self.op = t.untyped_storage().nbytes(), str(func)
        return out


def test_4096_lookups_in_a_million_row_table_never_allocate_the_table():
    torch.manual_seed(0)
    emb = tnlayers.TTEmbedding(1_000_000, 256, rank=16)
    table_bytes = 1_000_000 * 256 * 4
    assert emb.network.num_params == 224_000  # cores (800, 16), (16, 800, 16), (16, 400): 0.9 MB
    indices = torch.randint(0, 1_000_000, (32, 128))  # 4096 lookups
    with LargestTensor() as seen:
        out = emb(indices)
        out.square().mean().backward()
    assert out.shape == (32, 128, 256) and emb.last_strategy == "factorized"
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in emb.cores)
    assert seen.ops > 20  # the mode saw the forward and the backward's ops
    assert seen.largest < LIMIT, (seen.largest, seen.op)
    assert seen.largest < table_bytes / 16
    # the same checks see the table when it is built: the mode would catch a lookup that rebuilt it
    with LargestTensor() as rebuilt, torch.no_grad():
        tnlayers.TTEmbedding(100_000, 256, rank=2).weight
    assert rebuilt.largest >= 100_000 * 256 * 4
