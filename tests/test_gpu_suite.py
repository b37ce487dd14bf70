"""benchmarks/gpu_suite.py without a GPU: it refuses (status 2) and runs nothing; every command it builds parses
with the argparse of the benchmark it calls; a step past its budget is stopped and the others still run."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _benchmarks import BENCH, load_benchmark


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


def test_refuses_without_cuda_and_runs_nothing(suite, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(suite.subprocess, "run", lambda *a, **k: calls.append(a))
    assert suite.main(["--out-dir", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "gpu_suite.py needs a CUDA device" in err and "Nothing was run" in err
    assert calls == [] and not (tmp_path / "gpu").exists()


def test_refuses_from_the_command_line_with_status_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device visible, on a GPU machine too
    done = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--out-dir", str(tmp_path / "gpu")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
    assert not (tmp_path / "gpu").exists()


class _Parsed(Exception):
    pass


def test_every_command_parses_with_its_benchmarks_argparse(suite, tmp_path, monkeypatch):
    """Each benchmark's own parser takes the suite's argv (options, choices, types); nothing runs: parse_args
    stops the benchmark right after parsing."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))
    steps = suite.plan(tmp_path)
    assert [s.name for s in steps] == ["tests", "optimizer_step", "step_time", "layers", "models"]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    parsed = {}
    for step in steps[1:]:
        script = Path(step.command[1])
        assert script.parent == BENCH and script.exists()
        with pytest.raises(_Parsed) as got:
            load_benchmark(script.stem).main(step.command[2:])
        parsed[step.name] = got.value.args[0]
        assert parsed[step.name].device == "cuda" and str(tmp_path) in parsed[step.name].out
    assert (parsed["step_time"].model, parsed["step_time"].batch, parsed["step_time"].size) == ("tr_resnet32", 128, 32)
    assert parsed["models"].quick and parsed["models"].budget < steps[-1].budget


def test_test_step_runs_the_cuda_test_files_natively(suite, tmp_path):
    tests = suite.plan(tmp_path)[0]
    assert tests.command[1:3] == ["-m", "pytest"]
    root = BENCH.parent
    for name in suite.CUDA_TESTS:
        assert name in tests.command and "cuda" in (root / name).read_text()
    # every test file that mentions CUDA is in the step, or known to need no device: import stays CUDA-free,
    # backend="cuda" is refused, this file
    mentions = {f"tests/{p.name}" for p in (root / "tests").glob("test_*.py")
                if ".cuda" in p.read_text() or '"cuda"' in p.read_text()}
    known = {"tests/test_lean_import.py", "tests/test_errors.py", "tests/test_optim_das.py", "tests/test_gpu_suite.py"}
    assert not mentions - set(suite.CUDA_TESTS) - known, ("a test file mentions CUDA: add it to gpu_suite.CUDA_TESTS "
                                                          "if it runs on the GPU, else to `known` here")
    env = suite.child_env({"TRITON_INTERPRET": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}  # the kernels compile for the GPU instead of running in the interpreter


def test_budgets_add_up_to_eight_minutes(suite, tmp_path):
    assert sum(s.budget for s in suite.plan(tmp_path)) <= 8 * 60 == suite.TOTAL_BUDGET


def test_a_step_past_its_budget_is_stopped_and_the_rest_still_run(suite, tmp_path):
    py = sys.executable
    steps = [suite.Step("slow", 1, [py, "-c", "import time; time.sleep(30)"]),
             suite.Step("broken", 20, [py, "-c", "import sys; print('oops'); sys.exit(3)"]),
             suite.Step("tests", 20, [py, "-c", "print('== 3 passed, 1 skipped in 0.5s ==')"], [tmp_path / "none"])]
    suite.run_steps(steps, tmp_path, dict(os.environ))
    assert [s.status for s in steps] == ["STOPPED at its budget (1 s)", "FAILED (exit 3)", "passed"]
    assert steps[0].wall_s < 15 and (tmp_path / "broken.log").read_text().strip() == "oops"
    assert steps[2].summary == "3 passed, 1 skipped in 0.5s"
    text = suite.report(steps, tmp_path, "test machine")
    assert (tmp_path / "gpu_suite.md").read_text() == text
    assert "| tests | passed: 3 passed, 1 skipped in 0.5s |" in text
    assert "| slow | STOPPED at its budget (1 s) |" in text


def test_unknown_step_is_refused(suite, capsys):
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--only", "tests", "benchmarks", "--dry-run"])
    assert exit_.value.code == 2 and "--only ['benchmarks']" in capsys.readouterr().err


def test_dry_run_prints_every_command_on_any_machine(suite, tmp_path, capsys):
    assert suite.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0][1:] for line in printed] == ["tests", "optimizer_step", "step_time", "layers", "models"]
    assert not any(tmp_path.iterdir())
