"""The README's main job, shortened: `tnlayers demo` trains every model/optimizer pair on real digits."""
import json

import pytest

from tnlayers.cli import main


def test_short_demo_learns_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--epochs", "3", "--quiet", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    pairs = {(r["model"].split()[0], r["optimizer"]) for r in rows}
    assert pairs == {("dense", "SGD"), ("TT", "SGD"), ("TT", "DAS"), ("TR", "SGD"), ("TR", "DAS"),
                     ("Tucker", "SGD"), ("Tucker", "DAS")}
    dense = next(r for r in rows if r["model"] == "dense")
    for r in rows:
        assert r["test_accuracy"] > 0.5, r  # 10 classes: chance is 0.1
        assert r["model"] == "dense" or r["params"] < dense["params"] / 3
    printed = capsys.readouterr().out
    assert "test acc" in printed and "DAS" in printed


def test_info_and_bad_arguments(capsys):
    assert main(["info"]) == 0
    assert "formats" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
