"""Smoke test of examples/train_cifar.py (tiny synthetic run) and its data helpers."""
import importlib.util
import json
import pathlib

import pytest
import torch

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_cifar.py"
spec = importlib.util.spec_from_file_location("train_cifar", PATH)
train_cifar = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_cifar)


@pytest.mark.parametrize("optimizer", ["sam", "das"])
def test_tiny_synthetic_run_writes_results(tmp_path, optimizer):
    history = train_cifar.main(["--dataset", "synthetic", "--synthetic-size", "160", "--epochs", "2", "--max-steps",
                                "3", "--batch-size", "32", "--model", "resnet20", "--rank", "3", "--optimizer",
                                optimizer, "--out-dir", str(tmp_path), "--threads", "1"])
    assert history[-1]["steps"] == 3
    saved = json.loads((tmp_path / f"resnet20_tr_{optimizer}_noise0.0.json").read_text())
    assert saved["history"] == history
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert (tmp_path / f"resnet20_tr_{optimizer}_noise0.0.csv").exists()


def test_symmetric_label_noise_flips_the_asked_fraction_to_other_classes():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    noisy = train_cifar.add_label_noise(labels, 0.4, seed=1)
    flipped = noisy != labels
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    counts = torch.bincount(noisy[flipped], minlength=10).float()
    assert counts.min() > 0.8 * counts.mean()  # spread over the classes
    assert torch.equal(train_cifar.add_label_noise(labels, 0.0, seed=1), labels)


def test_missing_cifar_says_so_clearly(tmp_path):
    with pytest.raises(SystemExit, match="nothing is downloaded|Nothing is downloaded"):
        train_cifar.main(["--data-dir", str(tmp_path), "--epochs", "1"])
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--label-noise", "1.5"])


def test_compress_resnet18_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("compress_resnet18", PATH.parent / "compress_resnet18.py")
    compress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compress)
    with pytest.warns(UserWarning, match="no --weights"):
        result = compress.main(["--dataset", "synthetic", "--only", "layer1.*", "--max-steps", "2", "--batch-size",
                                "8", "--synthetic-size", "16", "--image-size", "32", "--out", str(tmp_path / "r.json")])
    assert result["steps"] == 2 and set(result["errors"]) == {f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)}
    # layer1's Table 9 ranks [1, 64, 64, 1] are full for 64 channels: TT-SVD is exact (fp32 rounding)
    assert all(e < 1e-5 for e in result["errors"].values())
    assert 0 <= result["after_finetune"]["top1"] <= 1 and json.loads((tmp_path / "r.json").read_text())["steps"] == 2


def test_resume_from_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    common = ["--dataset", "synthetic", "--synthetic-size", "96", "--epochs", "3", "--batch-size", "32", "--model",
              "resnet20", "--rank", "3", "--optimizer", "das", "--threads", "1", "--label-noise", "0.2"]
    straight = train_cifar.main(common + ["--out-dir", str(tmp_path / "a")])
    ckpt = tmp_path / "run.pt"
    first = train_cifar.main(common + ["--out-dir", str(tmp_path / "b"), "--checkpoint", str(ckpt), "--stop-after", "1"])
    assert len(first) == 1 and ckpt.exists()
    resumed = train_cifar.main(common + ["--out-dir", str(tmp_path / "b"), "--checkpoint", str(ckpt), "--resume"])
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "step_ms"} for r in rows]  # noqa: E731
    assert drop_time(resumed) == drop_time(straight)
