"""benchmarks/label_noise.py: the statistics it reports (against hand computations) and a smoke run of the whole
pipeline (--quick: every cell of the table filled, the runs file, the plot)."""
import json
import math

import numpy as np
import pytest

from _benchmarks import load_benchmark

pytest.importorskip("scipy")
bench = load_benchmark("label_noise")


def test_paired_difference_matches_the_t_statistic_by_hand():
    a, b = [95.0, 93.5, 96.1, 94.0, 92.2], [94.1, 93.9, 94.0, 92.5, 92.0]
    d = np.array(a) - np.array(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    # two-sided p of Student's t with 4 degrees of freedom, by numerical integration of its density
    x = np.linspace(abs(t), 200, 400_001)
    density = (1 + x ** 2 / 4) ** -2.5 * math.gamma(2.5) / (math.sqrt(4 * math.pi) * math.gamma(2))
    p_by_hand = 2 * np.trapezoid(density, x) if hasattr(np, "trapezoid") else 2 * np.trapz(density, x)
    result = bench.paired(a, b, np.random.default_rng(0))
    assert result["mean"] == pytest.approx(d.mean()) and result["n"] == 5
    assert result["p"] == pytest.approx(p_by_hand, abs=1e-4)
    assert result["low"] <= d.mean() <= result["high"]
    assert d.min() <= result["low"] and result["high"] <= d.max()  # a bootstrap mean lies within the data


def test_paired_difference_without_spread_has_no_p_value():
    result = bench.paired([1.0, 2.0], [0.5, 1.5], np.random.default_rng(0))
    assert result["mean"] == 0.5 and math.isnan(result["p"])
    assert bench.paired([1.0, 2.0], [1.0, 2.0], np.random.default_rng(0))["p"] == 1.0


def test_holm_adjustment_by_hand():
    # sorted p: 0.01, 0.02, 0.04 with m = 3: 0.03, max(0.03, 0.04), max(0.04, 0.04) -> then monotone
    assert bench.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert bench.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_quick_run_fills_every_cell(tmp_path):
    out = tmp_path / "ln.md"
    result = bench.main(["--quick", "--jobs", "1", "--models", "TT-ResNet-20 0.1", "--out", str(out)])
    rows = result["rows"]
    assert {(r["noise"], r["optimizer"]) for r in rows} == {(n, o) for n in (0.0, 0.4) for o in bench.OPTIMIZERS}
    assert all(r["n"] == 2 for r in rows)
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert len(runs) == 20 and out.with_suffix(".png").stat().st_size > 10_000
    text = out.read_text()
    assert "| TT-ResNet-20 0.1 | 40% | DAS - SGD |" in text and "Holm" in text
    # the same seed gives every optimizer the same model, data and label flips: SGD and DAS start alike
    again = bench.main(["--quick", "--jobs", "1", "--models", "TT-ResNet-20 0.1", "--out", str(out)])
    assert again["rows"] == rows  # nothing rerun: the saved runs are read back
