"""benchmarks/compress.py end to end at a tiny setting: every row written, equal parameters where promised."""
import json

import pytest

from _benchmarks import load_benchmark


@pytest.mark.slow
def test_compress_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "compress.md"
    load_benchmark("compress").main(["--formats", "tucker", "--budgets", "0.5", "--epochs", "1", "--epochs-ft", "1",
                                     "--seeds", "1", "--no-cache", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    methods = [(r["format"], r["method"]) for r in rows]
    assert methods == [("dense", "-"), ("tucker", "uniform 0.5"), ("tucker", "auto (equal params)"),
                       ("tucker", "vbmf"), ("tucker", "auto (VBMF's params)")]
    uniform, auto = rows[1], rows[2]
    assert 0.99 * uniform["params"] <= auto["params"] <= uniform["params"]
    assert auto["lost_energy"] <= uniform["lost_energy"] + 1e-12  # what "auto" minimizes, from the layers' errors
    assert "| tucker | vbmf |" in out.read_text()
