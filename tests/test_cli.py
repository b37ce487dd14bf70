"""The README's main job, shortened: `tnlayers demo` tensorizes a ResNet-20 and trains it with SGD, SAM
and DAS on real digits."""
import json
import subprocess
import sys

import pytest
import torch

from tnlayers.cli import main


def test_short_demo_learns_and_reports(tmp_path, capsys):
    out, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--steps", "40", "--lr", "0.05", "--seeds", "2", "--noise", "0.2", "--quiet", "--out", str(out),
                 "--plot", str(plot)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["optimizer"], r["seed"]) for r in rows] == [(o, s) for s in (0, 1) for o in ("SGD", "SAM", "DAS")]
    for r in rows:
        assert r["params"] == 123_076  # TR-ResNet-20 at the paper's rank 15 (tnlayers.models.tr_resnet20)
        assert r["test_accuracy"] > 0.2, r  # 10 classes: chance is 0.1
        assert len(r["losses"]) == 40 and min(r["losses"][-5:]) < r["losses"][0]
    by = {(r["optimizer"], r["seed"]): r for r in rows}
    # paired runs: the same initialization and data for every optimizer of a seed, so their first losses agree
    for seed in (0, 1):
        assert by["SGD", seed]["losses"][0] == by["SAM", seed]["losses"][0] == by["DAS", seed]["losses"][0]
    assert by["SGD", 0]["losses"][0] != by["SGD", 1]["losses"][0]
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "40% of the training labels" not in printed and "20% of the training labels flipped" in printed
    assert "DAS - SGD" in printed and "SAM - SGD" in printed


def test_demo_label_noise_is_the_benchmarks(tmp_path):
    """The demo flips the labels the label-noise study flips (tnlayers.digits, shared), each to another class."""
    from tnlayers.digits import digits, symmetric_label_noise
    (_, y), _ = digits(0)
    noisy = symmetric_label_noise(y, 0.4, seed=3)
    flipped = noisy != y
    assert 0.35 < float(flipped.float().mean()) < 0.45
    assert torch.equal(symmetric_label_noise(y, 0.4, seed=3), noisy) and not torch.equal(
        symmetric_label_noise(y, 0.4, seed=4), noisy)


def test_info_module_entry_point_and_bad_arguments(capsys):
    assert main(["info"]) == 0
    assert "formats" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "tnlayers", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "tnlayers" in out.stdout
    for bad in (["demo", "--steps", "0"], ["demo", "--rank", "-1"], ["frobnicate"]):
        with pytest.raises(SystemExit):
            main(bad)


def test_no_command_prints_the_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tnlayers") and "demo" in out and "info" in out and "--version" in out
    run = subprocess.run([sys.executable, "-m", "tnlayers"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: tnlayers") and run.stderr == ""


def test_version(capsys):
    import tnlayers
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tnlayers {tnlayers.__version__}\n"
