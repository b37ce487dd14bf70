"""Where a benchmark writes when ``--out`` is not given: a git-ignored folder, so rerunning a benchmark never
overwrites the committed tables in ``benchmarks/results/`` (update those by naming them with ``--out``)."""
from __future__ import annotations

from pathlib import Path

LOCAL = Path(__file__).parent / "results" / "local"


def default_out(name: str) -> Path:
    """``benchmarks/results/local/<name>``, its folder created."""
    LOCAL.mkdir(parents=True, exist_ok=True)
    return LOCAL / name
