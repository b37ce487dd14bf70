"""Every GPU check in one command, within 8 minutes on one CUDA device: the CUDA tests (the fused Triton DAS
kernels compiled for the device, not interpreted), the optimizer step, the step time at the paper's TR-ResNet-32
setting, the layer grid and the whole networks, each within its own time budget, every result file in one folder.

    python benchmarks/gpu_suite.py                          # writes benchmarks/results/local/gpu/
    python benchmarks/gpu_suite.py --out-dir benchmarks/results/h200-suite   # a folder to commit
    python benchmarks/gpu_suite.py --dry-run                # the commands only, on any machine
    python benchmarks/gpu_suite.py --only tests models      # some of the steps

A step that runs past its budget is stopped and reported (a benchmark that writes as it goes, like models.py,
keeps what it measured); the others still run. ``gpu_suite.md`` in the folder lists every step: command,
budget, wall time, status, files, and the tests' summary line; ``<step>.log`` holds each step's output. Exit
status: 0 when every step passed, 1 otherwise, 2 without a CUDA device (then nothing runs).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from _output import LOCAL  # noqa: E402

TOTAL_BUDGET = 480  # seconds: the whole suite
# the tests that need or use a CUDA device: fused Triton DAS kernels, their dispatch contract, devices and
# placement (GPU and CPU mixed), the divergence warning on CUDA
CUDA_TESTS = ("tests/test_kernels_das.py", "tests/test_das_fused_contract.py", "tests/test_optim_devices.py",
              "tests/test_divergence.py")


# no `from __future__ import annotations` in this file: dataclass would then look this module up in sys.modules,
# where the tests' loader does not put it
@dataclass
class Step:
    name: str
    budget: int  # seconds; the step is stopped past it
    command: List[str]
    outputs: List[Path] = field(default_factory=list)
    status: str = "not run"
    wall_s: Optional[float] = None
    summary: str = ""


def plan(out: Path, python: str = sys.executable) -> List[Step]:
    """The suite's steps, writing into ``out``. Budgets add up to TOTAL_BUDGET."""
    def bench(script: str) -> str:
        return str(BENCH / f"{script}.py")
    md = {name: out / f"{name}.md" for name in ("optimizer_step", "step_time_tr_resnet32", "layers", "models")}
    return [
        Step("tests", 140, [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS,
                            f"--junitxml={out / 'tests.xml'}"], [out / "tests.xml"]),
        Step("optimizer_step", 40, [python, bench("optimizer_step"), "--device", "cuda", "--steps", "50",
                                    "--out", str(md["optimizer_step"])], [md["optimizer_step"]]),
        # the paper's setting: TR-ResNet-32 (rank 15, Table 8 shapes) on CIFAR-sized batches of 128
        Step("step_time", 60, [python, bench("step_time"), "--device", "cuda", "--model", "tr_resnet32",
                               "--batch", "128", "--size", "32", "--rounds", "10", "--warmup", "3",
                               "--out", str(md["step_time_tr_resnet32"])],
             [md["step_time_tr_resnet32"], md["step_time_tr_resnet32"].with_suffix(".json")]),
        Step("layers", 90, [python, bench("layers"), "--device", "cuda", "--ranks", "0.1", "0.25", "--repeats", "10",
                            "--budget", "1", "--out", str(md["layers"])], [md["layers"]]),
        Step("models", 150, [python, bench("models"), "--device", "cuda", "--quick", "--budget", "110",
                             "--out", str(md["models"])], [md["models"], md["models"].with_suffix(".json")]),
    ]


def child_env(environ: dict) -> dict:
    """The steps' environment: without TRITON_INTERPRET, so the Triton kernels are compiled for the GPU."""
    return {k: v for k, v in environ.items() if k != "TRITON_INTERPRET"}


def pytest_summary(log: Path) -> str:
    """The last line of a pytest log that counts results ("12 passed, 3 skipped in 40.1s")."""
    if not log.exists():
        return ""
    lines = [line.strip("= ") for line in log.read_text(errors="replace").splitlines()]
    counted = [line for line in lines if " in " in line and any(w in line for w in ("passed", "failed", "error"))]
    return counted[-1] if counted else ""


def run_steps(steps: List[Step], out: Path, env: dict) -> None:
    """Run each step with its budget as a timeout, its output to ``out/<name>.log``; fill in status and wall time."""
    out.mkdir(parents=True, exist_ok=True)
    for step in steps:
        log = out / f"{step.name}.log"
        print(f"[{step.name}] budget {step.budget} s: {shlex.join(step.command)}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            try:
                done = subprocess.run(step.command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                      timeout=step.budget)
                step.status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
            except subprocess.TimeoutExpired:
                step.status = f"STOPPED at its budget ({step.budget} s)"
        step.wall_s = time.perf_counter() - start
        if step.name == "tests":
            step.summary = pytest_summary(log)
        print(f"[{step.name}] {step.status} in {step.wall_s:.0f} s {step.summary}", flush=True)


def report(steps: List[Step], out: Path, machine: str) -> str:
    lines = ["# GPU suite", "", f"- Machine: {machine}",
             f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; budgets add up to "
             f"{sum(s.budget for s in steps)} s; wall time {sum(s.wall_s or 0 for s in steps):.0f} s", "",
             "| step | status | wall s | budget s | files | command |", "|---|---|---:|---:|---|---|"]
    for s in steps:
        files = ", ".join(p.name for p in s.outputs if p.exists()) or "-"
        wall = "-" if s.wall_s is None else f"{s.wall_s:.0f}"
        status = s.status + (f": {s.summary}" if s.summary else "")
        command = shlex.join(s.command[1:]).replace(f"{ROOT}/", "")  # paths from the repository root
        lines.append(f"| {s.name} | {status} | {wall} | {s.budget} | {files} | `{command}` |")
    text = "\n".join(lines) + "\n"
    (out / "gpu_suite.md").write_text(text)
    return text


def describe_machine(torch) -> str:
    try:
        import triton
        tri = f"triton {triton.__version__}"
    except ImportError:
        tri = "triton not installed"
    return (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, {tri}, "
            f"{os.cpu_count()} logical CPUs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=None, help="folder for every result file (default "
                        "benchmarks/results/local/gpu/, git-ignored)")
    parser.add_argument("--only", nargs="+", default=None, help="run these steps only (tests, optimizer_step, "
                        "step_time, layers, models)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit, on any machine")
    args = parser.parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else LOCAL / "gpu"
    steps = plan(out)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in steps})
        if unknown:
            parser.error(f"--only {unknown}: the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    if args.dry_run:
        for s in steps:
            print(f"[{s.name}] budget {s.budget} s: {shlex.join(s.command)}")
        return 0
    import torch
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None else
               f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no device")
        print(f"gpu_suite.py needs a CUDA device: {why}. Nothing was run. Run it on a machine with an NVIDIA GPU "
              "(--dry-run prints the commands).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set here; the steps run without it, so the kernels are compiled", flush=True)
    run_steps(steps, out, child_env(dict(os.environ)))
    text = report(steps, out, describe_machine(torch))
    print(text)
    print(f"written to {out}")
    return 0 if all(s.status == "passed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
