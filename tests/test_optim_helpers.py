"""Small stand-in tensorized models for the optimizer tests, independent of tnlayers' own layers.

Imported by the other ``test_optim_*`` files, with the SAM-style step helpers they share; the tests here
check the stand-ins are what the optimizer tests assume (scale-invariant groups marked as such).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnlayers.groups import core_groups, group_of, mark_core_group
from tnlayers.optim import disable_running_stats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny: one thread is fastest, and stays fast when other work shares the CPU
    (two threads on a busy 2-core machine made these tests 5-15x slower). Imported by each test_optim_* file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tucker2(nn.Module):
    """W = A @ G @ B.T (the paper's Fig. 1 model; FLoRA's adapter shape): one group of three cores."""

    def __init__(self, m=6, n=5, r=3, scales=(1.0, 1.0, 1.0), dtype=torch.float32, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(scales[0] * torch.randn(m, r, generator=gen, dtype=dtype) / r ** 0.5)
        self.G = nn.Parameter(scales[1] * torch.randn(r, r, generator=gen, dtype=dtype) / r ** 0.5)
        self.B = nn.Parameter(scales[2] * torch.randn(n, r, generator=gen, dtype=dtype) / r ** 0.5)
        mark_core_group(self.core_parameters())

    def core_parameters(self):
        return [self.A, self.G, self.B]

    def forward(self):
        return self.A @ self.G @ self.B.T


class Tucker2Conv(nn.Module):
    """Conv2d whose weight is a Tucker-2 of the channel modes: U_out · core(R_out, R_in, k, k) · U_in."""

    def __init__(self, c_in, c_out, rank=3, kernel=3, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.u_out = nn.Parameter(torch.randn(c_out, rank, generator=gen) / rank ** 0.5)
        self.core = nn.Parameter(torch.randn(rank, rank, kernel, kernel, generator=gen) * (2.0 / (rank * kernel ** 2)) ** 0.5)
        self.u_in = nn.Parameter(torch.randn(c_in, rank, generator=gen) / c_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(c_out))
        mark_core_group(self.core_parameters())

    def core_parameters(self):
        return [self.u_out, self.core, self.u_in]

    def forward(self, x):
        weight = torch.einsum("or,rsxy,is->oixy", self.u_out, self.core, self.u_in)
        return F.conv2d(x, weight, self.bias, padding=1)


class TinyCNN(nn.Module):
    """Two tensorized convs with BatchNorm, a dense head: cores, non-core params and BN buffers."""

    def __init__(self, channels=8, classes=3, seed=0):
        super().__init__()
        self.conv1 = Tucker2Conv(3, channels, seed=seed)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = Tucker2Conv(channels, channels, seed=seed + 1)
        self.head = nn.Linear(channels, classes)
        with torch.no_grad():  # nn.Linear's init draws from the global RNG; models must not depend on it
            gen = torch.Generator().manual_seed(seed)
            self.head.weight.copy_(torch.randn(classes, channels, generator=gen) * 0.3)
            self.head.bias.copy_(torch.randn(classes, generator=gen) * 0.1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def cnn_batch(seed=0, n=8, size=6, classes=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def cnn_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x.to(model.head.weight.dtype)), y)


def sam_closure(model, opt, batch):
    """The closure ``opt.step`` takes: zeroed gradients, then the loss on ``batch`` and its backward."""
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = cnn_loss(model, batch)
        loss.backward()
        return loss
    return closure


def sam_step_explicit(model, opt, batch):
    """One SAM-style step driven by hand: first_step, then the second pass with BatchNorm statistics frozen."""
    opt.zero_grad(set_to_none=True)
    cnn_loss(model, batch).backward()
    opt.first_step()
    with disable_running_stats(model):
        cnn_loss(model, batch).backward()
    opt.second_step()


def unscaled_sam_step(model, opt, batch, clip=None):
    """The reference for ``amp_sam_step``: the same SAM-style step without a GradScaler (BatchNorm statistics
    update in both passes, as there), gradients clipped before the second step when ``clip`` is given."""
    opt.zero_grad()
    cnn_loss(model, batch).backward()
    opt.first_step()
    cnn_loss(model, batch).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step()


def amp_sam_step(model, opt, scaler, batch, inject=None, clip=None, bad=float("nan")):
    """One SAM-style step with a GradScaler on a TinyCNN; ``inject`` "first" puts an inf into the first pass's
    gradient, "second" puts ``bad`` into the second pass's."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(cnn_loss(model, batch)).backward()
    if inject == "first":
        model.conv1.core.grad.view(-1)[0] = float("inf")
    opt.first_step()
    scaler.scale(cnn_loss(model, batch)).backward()
    if inject == "second":
        model.conv2.u_in.grad.view(-1)[0] = bad
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()


def test_tucker2_group_is_scale_invariant():
    model = Tucker2(dtype=torch.float64)
    before = model().detach().clone()
    with torch.no_grad():
        model.A.mul_(2.0)
        model.G.mul_(0.25)
        model.B.mul_(2.0)
    torch.testing.assert_close(model(), before, rtol=1e-12, atol=1e-12)
    assert len({group_of(p) for p in model.core_parameters()}) == 1


def test_tiny_cnn_has_two_groups_and_plain_params():
    model = TinyCNN()
    groups = core_groups(model)
    assert [name for name, _ in groups] == ["conv1", "conv2"]
    assert group_of(model.conv1.bias) is None and group_of(model.head.weight) is None
    loss = cnn_loss(model, cnn_batch())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
