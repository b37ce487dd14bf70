"""benchmarks/step_time.py and adapter_step.py end to end at toy sizes (untimed: the scripts run, write
every method's row and the settings, and their statistics are consistent with each other)."""
import json
import sys

import pytest
from _benchmarks import BENCH, load_benchmark as load

def check_stats(medians, spread, methods):
    assert list(medians) == methods
    for method in methods:
        low, high = spread[method]
        assert 0 < low <= medians[method][0] <= high


@pytest.mark.parametrize("keep", [False, True])
def test_step_time_runs_and_reports(tmp_path, keep):
    out = tmp_path / "step.md"
    argv = ["--width", "4", "--blocks", "1", "--batch", "4", "--size", "8", "--rounds", "2", "--warmup", "1",
            "--steps", "1", "--methods", "SGD", "DAS", "--out", str(out)]
    load("step_time").main(argv + (["--keep-freed-memory"] if keep else []))
    text = out.read_text()
    assert "| SGD |" in text and "| DAS |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["keep_freed_memory"] is (keep and sys.platform.startswith("linux"))
    check_stats(data["result"]["medians"], data["result"]["spread"], ["SGD", "DAS"])
    assert data["result"]["samples"] == 2


def test_adapter_step_runs_and_reports(tmp_path):
    out = tmp_path / "adapter.md"
    load("adapter_step").main(["--formats", "lora", "--dim", "32", "--depth", "1", "--heads", "2", "--batch", "2",
                               "--seq", "8", "--rounds", "2", "--warmup", "1", "--steps", "1",
                               "--keep-freed-memory", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    result = data["results"]["lora"]
    check_stats(result["medians"], result["spread"], ["Adam", "SAM", "DAS"])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| lora |")]
    assert [row.split("|")[3].strip() for row in rows] == ["Adam", "SAM", "DAS"]


def test_adapter_step_peft_runs_and_reports(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = tmp_path / "peft.md"
    load("adapter_step").main(["--peft", "--batch", "2", "--seq", "8", "--rounds", "2", "--warmup", "1", "--steps", "1",
                               "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["results"]) == ["gpt2", "roberta"] and data["settings"]["dim"] == 32
    for name, layers in (("gpt2", 2), ("roberta", 6)):  # LoRA on c_attn / on query, key and value of 2 layers
        result = data["results"][name]
        check_stats(result["medians"], result["spread"], ["AdamW", "DAS", "SAM"])
        assert result["lora_layers"] == result["core_groups"] == layers and result["cores_rescaled_by_das"] == 2 * layers
    rows = [line.split("|")[4].strip() for line in out.read_text().splitlines() if line.startswith("| gpt2 |")]
    assert rows == ["AdamW", "DAS", "SAM"]


def test_default_outputs_never_touch_committed_results(tmp_path, monkeypatch):
    """Without --out a benchmark writes to a git-ignored folder: rerunning one never overwrites a committed table."""
    import subprocess

    output = load("_output")
    monkeypatch.setattr(output, "LOCAL", tmp_path / "local")
    assert output.default_out("cpu-layers.md") == tmp_path / "local" / "cpu-layers.md"
    assert (tmp_path / "local").is_dir()
    root = BENCH.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("benchmarks/results/local/cpu-layers.md", "examples/results/local/norm_dynamics.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    for script in ("layers", "step_time", "adapter_step", "optimizer_step", "models", "compress", "layer_overhead"):
        source = (BENCH / f"{script}.py").read_text()
        assert "default_out(" in source and '/ "results" /' not in source, script


def test_weight_cache_benchmark_runs_and_agrees(tmp_path):
    """benchmarks/weight_cache.py at one call per variant: every row written, every variant the same output."""
    out = tmp_path / "wc.md"
    text = load("weight_cache").main(["--device", "cpu", "--calls", "1", "--warmup", "0", "--out", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 4 and all(line.endswith("| True |") for line in rows)


def test_layer_overhead_benchmark_runs_and_agrees(tmp_path):
    """benchmarks/layer_overhead.py at one call per variant: a row per layer, every reference (the nn layer with
    the layer's weight, an opt_einsum rebuild + F.conv2d, the layer's own chain) the layer's output."""
    out = tmp_path / "ov.md"
    text = load("layer_overhead").main(["--calls", "1", "--rounds", "1", "--warmup", "0", "--out", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 6 and all(line.endswith("| True |") for line in rows)
