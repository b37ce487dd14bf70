"""benchmarks/layers.py: its estimators against hand-computed values, and a tiny end-to-end run (untimed:
only that the script runs and writes every row and verdict)."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "layers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layers", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_uses_only_rounds_that_timed_both(bench):
    times = {"a": {0: 2.0, 1: 6.0, 2: 9.0, 4: 30.0}, "b": {0: 1.0, 1: 2.0, 3: 5.0, 4: 10.0}}
    # common rounds 0, 1, 4: ratios 2, 3, 3 -> median 3 (round 2 and 3 ran one side only)
    assert bench.paired(times, "a", "b") == 3.0
    assert bench.paired(times, "b", "a") == pytest.approx(1 / 3)


def test_summary_estimates_by_hand(bench):
    times = {"dense": {0: 10.0, 1: 14.0, 2: 12.0}, "tltorch factorized": {0: 6.0, 1: 9.0, 2: 8.0},
             "tnlayers auto": {0: 3.0, 1: 5.0, 2: 2.0}}
    row = dict(kind="conv", format="cp", rank=0.1, mode="inference", times=times,
               ms={k: min(v.values()) for k, v in times.items()})
    out = bench.summarize([row])
    # rival with the smallest minimum: tltorch factorized (6 ms); per-round auto/tl: 0.5, 0.556, 0.25
    assert row["vs_best"]["min"] == pytest.approx(2.0 / 6.0)
    assert row["vs_best"]["paired"] == pytest.approx(0.5)
    assert row["vs_dense"]["paired"] == pytest.approx(3.0 / 10.0)  # 0.3, 0.357, 0.1667
    assert row["speedup_tl"]["paired"] == pytest.approx(2.0)  # 2, 1.8, 4
    geo, worst, worst_inf = out["paired"]
    assert geo == pytest.approx(2.0) and worst is row and worst_inf is row


def test_tiny_grid_writes_every_row(bench, tmp_path):
    out = tmp_path / "layers.md"
    # tucker and tt: tltorch's CP linear, when installed, takes seconds per call to rebuild its weight
    bench.main(["--formats", "tucker", "tt", "--ranks", "0.1", "--batch", "2", "--size", "6", "--rows", "3",
                "--repeats", "2", "--sections", "conv", "linear", "--out", str(out)])
    text = out.read_text()
    assert "## Verdicts" in text and "## Conv2d" in text and "## Linear" in text
    rows = [line for line in text.splitlines() if line.startswith(("| tucker |", "| tt |"))]
    assert len(rows) == 2 * 2 * 2  # formats x modes, conv and linear
    assert text.count("target <=") == 4 and text.count("geometric-mean speed-up") == 2  # n/a without tltorch


@pytest.mark.parametrize("kind,fmt", [("conv", "tucker"), ("conv", "tt"), ("conv", "cp"), ("linear", "tt")])
def test_tltorch_layers_are_initialized(bench, kind, fmt):
    """tltorch 0.5's FactorizedConv leaves its factors as torch.empty garbage; timed like that, denormals and
    huge values slowed it up to 20x. Every rival must be built by its own init: finite, no denormals, not all
    zero, |w| < 1 (tltorch's TT init gives a weight std of ~1e-4 to 1e-5, not the 0.02 it asks for)."""
    pytest.importorskip("tltorch")
    import torch
    layers = bench.tltorch_layers(kind, fmt, 0.25, torch.device("cpu"))
    assert layers
    for impl, layer in layers.items():
        weight = layer.weight.to_tensor().detach()
        tiny = (weight != 0) & (weight.abs() < torch.finfo(weight.dtype).tiny)
        assert torch.isfinite(weight).all() and not tiny.any(), impl
        assert weight.std().item() > 0 and weight.abs().max().item() < 1.0, impl


def test_cpu_name_reads_the_first_processor(tmp_path, bench):
    import _machine  # on the path once the benchmark module is loaded
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 avx512f\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu amx_tile\n")
    assert _machine.cpu_name(str(info)) == "Example CPU 9000 (avx2, avx512f)"
    assert _machine.cpu_name(str(tmp_path / "missing"))  # falls back to the platform's name


def test_round_orders_vary_every_implementations_predecessor(bench):
    names = ["dense", "tltorch factorized", "tltorch reconstructed", "tnlayers dense", "tnlayers factorized",
             "tnlayers auto"]
    orders = bench.round_orders(names, 30)
    assert all(sorted(order) == sorted(names) for order in orders)
    before = {name: set() for name in names}
    for order in orders:
        for prev, name in zip(order, order[1:]):
            before[name].add(prev)
    assert all(len(prevs) >= 4 for prevs in before.values()), before  # a rotation gives 1 (+1 at the wrap)
    assert bench.round_orders(names, 30) == orders  # seeded: a rerun times the same orders
