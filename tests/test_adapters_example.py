"""Smoke test of examples/finetune_adapters.py at its --quick sizes, run in-process."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_adapters.py"


def test_finetune_adapters_quick_run_writes_its_table(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("example_finetune_adapters", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        result = example.main(["--quick", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert [(r["adapter"], r["method"]) for r in rows] == [
        (a, m) for a in ("FLoRA (tucker)", "LoRETTA (tt)") for m in ("Adam", "SAM", "DAS")]
    assert all(0.0 <= r["test"] <= 1.0 and r["step_ms"] > 0 for r in rows)
    # FLoRA rank 8 on the 64 x 64 query and value of 2 blocks: 4 x (64·8 + 8·8 + 64·8)
    assert rows[0]["trainable"] == 4 * (64 * 8 + 8 * 8 + 64 * 8)
    # LoRETTA-style TT rank 8 over modes (4, 4, 4 | 4, 4, 4): 4·8 + 4 x (8·4·8) + 8·4, four times
    assert rows[3]["trainable"] == 4 * (4 * 8 + 4 * 8 * 4 * 8 + 8 * 4)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["result"]["rows"] == rows
    assert "| FLoRA (tucker) | 4,352 | Adam |" in (tmp_path / "run.md").read_text()
