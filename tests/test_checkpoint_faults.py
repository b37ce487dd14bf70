"""Checkpoint faults (issue 17): damaged files, non-finite buffers, meta models, dead saves' temporaries,
another optimizer kind's state, a full disk, extra= values weights_only refuses, a missing model, the umask
and saves killed at random points. Each is handled or refused loudly, and nothing is half-restored."""
import copy
import enum
import errno
import hashlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tnlayers
from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from test_training import build, small_model, train
from tnlayers.optim import DAS, SAM
from tnlayers.training import get_rng_state, load_checkpoint, save_checkpoint

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


def state_equal(a, b) -> bool:
    """Deep equality of nested state (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def model_copy(model):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in model.state_dict().items()}


# 1. integrity ----------------------------------------------------------------------------------------------

def test_file_is_a_plain_torch_file_with_its_sha256(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    path = save_checkpoint(tmp_path / "c.pt", model, opt, scheduler, step=4)
    payload = torch.load(path, weights_only=True)  # no tnlayers needed to read it
    assert payload["step"] == 4 and torch.equal(payload["model"]["0.bias"], model.state_dict()["0.bias"])
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(b"tnlayers-sha256:") and data.endswith(comment)
    body = data[:-len(comment) - 2] + b"\0\0"  # hashed with the zip comment length still 0
    assert comment[len(b"tnlayers-sha256:"):].decode() == hashlib.sha256(body).hexdigest()


def test_flipped_bit_anywhere_is_refused_before_anything_loads(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    train("das", model, opt, scheduler, None, steps=1)
    good = save_checkpoint(tmp_path / "c.pt", model, opt, scheduler).read_bytes()
    weight = max(model.parameters(), key=torch.numel).detach()
    in_tensor = good.find(weight.numpy().tobytes()) + 4 * (weight.numel() // 2)
    assert in_tensor > 0
    positions = sorted({in_tensor, *range(0, 96), *range(len(good) - 160, len(good)),
                        *range(96, len(good) - 160, 37)})
    target, target_opt, target_sched, _ = build("das", seed=2)
    before = model_copy(target)
    bad = tmp_path / "bad.pt"
    for position in positions:
        data = bytearray(good)
        data[position] ^= 1 << (position % 8)
        bad.write_bytes(bytes(data))
        if position == in_tensor:  # the reference: without a check this file loads, with wrong values
            raw = torch.load(bad, weights_only=True)["model"]
            assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())
        with pytest.raises(ValueError, match="corrupt"):
            load_checkpoint(bad, target, target_opt, target_sched)
    assert state_equal(model_copy(target), before) and len(target_opt.state) == 0
    with pytest.raises(ValueError, match=r"corrupt \(checksum mismatch\) and was not loaded"):
        data = bytearray(good)
        data[in_tensor] ^= 0x10
        bad.write_bytes(bytes(data))
        load_checkpoint(bad, target)


def test_version_1_file_without_checksum_still_loads(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    train("das", model, opt, scheduler, None, steps=2)
    old = {"format": "tnlayers-checkpoint", "version": 1, "step": 7, "extra": {"best": 0.5},
           "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
           "scaler": None, "rng": get_rng_state()}
    torch.save(old, tmp_path / "v1.pt")  # what tnlayers 1 wrote: no zip comment, no kinds
    target, target_opt, target_sched, _ = build("das", seed=2)
    assert load_checkpoint(tmp_path / "v1.pt", target, target_opt, target_sched) == {"step": 7,
                                                                                      "extra": {"best": 0.5}}
    assert state_equal(target.state_dict(), model.state_dict()) and target_opt.steps_taken == 2


# 2. non-finite buffers ---------------------------------------------------------------------------------------

def test_non_finite_buffer_is_refused_naming_it(tmp_path):
    model = small_model(1)
    with torch.no_grad():
        model[1].running_var[3] = float("nan")
    save_checkpoint(tmp_path / "c.pt", model)
    target = small_model(2)
    before = model_copy(target)
    with pytest.raises(ValueError, match=r"non-finite values in buffer '1\.running_var'"):
        load_checkpoint(tmp_path / "c.pt", target)
    assert state_equal(model_copy(target), before)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))


def test_buffer_non_finite_by_design_loads(tmp_path):
    torch.manual_seed(0)
    source = Masked()
    save_checkpoint(tmp_path / "c.pt", source)
    target = Masked()
    load_checkpoint(tmp_path / "c.pt", target)
    assert state_equal(target.state_dict(), source.state_dict())


# 3. meta model -----------------------------------------------------------------------------------------------

def plain_net():
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def test_meta_model_is_refused_with_what_to_do(tmp_path):
    torch.manual_seed(0)
    source = plain_net()
    save_checkpoint(tmp_path / "c.pt", source)
    with torch.device("meta"):
        target = plain_net()
    with pytest.raises(ValueError, match=r"meta device \(\['0\.weight'.*model\.to_empty\(device=\.\.\.\)"):
        load_checkpoint(tmp_path / "c.pt", target)
    target.to_empty(device="cpu")
    load_checkpoint(tmp_path / "c.pt", target)
    assert state_equal(target.state_dict(), source.state_dict())


# 4. temporaries of dead saves --------------------------------------------------------------------------------

def fork_mid_save(path, model, then):
    """A child process whose save has written part of its temporary file when ``then()`` runs in it."""
    pid = os.fork()
    if pid == 0:
        try:
            def stalled_save(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04" + bytes(200_000))
                f.flush()
                then()
            torch.save = stalled_save
            save_checkpoint(path, model, step=1)
        finally:
            os._exit(1)
    return pid


def die_mid_save(path, model):
    pid = fork_mid_save(path, model, then=lambda: os.kill(os.getpid(), signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@fork_only
def test_dead_saves_temporary_is_removed_by_the_next_save(tmp_path):
    model = small_model(1)
    path = save_checkpoint(tmp_path / "last.pt", model, step=0)
    before = path.read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    die_mid_save(path, model)
    die_mid_save(path, model)
    left = sorted(set(os.listdir(tmp_path)) - {"last.pt", "notes.txt"})
    assert left and all(name.startswith(".last.pt") for name in left)  # the second save may remove the first
    assert path.read_bytes() == before
    save_checkpoint(path, model, step=2)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "notes.txt"]


@fork_only
def test_live_saves_temporary_is_left_alone(tmp_path):
    """A temporary whose writer is alive (a concurrent save, here stalled mid-write) is not deleted under it."""
    path = tmp_path / "last.pt"
    pid = fork_mid_save(path, small_model(1), then=lambda: time.sleep(60))
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(tmp_path)) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        live = os.listdir(tmp_path)
        assert len(live) == 1
        save_checkpoint(path, small_model(2))
        assert sorted(os.listdir(tmp_path)) == sorted(live + ["last.pt"])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    save_checkpoint(path, small_model(2))
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/stat").exists(), reason="needs /proc (Linux)")
def test_temporary_of_an_earlier_process_with_this_pid_is_removed(tmp_path):
    """A restarted container's process often gets the pid the killed one had: its start time tells them apart.
    The name is .{target}.tmp-{host}-{pid}-{start time}-{random}."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    earlier = tmp_path / f".last.pt.tmp-{host}-{os.getpid()}-1-0123abcd"  # started 1 tick after boot
    earlier.write_bytes(b"partial")
    save_checkpoint(tmp_path / "last.pt", small_model(1))
    assert os.listdir(tmp_path) == ["last.pt"]


