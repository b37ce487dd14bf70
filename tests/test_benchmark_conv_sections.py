"""benchmarks/layers.py's Conv1d, Conv3d and depthwise sections: a tiny end-to-end run (untimed: only that every
row, table and verdict is written, and that tensorly-torch's rivals exist where it has the layer)."""
import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "layers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layers_sections", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_conv_sections_write_every_row(bench, tmp_path):
    out = tmp_path / "layers.md"
    bench.main(["--formats", "tucker", "tr", "--ranks", "0.25", "--batch", "2", "--size", "6", "--repeats", "2",
                "--sections", "conv1d", "conv3d", "depthwise", "--out", str(out)])
    text = out.read_text()
    for heading in ("## Conv1d 64 -> 64, k=3, input 2x64x36", "## Conv3d 64 -> 64, 3x3x3, input 1x64x1x3x3",
                    "## Depthwise Conv2d 64 -> 64 (groups=64), 3x3, input 2x64x6x6"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith(("| tucker |", "| tr |"))]
    assert len(rows) == 3 * 2 * 2  # sections x formats x modes
    assert text.count("target <=") == 6 and text.count("geometric-mean speed-up") == 3
    assert "- depthwise: geometric-mean speed-up over tltorch's default: n/a" in text  # tltorch has no grouped conv


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_tltorch_rivals_take_1d_and_3d_kernels(bench, kind):
    pytest.importorskip("tltorch")
    layers = bench.tltorch_layers(kind, "cp", 0.25, torch.device("cpu"))
    assert set(layers) == {"factorized", "reconstructed", "mobilenet"}
    x = torch.randn(1, 64, *((7,) if kind == "conv1d" else (3, 4, 5)))
    ours = bench.ours(kind, "cp", 0.25, "dense", torch.device("cpu"))
    for layer in layers.values():
        assert layer(x).shape == ours(x).shape
    assert bench.tltorch_layers("depthwise", "cp", 0.25, torch.device("cpu")) == {}
