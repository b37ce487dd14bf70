"""The fused Triton path re-implements torch.optim's SGD, Adam and AdamW updates: its contract with them.

Every option combination the kernels fuse is checked against torch.optim's own step (DAS backend="torch"),
parameters and optimizer state; every option in torch.optim's defaults must be known to the whitelist
(``das_fused.FUSABLE``), so an option a torch upgrade adds keeps the base optimizer's own step (and a
forced backend="triton" says so) instead of being ignored."""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")  # conftest.py chose the interpreter when there is no GPU
if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

import tnlayers  # noqa: E402
from tnlayers.kernels.das_triton import UPDATE_ADAMW, UPDATE_NONE, UPDATE_SGD, FusedDASPlan  # noqa: E402
from tnlayers.optim import DAS  # noqa: E402
from tnlayers.optim.das_fused import FUSABLE, unfusable_options  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, as tests/test_kernels_das.py
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(tnlayers.TTLinear(12, 8, in_shape=(3, 4), out_shape=(2, 4), rank=2), nn.Tanh(),
                         tnlayers.CPLinear(8, 3, rank=2)).to(DEVICE)


def run_both(base, kwargs, steps=3, groups=None):
    """Steps DAS backend="torch" and backend="triton" on identical models; returns both optimizers, models
    and the update kinds the kernel was asked for."""
    kinds = []
    real_update = FusedDASPlan.update

    def spy(self, *args, **kw):
        kinds.append(kw.get("update"))
        return real_update(self, *args, **kw)

    x = torch.randn(5, 12, device=DEVICE)
    y = torch.randint(0, 3, (5,), device=DEVICE)
    models = {b: tiny_model() for b in ("torch", "triton")}
    opts = {b: DAS(m.parameters() if groups is None else groups(m), base, alpha=0.5, backend=b, **kwargs)
            for b, m in models.items()}
    mp = pytest.MonkeyPatch()
    mp.setattr(FusedDASPlan, "update", spy)
    try:
        for _ in range(steps):
            for b, m in models.items():
                opts[b].zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opts[b].step()
    finally:
        mp.undo()
    return opts, models, kinds


def assert_same(opts, models):
    for pa, pb in zip(models["torch"].parameters(), models["triton"].parameters()):
        torch.testing.assert_close(pb, pa, **TOL)
        sa = opts["torch"].base_optimizer.state[pa]
        sb = opts["triton"].base_optimizer.state[pb]
        assert set(sa) == set(sb)
        for key in STATE_KEYS:
            if key in sa:
                torch.testing.assert_close(sb[key], sa[key], **TOL)


FUSED = [
    (torch.optim.SGD, dict(lr=0.1), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=1e-2), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-2), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=False), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True), UPDATE_SGD),
    (torch.optim.AdamW, dict(lr=0.01), UPDATE_ADAMW),
    (torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), UPDATE_ADAMW),
    (torch.optim.AdamW, dict(lr=0.02, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0, foreach=False), UPDATE_ADAMW),
    (torch.optim.AdamW, dict(lr=0.01, foreach=True), UPDATE_ADAMW),
    (torch.optim.Adam, dict(lr=0.01), UPDATE_ADAMW),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.7, 0.95), weight_decay=0.05, decoupled_weight_decay=True),
     UPDATE_ADAMW),
]


@pytest.mark.parametrize("base,kwargs,kind", FUSED, ids=lambda v: getattr(v, "__name__", None))
def test_every_fused_option_matches_torch_optim_step_and_state(base, kwargs, kind, recwarn):
    opts, models, kinds = run_both(base, kwargs)
    stateful = base is not torch.optim.SGD or kwargs.get("momentum", 0) != 0
    assert kinds == [UPDATE_NONE if stateful else kind] + [kind] * 2  # the first step creates the state
    assert_same(opts, models)
    assert not [w for w in recwarn.list if "not fused" in str(w.message)]


UNFUSED = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, maximize=True), "maximize"),
    (torch.optim.SGD, dict(lr=0.1, fused=True), "fused"),
    (torch.optim.AdamW, dict(lr=0.01, amsgrad=True), "amsgrad"),
    (torch.optim.AdamW, dict(lr=0.01, maximize=True), "maximize"),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05), "decoupled_weight_decay"),
]


@pytest.mark.parametrize("base,kwargs,option", UNFUSED, ids=lambda v: getattr(v, "__name__", None))
def test_unfusable_options_keep_the_base_step_and_forced_triton_warns_once_naming_them(base, kwargs, option):
    with pytest.warns(UserWarning, match=f"not fused.*{option}") as record:
        opts, models, kinds = run_both(base, kwargs)
    warned = [w for w in record.list if "not fused" in str(w.message)]
    assert len(warned) == 1  # once, not every step
    assert warned[0].filename == __file__  # at the caller's line (through run_both here), not inside tnlayers
    assert kinds == [UPDATE_NONE] * 3  # the kernels rescale; the base optimizer's own step follows
    assert_same(opts, models)


def test_options_that_differ_between_core_groups_are_not_fused():
    def groups(m):
        return [{"params": m[0].parameters(), "momentum": 0.9}, {"params": m[2].parameters(), "momentum": 0.5}]
    with pytest.warns(UserWarning, match="momentum over the cores' param groups"):
        opts, models, kinds = run_both(torch.optim.SGD, dict(lr=0.1), groups=groups)
    assert kinds == [UPDATE_NONE] * 3
    assert_same(opts, models)


def test_forced_triton_refuses_per_group_step_sizes_before_changing_anything():
    model = tiny_model()
    opt = DAS([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}],
              torch.optim.SGD, alpha=0.5, backend="triton")
    model(torch.randn(5, 12, device=DEVICE)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="one learning rate and one alpha over the cores' param groups"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # backend="torch" (and "auto", which picks it here) takes per-group step sizes
    opt = DAS([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}],
              torch.optim.SGD, alpha=0.5, backend="torch")
    opt.step()


@pytest.mark.parametrize("base", list(FUSABLE), ids=lambda c: c.__name__)
def test_every_torch_option_is_known_to_the_whitelist(base):
    """A torch upgrade that adds an option fails here (and, until the whitelist lists it, keeps the base
    optimizer's own step) instead of being ignored by the kernels."""
    p = nn.Parameter(torch.zeros(3))
    opt = base([p])
    spec = FUSABLE[base]
    known = set(spec["read"]) | set(spec["off"]) | set(spec["free"])
    assert set(opt.defaults) <= known, set(opt.defaults) - known
    assert set(spec["read"]) | set(spec["off"]) <= set(opt.defaults)  # no stale names either
    for key in spec["off"]:  # each one, turned on, prevents fusion, and the reason names it
        opt = base([p])
        opt.param_groups[0][key] = True
        assert key in (unfusable_options(opt, [0]) or ""), key
    opt = base([p])
    opt.defaults["some_future_option"] = 1.0
    assert "some_future_option" in (unfusable_options(opt, [0]) or "")
    assert unfusable_options(base([p]), [0]) is None  # the defaults fuse


def test_a_subclass_is_not_fused():
    class MySGD(torch.optim.SGD):
        pass
    p = nn.Parameter(torch.zeros(3))
    assert "MySGD" in unfusable_options(MySGD([p], lr=0.1), [0])