# 5. another kind's state; rollback ---------------------------------------------------------------------------

def make_optimizer(kind, model):
    if kind == "DAS(SGD)":
        return DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.05, momentum=0.9)
    if kind == "SAM(SGD)":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    if kind == "Adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def one_step(model, opt):
    x = torch.randn(4, 3, 8, 8)
    loss = model(x).square().mean()
    loss.backward()
    if isinstance(opt, SAM):
        opt.first_step()
        model(x).square().mean().backward()
        opt.second_step()
    else:
        opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("saved,given", [("DAS(SGD)", "SAM(SGD)"), ("Adam", "DAS(SGD)"), ("SGD", "DAS(SGD)")])
def test_other_optimizer_kinds_state_is_refused_untouched(tmp_path, saved, given):
    model = small_model(1)
    opt = make_optimizer(saved, model)
    one_step(model, opt)
    save_checkpoint(tmp_path / "c.pt", model, opt)
    target = small_model(2)
    target_opt = make_optimizer(given, target)
    one_step(target, target_opt)
    before, before_opt, rng = model_copy(target), copy.deepcopy(target_opt.state_dict()), torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"{saved.replace('(', '[(]').replace(')', '[)]')} optimizer.*"
                                         rf"{given.replace('(', '[(]').replace(')', '[)]')}"):
        load_checkpoint(tmp_path / "c.pt", target, target_opt)
    assert state_equal(model_copy(target), before)
    assert state_equal(target_opt.state_dict(), before_opt)
    assert torch.equal(torch.get_rng_state(), rng)
    one_step(target, target_opt)  # the optimizer still works


