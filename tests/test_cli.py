"""The README's main job, shortened: `tnlayers demo` tensorizes a ResNet-20 and trains it with SGD, SAM
and DAS on real digits."""
import json
import subprocess
import sys

import pytest

from tnlayers.cli import main


def test_short_demo_learns_and_reports(tmp_path, capsys):
    out, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--steps", "30", "--quiet", "--out", str(out), "--plot", str(plot)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["optimizer"]) for r in rows] == [
        ("ResNet-20", "SGD"), ("TR-ResNet-20 r=8", "SGD"), ("TR-ResNet-20 r=8", "SAM"), ("TR-ResNet-20 r=8", "DAS")]
    assert rows[0]["params"] == 269_722  # He et al.'s ResNet-20
    for r in rows:
        assert r["test_accuracy"] > 0.3, r  # 10 classes: chance is 0.1
        assert r["losses"][-1] < r["losses"][0]
        assert r["model"] == "ResNet-20" or r["params"] < rows[0]["params"] / 5
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "test acc" in printed and "DAS" in printed


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
