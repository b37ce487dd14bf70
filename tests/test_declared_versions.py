"""The lower bounds pyproject.toml declares are the releases CI's second stage installs (.ci/oldest.txt), so
a bound cannot be raised or lowered without the oldest-release stage following it."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _release(version: str):
    """'2.7' -> (2, 7, 0): releases compared by their numbers, padded to three."""
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lower_bounds():
    """{name: lower bound} of [project] dependencies in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    bounds = {}
    for line in block.splitlines():
        m = re.match(r'\s*"([A-Za-z0-9_.-]+)([^"]*)"', line)
        if m:
            lower = re.search(r">=\s*([0-9.]+)", m.group(2))
            bounds[_name(m.group(1))] = lower.group(1) if lower else None
    return bounds


def _oldest_pins():
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==([0-9.]+)\s*$", line.split("#")[0].strip())
        if m:
            pins[_name(m.group(1))] = m.group(2)
    return pins


def test_every_lower_bound_is_the_release_the_oldest_stage_installs():
    bounds, pins = _lower_bounds(), _oldest_pins()
    assert bounds["torch"] and bounds["opt-einsum"], bounds
    for name, lower in bounds.items():
        if lower is None:
            continue
        assert name in pins, f"pyproject.toml declares {name}>={lower} but .ci/oldest.txt does not pin it"
        assert _release(pins[name]) == _release(lower), \
            f"pyproject.toml declares {name}>={lower}, .ci/oldest.txt tests {name}=={pins[name]}"


def test_ci_runs_the_oldest_stage_on_the_fast_tests():
    run = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/oldest.txt" in run and '-m "not slow"' in run