def test_other_scheduler_kind_is_refused(tmp_path):
    model, opt, scheduler, _ = build("das", seed=1)
    save_checkpoint(tmp_path / "c.pt", model, opt, scheduler)
    target, target_opt, _, _ = build("das", seed=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(target_opt, T_max=10)
    before = copy.deepcopy(cosine.state_dict())
    with pytest.raises(ValueError, match="StepLR scheduler.*CosineAnnealingLR"):
        load_checkpoint(tmp_path / "c.pt", target, target_opt, cosine)
    assert cosine.state_dict() == before and len(target_opt.state) == 0


class Versioned(nn.Module):
    """A module whose extra state refuses another version mid-load (after earlier modules were copied)."""

    def __init__(self, version):
        super().__init__()
        self.version = version

    def forward(self, x):
        return x

    def get_extra_state(self):
        return {"version": self.version}

    def set_extra_state(self, state):
        if state["version"] != self.version:
            raise RuntimeError(f"version {state['version']} cannot load into version {self.version}")


def test_failing_restore_step_rolls_everything_back(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 4), Versioned(1), nn.Linear(4, 2))
    opt = DAS(source.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1, momentum=0.9)
    source(torch.randn(3, 4)).sum().backward()
    opt.step()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()
    save_checkpoint(tmp_path / "c.pt", source, opt, scheduler, step=1)

    target = nn.Sequential(nn.Linear(4, 4), Versioned(2), nn.Linear(4, 2))
    target_opt = DAS(target.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1, momentum=0.9)
    target_sched = torch.optim.lr_scheduler.StepLR(target_opt, step_size=1, gamma=0.5)
    before = model_copy(target)
    before_opt, before_sched = copy.deepcopy(target_opt.state_dict()), copy.deepcopy(target_sched.state_dict())
    rng = torch.get_rng_state()
    torch.rand(1)
    with pytest.raises(RuntimeError, match="version 1 cannot load into version 2"):
        load_checkpoint(tmp_path / "c.pt", target, target_opt, target_sched)
    assert state_equal(model_copy(target), before)  # the first Linear, copied before the failure, is back
    assert state_equal(target_opt.state_dict(), before_opt) and target_opt.steps_taken == 0
    assert target_sched.state_dict() == before_sched and target_opt.param_groups[0]["lr"] == 0.1
    assert not torch.equal(torch.get_rng_state(), rng)  # the RNG was not restored either


# 6. disk full --------------------------------------------------------------------------------------------------

class FullDisk:
    """A file on a device that fills up after ``room`` bytes."""

    def __init__(self, file, room):
        self._file, self._room = file, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    path = save_checkpoint(tmp_path / "last.pt", model, step=0)
    before = path.read_bytes()
    with torch.no_grad():
        model.weight.add_(1)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k), room=100_000))
    with pytest.raises(OSError, match=r"no space left on device while writing checkpoint '.*last\.pt'; "
                                      r"the previous checkpoint at '.*last\.pt' is intact") as caught:
        save_checkpoint(path, model, step=1)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path, nn.Linear(256, 256))["step"] == 0


# 7. extra= values weights_only refuses --------------------------------------------------------------------------

class Color(str, enum.Enum):
    RED = "red"


ALLOWED = [1, 2.5, True, None, "s", b"b", 1 + 2j, torch.ones(2), nn.Parameter(torch.ones(1)), torch.float16,
           torch.device("cpu"), torch.Size([2]), (1, [2, {"a": 3}]), OrderedDict(a=1), {1, 2}, {(1, 2): "k"}]
REFUSED = [np.float64(0.9), np.arange(3), slice(1, 2), Path("x"), defaultdict(int), Color.RED]


def weights_only_accepts(value) -> bool:
    """The reference: what torch.load(weights_only=True) itself does with the value."""
    buffer = io.BytesIO()
    torch.save({"v": value}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("value", ALLOWED + REFUSED, ids=lambda v: type(v).__name__)
def test_extra_is_refused_at_save_exactly_when_weights_only_would_refuse_it(tmp_path, value):
    model = nn.Linear(2, 2)
    if weights_only_accepts(value):
        save_checkpoint(tmp_path / "c.pt", model, extra={"v": value})
        assert state_equal(load_checkpoint(tmp_path / "c.pt", model)["extra"]["v"], value)
    else:
        with pytest.raises(TypeError, match=rf"extra\['v'\] is a .*{type(value).__name__}.*weights_only"):
            save_checkpoint(tmp_path / "c.pt", model, extra={"v": value})
        assert not (tmp_path / "c.pt").exists()


def test_extra_refusal_names_the_nested_key(tmp_path):
    history = [{"acc": 0.5}, {"acc": np.float32(0.7)}]
    with pytest.raises(TypeError, match=r"extra\['history'\]\[1\]\['acc'\] is a numpy\.float32"):
        save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), extra={"history": history})


