"""Mixed precision: bf16 autocast with fp32 cores under DAS, fp32 accumulation of DAS's reductions, and
fp16 autocast with torch.amp.GradScaler("cpu"): a step with an inf/NaN gradient changes nothing (cores,
other weights, optimizer state), lowers the scale, and training goes on."""
import pytest
import torch
from torch import nn

import tnlayers
from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from tnlayers.groups import group_of
from tnlayers.optim import DAS, SAM, disable_running_stats
from tnlayers.optim.core_scaling import CoreIndex

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))


def small_model(seed=0):
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    return tnlayers.tensorize(dense, format="tr", rank=3, progress=False)


def cores_of(model):
    return [p for p in model.parameters() if group_of(p) is not None]


def snapshot(model, opt):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for index, per_param in opt.state_dict()["state"].items():
        for key, value in per_param.items():
            state[f"opt.{index}.{key}"] = value.clone() if torch.is_tensor(value) else value
    extra = getattr(opt, "steps_taken", None)
    return state, extra


def assert_same(a, b):
    assert a[1] == b[1] and a[0].keys() == b[0].keys()
    for key, value in a[0].items():
        assert torch.equal(value, b[0][key]) if torch.is_tensor(value) else value == b[0][key], key


def test_bf16_autocast_with_fp32_cores_and_das_trains():
    model = small_model()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X)
            assert out.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(out.float(), Y)
        loss.backward()
        for core in cores_of(model):
            assert core.dtype == torch.float32 and core.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    cores, lambdas = opt.last_lambdas
    assert lambdas.dtype == torch.float32 and bool(lambdas.abs().max() > 0)
    assert all(c.dtype == torch.float32 and bool(torch.isfinite(c).all()) for c in cores)
    assert losses[-1] < losses[0]


def test_das_reductions_accumulate_in_fp32_for_half_cores():
    model = small_model().to(torch.bfloat16)
    loss = nn.functional.cross_entropy(model(X.bfloat16()).float(), Y)
    loss.backward()
    layout = CoreIndex([{"params": list(model.parameters())}]).layout()
    s, gamma = layout.stats()
    assert s.dtype == gamma.dtype == torch.float32
    expected_s = torch.stack([c.double().pow(2).sum() for c in layout.cores])
    expected_g = torch.stack([c.grad.double().pow(2).sum() for c in layout.cores])
    torch.testing.assert_close(s.double(), expected_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(gamma.double(), expected_g, rtol=1e-5, atol=0)


def fp16_step(model, opt, scaler, inject=None, where="core", zero_grad=True):
    if zero_grad:  # not before SAM's second pass: first_step zeroed (or NaN-seeded) the gradients
        opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(X), Y)
    scaler.scale(loss).backward()
    if inject is not None:
        target = cores_of(model)[1] if where == "core" else model[-1].weight
        with torch.no_grad():
            target.grad.view(-1)[0] = inject
    return loss


@pytest.mark.parametrize("bad, where", [(float("inf"), "core"), (float("nan"), "core"), (float("-inf"), "dense")])
def test_das_with_grad_scaler_skips_a_non_finite_step_and_goes_on(bad, where):
    model = small_model()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.05, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(2):  # momentum buffers exist, DAS has counted steps
        fp16_step(model, opt, scaler)
        scaler.step(opt)
        scaler.update()
    fp16_step(model, opt, scaler, inject=bad, where=where)
    before, scale = snapshot(model, opt), scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert_same(snapshot(model, opt), before)
    assert scaler.get_scale() == scale / 2
    fp16_step(model, opt, scaler)
    scaler.step(opt)
    scaler.update()
    after = snapshot(model, opt)
    assert opt.steps_taken == 3
    assert not all(torch.equal(after[0][k], v) for k, v in before[0].items() if k.startswith("model."))
    assert all(bool(torch.isfinite(c).all()) for c in cores_of(model))


@pytest.mark.parametrize("bad_pass", ["first", "second"])
def test_sam_with_grad_scaler_skips_a_non_finite_step_and_goes_on(bad_pass):
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def sam_step(bad=None):
        fp16_step(model, opt, scaler, inject=bad if bad_pass == "first" else None)
        opt.first_step()
        with disable_running_stats(model):
            fp16_step(model, opt, scaler, inject=bad if bad_pass == "second" else None, zero_grad=False)
        scaler.step(opt)
        scaler.update()

    sam_step()
    sam_step()
    before, scale = snapshot(model, opt), scaler.get_scale()
    # the BN buffers change in the first forward (before the skip is known): compare them after it
    opt.zero_grad()
    fp16_step(model, opt, scaler, inject=float("nan") if bad_pass == "first" else None)
    before = ({**before[0], **{f"model.{k}": v.clone() for k, v in model.state_dict().items() if "running" in k
                               or "num_batches" in k}}, before[1])
    opt.first_step()
    with disable_running_stats(model):
        fp16_step(model, opt, scaler, inject=float("nan") if bad_pass == "second" else None, zero_grad=False)
    scaler.step(opt)
    scaler.update()
    assert_same(snapshot(model, opt), before)
    assert scaler.get_scale() == scale / 2
    sam_step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(model.state_dict()[next(iter(before[0])).removeprefix("model.")],
                           before[0][next(iter(before[0]))])
