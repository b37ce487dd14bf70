"""benchmarks/models.py: its measurements and estimators against hand-computed values, and a tiny end-to-end run
(untimed: only that every configuration runs in its own process and lands in the table, JSON and profile)."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _benchmarks import load_benchmark

import tnlayers
from tnlayers.models import cifar_resnet


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("models")


@pytest.fixture(scope="module")
def report():
    return load_benchmark("_models_report")


def test_tiny_run_writes_every_row_json_and_profile(bench, tmp_path):
    out = tmp_path / "models.md"
    bench.main(["--models", "tiny", "--formats", "tt", "--ranks", "0.25", "--modes", "eager", "--repeats", "1",
                "--steps", "2", "--warmup", "0", "--threads", "1", "--batch", "4", "--size", "8",
                "--profile", "tt 0.25", "--profile-steps", "1", "--out", str(out)])
    text = out.read_text()
    assert "## tiny, batch 4, 8x8" in text and "load average" in text and "- Command: `" in text and "; code: " in text
    dense_params = sum(p.numel() for p in cifar_resnet(8, widths=(4, 8, 16)).parameters())
    tt_params = sum(p.numel() for p in tnlayers.tensorize(cifar_resnet(8, widths=(4, 8, 16)), format="tt",
                                                          rank=0.25).parameters())
    rows = {}  # the first row of each variant: the time table's
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert f"| {dense_params:,} |" in rows["dense"] and f"| {tt_params:,} |" in rows["tt 0.25"]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = data["runs"]
    assert sorted(runs) == ["tiny | dense | eager", "tiny | tt 0.25 | eager"]
    convs = [name for name, m in cifar_resnet(8, widths=(4, 8, 16)).named_modules() if isinstance(m, nn.Conv2d)]
    for run in (runs["tiny | dense | eager"][0], runs["tiny | tt 0.25 | eager"][0]):
        assert "error" not in run, run
        assert len(run["train_s"]) == len(run["eval_s"]) == 2 and min(run["train_s"]) > 0
        assert run["peak_bytes"] >= run["before_bytes"] > 0 and run["saved_bytes"] > 0
    tt_run = runs["tiny | tt 0.25 | eager"][0]
    assert sum(tt_run["strategies_train"].values()) == sum(tt_run["strategies_eval"].values()) == len(convs)
    figures = data["figures"]["tiny"]
    assert figures["dense"]["train_eager_s"] == min(runs["tiny | dense | eager"][0]["train_s"])
    # profile: one row per conv, the dense nn.Conv2d forward dispatching exactly one op (aten::conv2d)
    dense_profile, tt_profile = data["profiles"]
    assert [name for name, r in dense_profile["modules"].items() if r["type"] == "Conv2d"] == convs
    assert all(dense_profile["modules"][name]["ops"] == dense_profile["modules"][name]["calls"] == 1 for name in convs)
    assert all(tt_profile["modules"][name]["type"] == "TTConv2d" for name in convs)
    assert "## Profile" in text and "### Top ops by self CPU time: tt 0.25" in text
    assert sum(line.startswith(tuple(f"| {name} |" for name in convs)) for line in text.splitlines()) == len(convs)


def test_unknown_profile_variant_is_refused_before_anything_runs(bench, tmp_path, capsys):
    out = tmp_path / "never.md"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--models", "tiny", "--formats", "tt", "--ranks", "0.25", "--profile", "tt 0.5", "--out", str(out)])
    assert exit_.value.code == 2
    assert "--profile ['tt 0.5']: not a variant of tiny; its variants: ['dense', 'tt 0.25']" in capsys.readouterr().err
    assert not out.exists()


def test_variants_per_model(bench):
    args = bench.argparse.Namespace(formats=["tt", "tr", "cp"], ranks=[0.1, 0.25], tr_ranks=[10, 15], no_table9=False)
    assert bench.variants("resnet20", args) == [("dense", None), ("tt", 0.1), ("tt", 0.25), ("tr", 10), ("tr", 15),
                                                ("cp", 0.1), ("cp", 0.25)]
    assert bench.variants("resnet18", args) == [("dense", None), ("tt", "table9"), ("tt", 0.1), ("tt", 0.25),
                                                ("tr", 0.1), ("tr", 0.25), ("cp", 0.1), ("cp", 0.25)]
    assert bench.parse_rank("10") == 10 and isinstance(bench.parse_rank("10"), int) and bench.parse_rank("0.1") == 0.1
    args.batched_weights = True  # each tensorized variant also with set_batched_weights, next to it
    assert bench.variants("resnet20", args)[:4] == [("dense", None), ("tt", 0.1), ("tt+batched", 0.1), ("tt", 0.25)]


def test_batched_variant_runs_with_batched_rebuilds(bench, tmp_path):
    out = tmp_path / "models.md"
    bench.main(["--models", "tiny", "--formats", "tr", "--tr-ranks", "3", "--modes", "eager", "--repeats", "1",
                "--steps", "2", "--warmup", "1", "--threads", "1", "--batch", "4", "--size", "8", "--profile",
                "--batched-weights", "--out", str(out)])
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert sorted(runs) == ["tiny | dense | eager", "tiny | tr 3 | eager", "tiny | tr+batched 3 | eager"]
    plain, batched = runs["tiny | tr 3 | eager"][0], runs["tiny | tr+batched 3 | eager"][0]
    assert "error" not in batched and plain["params"] == batched["params"]
    model = bench.build("tiny", "tr+batched", 3, "cpu")
    assert len(model._forward_pre_hooks) == 1 and not bench.build("tiny", "tr", 3, "cpu")._forward_pre_hooks


class _Keep(torch.autograd.Function):
    """Returns x * w; saves ``extra``, a view of it and ``w`` (a parameter) when ``save``, nothing else."""

    @staticmethod
    def forward(ctx, x, w, extra, save):
        if save:
            ctx.save_for_backward(extra, extra[:1], w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _Net(nn.Module):
    def __init__(self, save):
        super().__init__()
        self.w, self.save = nn.Parameter(torch.ones(3)), save
        self.extra = torch.zeros(50, 7)

    def forward(self, x):
        return _Keep.apply(x, self.w, self.extra, self.save)


def test_saved_bytes_counts_each_storage_once_and_no_parameter(bench):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with_extra, without = bench.saved_bytes(_Net(True), x, y), bench.saved_bytes(_Net(False), x, y)
    assert with_extra - without == 50 * 7 * 4  # the extra tensor's float32 bytes, once despite its view; w not counted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_sees_a_touched_buffer(bench):
    memory = bench.PeakMemory(torch.device("cpu"))
    memory.reset()
    if not memory.reset_works:
        pytest.skip("/proc/self/clear_refs is not writable here")
    start = memory.current()
    buffer = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page written
    del buffer
    assert memory.peak() - start >= 60 * 2 ** 20


def _run(train, evals, compile_s=None, mode="eager"):
    run = dict(spec=dict(mode=mode), train_s=train, eval_s=evals, train_cpu_s=[2 * t for t in train],
               eval_cpu_s=[3 * t for t in evals], params=10, peak_bytes=300 * 2 ** 20,
               before_bytes=200 * 2 ** 20, strategies_train={"dense": 1, "factorized": 2},
               strategies_eval={"dense": 3}, batch=4, size=8, saved_bytes=2 ** 20)
    if compile_s:
        run.update(compile_train_s=compile_s[0], compile_eval_s=compile_s[1])
    return run


def test_report_ratios_and_targets_by_hand(report):
    results = {
        "m | dense | eager": [_run([0.20, 0.25], [0.05]), _run([0.22], [0.04])],
        "m | tt 0.1 | eager": [_run([0.10, 0.30], [0.06]), _run([0.132], [0.044])],
        "m | dense | compile": [_run([0.18], [0.05], (30.0, 10.0), "compile"),
                                _run([0.19], [0.05], (9.0, 3.0), "compile")],
        "m | tt 0.1 | compile": [_run([0.12], [0.02], (40.0, 12.0), "compile"),
                                 dict(spec=dict(mode="compile"), error="exit 1: boom")],
    }
    lines, figures = report.model_section(SimpleNamespace(device="cpu"), "m", ["dense", "tt 0.1"], results)
    (time_row, memory_row), (_, dense_memory) = ([line for line in lines if line.startswith(f"| {name} |")]
                                                 for name in ("tt 0.1", "dense"))
    cells = [c.strip() for c in time_row.split("|")[1:-1]]
    # train eager: min 0.10 vs dense min 0.20 -> 0.50; paired: rounds 0.10/0.20 and 0.132/0.22 -> median 0.55
    assert cells[3:5] == ["100.0", "0.50 / 0.55"]
    # compiled: 0.12 vs 0.18 (its second process failed: one paired round) -> 0.67 / 0.67; compiled / eager 1.20
    assert cells[5:8] == ["120.0", "0.67 / 0.67", "1.20"]
    # eval: 0.044 vs 0.04 -> 1.10; paired 0.06/0.05 = 1.2, 0.044/0.04 = 1.1 -> 1.15
    assert cells[8:10] == ["44.0", "1.10 / 1.15"]
    assert cells[2] == "1/2, 3/0"
    assert "| 30 + 10 / 9 + 3 |" in dense_memory  # the first process compiled cold; the best later one
    assert "compile: exit 1: boom" in memory_row
    assert figures["tt 0.1"]["train_eager_s"] == 0.10 and figures["tt 0.1"]["paired_train_eager"] == pytest.approx(0.55)
    text = "\n".join(lines)
    assert "- Eager train step <= 1.0x dense: met" in text
    assert "- Eager eval <= 1.0x dense: MISSED: tt 0.1 1.10" in text
    assert "- TT/CP/Tucker at 10%: eager train step <= 0.5x dense: met" in text  # 0.50 is not above 0.5
    assert "- Compiled train step faster than eager (tensorized): MISSED: tt 0.1 1.20" in text
    by_cpu, _ = report.model_section(SimpleNamespace(device="cpu", clock="cpu"), "m", ["dense", "tt 0.1"], results)
    cells = [c.strip() for c in next(line for line in by_cpu if line.startswith("| tt 0.1 |")).split("|")[1:-1]]
    assert cells[3] == "200.0" and cells[8] == "132.0"  # the CPU-time fields: 2 x 0.10 s, 3 x 0.044 s


def test_quick_sets_defaults_the_command_line_still_overrides(bench, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run_all", lambda args, write: seen.append(args) or {})
    monkeypatch.setattr(bench, "profiles", lambda args, chosen: [])
    bench.main(["--quick", "--out", str(tmp_path / "a.md")])
    bench.main(["--quick", "--repeats", "1", "--ranks", "0.25", "--models", "tiny", "--out", str(tmp_path / "b.md")])
    quick, named = seen
    assert (quick.models, quick.ranks, quick.tr_ranks, quick.repeats, quick.steps, quick.warmup) == (
        ["resnet20"], [0.1], [10], 2, 5, 2)
    assert (named.models, named.ranks, named.repeats, named.steps) == (["tiny"], [0.25], 1, 5)
    assert "## resnet20" in (tmp_path / "a.md").read_text()  # nothing ran: the table says "-", not a crash


def test_targets_never_call_a_missing_figure_met(report):
    figures = {"dense": dict(train_eager_s=0.2, eval_eager_s=None, peak_eager_bytes=10),
               "tt 0.1": dict(train_eager_s=0.09, eval_eager_s=None, peak_eager_bytes=None, train_compiled_s=None),
               "cp 0.1": dict(train_eager_s=0.12, eval_eager_s=None, peak_eager_bytes=9, train_compiled_s=None)}
    lines = report.targets(figures)
    assert lines[0] == "- Eager train step <= 1.0x dense: met"
    assert lines[1] == "- Eager eval <= 1.0x dense: not measured"
    assert lines[2] == "- TT/CP/Tucker at 10%: eager train step <= 0.5x dense: MISSED: cp 0.1 0.60"
    assert lines[3] == "- Peak training memory (eager) <= dense: met (not measured: tt 0.1)"
    assert lines[4] == "- Compiled train step faster than eager (tensorized): not measured"
