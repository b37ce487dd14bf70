"""A tensorized embedding's cores are one core group: the optimizers (SAM, DAS, BAR), the preconditioner,
summary and the meta-device path treat it as they treat the other tensorized layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from tnlayers.groups import core_groups, group_of
from tnlayers.optim import BAR, DAS, SAM

TOKENS = torch.randint(0, 300, (32, 6), generator=torch.Generator().manual_seed(1))
LABELS = (TOKENS[:, 0] % 3)  # learnable from the first token's row alone


class Bag(nn.Module):
    def __init__(self, fmt="tt"):
        super().__init__()
        torch.manual_seed(0)
        rank = 32 if fmt == "cp" else 4  # CP over separate modes: 4 terms of ~30 entries each cannot fit it
        self.embed = tnlayers.TensorizedEmbedding(300, 16, format=fmt, rank=rank, weight_std=0.5)
        self.fc = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.fc(self.embed(tokens)[:, 0])


def train(model, opt, steps=25):
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(TOKENS), LABELS)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5),
    lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.5),
    lambda p: DAS(p, torch.optim.SGD, alpha=0.1, lr=0.5),
    lambda p: BAR(p, torch.optim.SGD, alpha=0.1, total_steps=25, lr=0.5),
], ids=["sgd", "sam", "das", "bar"])
@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
def test_optimizers_train_a_tensorized_embedding(make_opt, fmt):
    model = Bag(fmt)
    losses = train(model, make_opt(model.parameters()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_cores_are_one_group_that_das_rescales():
    model = Bag()
    groups = core_groups(model)
    assert [(name, len(cores)) for name, cores in groups] == [("embed", 3)]
    assert len({group_of(c) for c in model.embed.cores}) == 1
    das = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.5)
    train(model, das, steps=1)
    assert len(das.last_lambdas[0]) == 3 and das.last_lambdas[1].abs().sum() > 0


def test_preconditioner_and_summary_see_the_embedding():
    model = Bag()
    F.cross_entropy(model(TOKENS), LABELS).backward()
    raw = [c.grad.clone() for c in model.embed.cores]
    tnlayers.precondition_core_grads_(model)
    assert any(not torch.equal(c.grad, g) for c, g in zip(model.embed.cores, raw))
    report = tnlayers.summary(model, print_table=False)
    (row,) = report.rows
    assert row["name"] == "embed" and row["dense_params"] == 300 * 16 and row["params"] < 300 * 16


def test_meta_construction_then_materialization():
    emb = tnlayers.TTEmbedding(300, 16, rank=4, device="meta")
    assert all(c.is_meta for c in emb.cores)
    emb.to_empty(device="cpu")
    emb.reset_parameters()
    assert emb(torch.tensor([1, 2])).shape == (2, 16) and group_of(emb.cores[0]) is not None