def test_foreign_type_in_file_is_named_at_load(tmp_path):
    model = nn.Linear(2, 2)
    torch.save({"format": "tnlayers-checkpoint", "version": 1, "step": 1, "extra": {"best": np.float64(0.9)},
                "model": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None,
                "rng": get_rng_state()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"holds an object of type numpy\.\S*scalar.*weights_only=False") as caught:
        load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2))
    assert "corrupt" not in str(caught.value)
    assert load_checkpoint(tmp_path / "c.pt", model, weights_only=False)["extra"]["best"] == 0.9


# 8. no model --------------------------------------------------------------------------------------------------

def test_checkpoint_without_model_is_refused(tmp_path):
    torch.save({"format": "tnlayers-checkpoint", "version": 1, "step": 3, "extra": {}, "optimizer": None,
                "rng": get_rng_state()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="holds no model state"):
        load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2))


# 9. umask -----------------------------------------------------------------------------------------------------

UMASK_PROBE = """
import os, sys
real = os.umask
real(0o027)
calls = []
os.umask = lambda mask: calls.append(oct(mask)) or real(mask)
import torch, tnlayers.training
imported = list(calls)
tnlayers.training.save_checkpoint(sys.argv[1], torch.nn.Linear(2, 2))
print(imported, calls, oct(os.stat(sys.argv[1]).st_mode & 0o777))
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_import_and_save_leave_the_umask_alone(tmp_path):
    code_root = str(Path(tnlayers.__file__).resolve().parents[1])  # the tnlayers this test imported
    env = {**os.environ, "PYTHONPATH": code_root, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", UMASK_PROBE, str(tmp_path / "c.pt")], capture_output=True,
                         text=True, cwd=code_root, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]", "0o640"]  # as torch.save: 0o666 & ~umask, umask never set


# 10. fault injection ---------------------------------------------------------------------------------------------

def versioned_linear(version):
    model = nn.Linear(2048, 1024)  # 8 MB: a write takes long enough to be cut
    with torch.no_grad():
        model.weight.fill_(version + 1)
        model.bias.fill_(-version)
    return model


def save_until_killed(path, versions, first_step):
    """The child: save step k with version k % 2, forever (no computation, only saving)."""
    try:
        step = first_step
        while True:
            save_checkpoint(path, versions[step % 2], step=step, extra={"version": step % 2})
            step += 1
    finally:
        os._exit(1)


@fork_only
def test_killed_saves_always_leave_a_complete_checkpoint(tmp_path):
    rng = random.Random(17)
    versions = [versioned_linear(0), versioned_linear(1)]
    path = tmp_path / "last.pt"
    save_checkpoint(path, versions[0], step=0, extra={"version": 0})  # a checkpoint exists before any kill
    probe, last, kills, loads, newer, temps_after_kill = nn.Linear(2048, 1024), 0, 0, 0, 0, 0
    start = time.monotonic()
    while kills < 24:
        pid = os.fork()
        if pid == 0:
            save_until_killed(path, versions, last + 1)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        temps_after_kill += len(os.listdir(tmp_path)) - 1
        info = load_checkpoint(path, probe, restore_rng=False)  # always complete: the previous or a newer one
        loads += 1
        step = info["step"]
        assert step >= last and info["extra"] == {"version": step % 2}
        newer += step > last
        assert state_equal(probe.state_dict(), versions[step % 2].state_dict())
        last = step + 1  # the next save (this process) removes the killed save's temporary
        save_checkpoint(path, versions[last % 2], step=last, extra={"version": last % 2})
        assert os.listdir(tmp_path) == ["last.pt"]
    print(f"fault injection: {kills} kills, {loads} complete loads ({newer} of them the killed child's newer "
          f"checkpoint), {temps_after_kill} temporary files left by killed saves (each removed by the next save), "
          f"last step {last}, {time.monotonic() - start:.1f} s")
    assert temps_after_kill >= 1  # some kills did land mid-write
