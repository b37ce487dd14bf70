"""Smoke test of examples/finetune_adapters.py at its --quick sizes, run in-process."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tnlayers.adapters import merge

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_adapters.py"


def _example():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("example_finetune_adapters", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_finetune_adapters_quick_run_writes_its_table(tmp_path):
    example = _example()
    threads = torch.get_num_threads()
    try:
        result = example.main(["--quick", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert [(r["adapter"], r["method"]) for r in rows] == [
        (a, m) for a in ("FLoRA (tucker)", "LoRETTA (tt)") for m in ("Adam", "SAM", "DAS")]
    assert all(0.0 <= r["test"] <= 1.0 and r["step_ms"] > 0 for r in rows)
    # even one quick epoch of pretraining learns the upright digits (chance: 0.1; 0.64 measured)
    assert result["source_test"] > 0.35, result["source_test"]
    # FLoRA rank 8 on the 64 x 64 query and value of 2 blocks: 4 x (64·8 + 8·8 + 64·8)
    assert rows[0]["trainable"] == 4 * (64 * 8 + 8 * 8 + 64 * 8)
    # LoRETTA-style TT rank 8 over modes (4, 4, 4 | 4, 4, 4): 4·8 + 4 x (8·4·8) + 8·4, four times
    assert rows[3]["trainable"] == 4 * (4 * 8 + 4 * 8 * 4 * 8 + 8 * 4)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["result"]["rows"] == rows
    assert "| FLoRA (tucker) | 4,352 | Adam |" in (tmp_path / "run.md").read_text()


@pytest.mark.parametrize("preset", ["FLoRA (tucker)", "LoRETTA (tt)"])
def test_the_examples_adapters_train_only_their_cores_and_merge_exactly(preset):
    """At --quick sizes the fine-tuned accuracy is near chance, so the training itself is checked: the loss
    falls, only the adapter cores move, the pretrained model is untouched, and merging changes no output."""
    example = _example()
    tasks = example.load_tasks(shots=5)
    pretrained = example.pretrain(tasks, epochs=1)
    frozen = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    model, opt = example.adapted(pretrained, example.PRESETS[preset], "Adam", None)
    cores = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert cores and all(".cores." in n for n in cores)
    x, y = tasks["train"]

    def loss():
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    start = loss()
    torch.manual_seed(0)
    for _ in range(30):
        example.step(model, opt, x, y)
    assert loss() < 0.9 * start, (start, loss())
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], c) for n, c in cores.items())  # every core moved
    bases = {n.replace(".base.", "."): p for n, p in after.items() if n not in cores}
    assert set(bases) == set(frozen) and all(torch.equal(bases[n], frozen[n]) for n in frozen)
    assert all(torch.equal(p, frozen[n]) for n, p in pretrained.named_parameters())
    model.eval()
    with torch.no_grad():
        adapted_out, base_out = model(x), pretrained.eval()(x)
        assert not torch.allclose(adapted_out, base_out, atol=1e-3)  # the adapters changed the function
        merge(model)
        torch.testing.assert_close(model(x), adapted_out, rtol=1e-4, atol=1e-5)
