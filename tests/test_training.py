"""Checkpoint/resume (tnlayers.training): a resumed run replays the uninterrupted one bit for bit, with
SAM/DAS state, scheduler, GradScaler and every RNG; saves are atomic; bad files are refused untouched."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import tnlayers
from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from tnlayers.optim import DAS, SAM, disable_running_stats
from tnlayers.training import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state

POOL_X = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(0))
POOL_Y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(1))


def small_model(seed):
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    return tnlayers.tensorize(dense, format="tr", rank=2, progress=False)


def batch():
    """Data order from torch's RNG, augmentation noise from numpy's and Python's: all three must resume."""
    idx = torch.randperm(len(POOL_X))[:12]
    noise = torch.from_numpy(np.random.standard_normal((12, 3, 8, 8)).astype("float32"))
    return POOL_X[idx] + 0.1 * random.random() * noise, POOL_Y[idx]


def build(kind, seed):
    model = small_model(seed)
    if kind == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    else:
        opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.05, alpha_schedule="cosine", total_steps=12,
                  lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if kind == "das-amp" else None
    return model, opt, scheduler, scaler


def train(kind, model, opt, scheduler, scaler, steps):
    losses = []
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        x, y = batch()
        if kind == "sam":
            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            first = True

            def sam_closure():  # BatchNorm statistics from the unperturbed pass only
                nonlocal first
                if first:
                    first = False
                    return closure()
                with disable_running_stats(model):
                    return closure()
            loss = opt.step(sam_closure)
        else:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                loss = loss_fn(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        scheduler.step()
        losses.append(loss.item())
    return losses


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("kind", ["das", "sam", "das-amp"])
def test_resume_replays_the_uninterrupted_run(tmp_path, kind):
    seed_all(123)
    full = build(kind, seed=5)
    expected = train(kind, *full, steps=10)

    seed_all(123)
    first = build(kind, seed=5)
    head = train(kind, *first, steps=4)
    save_checkpoint(tmp_path / "ckpt.pt", first[0], first[1], first[2], first[3], step=3, extra={"best": 0.5})
    seed_all(999)  # whatever happens in between (a new process) must not matter
    torch.rand(17)
    resumed = build(kind, seed=77)  # a different initialization, overwritten by the checkpoint
    info = load_checkpoint(tmp_path / "ckpt.pt", *resumed)
    assert info == {"step": 3, "extra": {"best": 0.5}}
    tail = train(kind, *resumed, steps=6)

    assert head + tail == expected
    for a, b in zip(full[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    if kind != "sam":
        assert resumed[1].steps_taken == full[1].steps_taken == 10


def test_resumed_optimizer_state_holds_momentum_and_das_counter(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    train("das", model, opt, scheduler, None, steps=2)
    save_checkpoint(tmp_path / "c.pt", model, opt, scheduler)
    model2, opt2, scheduler2, _ = build("das", seed=2)
    load_checkpoint(tmp_path / "c.pt", model2, opt2, scheduler2)
    assert opt2.steps_taken == 2 and scheduler2.last_epoch == 2
    assert len(opt2.state) == len(opt.state) > 0
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, scheduler, _ = build("das", seed=1)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, opt, scheduler, step=0)
    before = path.read_bytes()
    train("das", model, opt, scheduler, None, steps=1)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temporary file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, scheduler, step=1)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    fresh, fresh_opt, fresh_sched, _ = build("das", seed=2)
    assert load_checkpoint(path, fresh, fresh_opt, fresh_sched)["step"] == 0


def test_truncated_or_foreign_file_is_refused_before_anything_loads(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, scheduler)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    target, target_opt, _, _ = build("das", seed=2)
    snapshot = {k: v.clone() for k, v in target.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt", target, target_opt)
    with pytest.raises(ValueError, match="not a tnlayers checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt", target, target_opt)
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(tmp_path / "missing.pt", target)
    for key, value in target.state_dict().items():
        assert torch.equal(value, snapshot[key])
    assert torch.equal(torch.get_rng_state(), rng) and len(target_opt.state) == 0


def test_mismatching_or_non_finite_checkpoint_is_refused(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    save_checkpoint(tmp_path / "c.pt", model)
    other = tnlayers.tensorize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), format="tr",
                               rank=2, progress=False)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(tmp_path / "c.pt", other)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "c.pt", small_model(2), opt)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() == 3)[0, 0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model)
    target = small_model(3)
    snapshot = [p.clone() for p in target.parameters()]
    with pytest.raises(ValueError, match="non-finite"):
        load_checkpoint(tmp_path / "nan.pt", target)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), snapshot))


def test_bad_arguments_name_the_argument(tmp_path):
    model = small_model(0)
    with pytest.raises(TypeError, match="path"):
        save_checkpoint(3, model)
    with pytest.raises(TypeError, match="model"):
        save_checkpoint(tmp_path / "c.pt", "model")
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(tmp_path / "c.pt", model, optimizer=object())
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "c.pt", model, step=-1)
    with pytest.raises(TypeError, match="step"):
        save_checkpoint(tmp_path / "c.pt", model, step=1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "c.pt", model)
    with pytest.raises(ValueError, match="rng state"):
        set_rng_state({})


def test_rng_state_round_trip():
    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_saving_between_sam_half_steps_is_refused(tmp_path):
    model, opt, _, _ = build("sam", seed=0)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        save_checkpoint(tmp_path / "c.pt", model, opt)
    assert not (tmp_path / "c.pt").exists()
