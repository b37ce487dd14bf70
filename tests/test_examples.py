"""Smoke tests of the paper's examples (examples/*.py), run in-process at their --quick sizes."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def completion():
    pytest.importorskip("tensorly")
    return load_example("tensor_completion")


def test_r2_matches_independent_formula(completion):
    rng = np.random.default_rng(0)
    y = rng.normal(2.0, 3.0, size=500)
    y_hat = y + rng.normal(0.0, 1.0, size=500)
    # R² as 1 - MSE / population variance: the same quantity, computed another way.
    expected = 1.0 - np.mean((y - y_hat) ** 2) / np.var(y)
    assert completion.r2_score(y, y_hat) == pytest.approx(expected, rel=1e-12)
    assert completion.r2_score(y, y) == 1.0
    assert completion.r2_score(y, np.full_like(y, y.mean())) == pytest.approx(0.0, abs=1e-12)
    # Shapes are flattened, not broadcast: a (n, 1) target against an (n,) prediction is still elementwise.
    assert completion.r2_score(y[:, None], y_hat) == pytest.approx(expected, rel=1e-12)


def test_split_mask_is_exact_and_reproducible(completion):
    mask = completion.random_observed_mask((438, 6, 11), 0.3, seed=5)
    assert mask.sum() == round(0.3 * 438 * 6 * 11)
    assert np.array_equal(mask, completion.random_observed_mask((438, 6, 11), 0.3, seed=5))
    assert not np.array_equal(mask, completion.random_observed_mask((438, 6, 11), 0.3, seed=6))


def test_feature_scaler_round_trip_uses_observed_entries_only(completion):
    rng = np.random.default_rng(1)
    tensor = rng.normal(size=(50, 3, 4)) * 5 + 2
    observed = rng.random(tensor.shape) < 0.4
    scaler = completion.FeatureScaler(tensor, observed, "standardize")
    np.testing.assert_allclose(scaler.inverse(scaler.transform(tensor)), tensor, rtol=1e-12)
    poked = tensor.copy()
    poked[~observed] = 1e6  # held-out values must not influence the fitted statistics
    np.testing.assert_allclose(completion.FeatureScaler(poked, observed, "standardize").mean, scaler.mean)


def test_quick_completion_beats_mean_predictor(completion, tmp_path):
    results = completion.main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"tensor_completion.{suffix}").stat().st_size > 0
    tensor = completion.load_covid_tensor()
    observed = completion.random_observed_mask(tensor.shape, 0.3, seed=0)
    mean_predictor = completion.r2_score(tensor[~observed], np.full((~observed).sum(), tensor[observed].mean()))
    assert abs(mean_predictor) < 0.01
    for method in ("adam", "sam", "das"):
        assert results["summary"][method]["r2_mean"] > mean_predictor + 0.5, method
    saved = json.loads((tmp_path / "tensor_completion.json").read_text())
    assert set(saved["summary"]) == {"hooi", "adam", "sam", "das"}


@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--observed-fraction", "1.5"], ["--rank", "8", "7", "8"],
                                  ["--lr", "0"], ["--rho", "-1"]])
def test_completion_rejects_bad_arguments(completion, argv):
    with pytest.raises(ValueError):
        completion.parse_args(argv)


def test_norm_dynamics_quick(tmp_path):
    norm_dynamics = load_example("norm_dynamics")
    results = norm_dynamics.main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    assert (tmp_path / "norm_dynamics.png").stat().st_size > 0
    assert json.loads((tmp_path / "norm_dynamics.json").read_text())["runs"]
    noises = results["settings"]["noise"]
    assert results["settings"]["float64"] and len(noises) >= 2 and noises == sorted(noises)
    for noise in noises:  # SGD conserves Q (Theorem 1) up to O(lr²) per step
        q = results["runs"][f"sgd/{noise:g}"]["Q"]
        assert abs(q[-1] / q[0] - 1.0) < 0.01, (noise, q[0], q[-1])
    for optimizer in ("sam", "das", "xsam"):  # SAM, DAS (and X-SAM, SAM-based) lower Q, faster with more noise
        ratios = [results["runs"][f"{optimizer}/{noise:g}"]["Q"][-1] / results["runs"][f"{optimizer}/{noise:g}"]["Q"][0]
                  for noise in noises]
        assert all(r < 1.0 for r in ratios), (optimizer, ratios)
        assert all(later < earlier for earlier, later in zip(ratios, ratios[1:])), (optimizer, ratios)
        assert ratios[-1] < 0.99, (optimizer, ratios)
    # Sharpness at the end, one row per run in the table: SAM and X-SAM end flatter than SGD under noise.
    table = (tmp_path / "norm_dynamics.md").read_text()
    for key, run in results["runs"].items():
        assert run["sharpness"] > 0 and run["clean_loss"] < run["clean_loss_start"], key
        assert f"| {run['optimizer'].upper()} | {run['noise']:g} | {run['sharpness']:.4f} |" in table
    for noise in noises[1:]:
        sgd = results["runs"][f"sgd/{noise:g}"]["sharpness"]
        assert all(results["runs"][f"{o}/{noise:g}"]["sharpness"] < sgd for o in ("sam", "xsam")), noise


def test_norm_dynamics_rejects_bad_arguments():
    norm_dynamics = load_example("norm_dynamics")
    with pytest.raises(ValueError):
        norm_dynamics.parse_args(["--rank", "50"])
    with pytest.raises(ValueError):
        norm_dynamics.parse_args(["--lr", "-0.1"])
    for argv in (["--xi", "nan"], ["--xi", "-1"], ["--eig-every", "0"], ["--eig-iters", "0"]):
        with pytest.raises(ValueError):
            norm_dynamics.parse_args(argv)
