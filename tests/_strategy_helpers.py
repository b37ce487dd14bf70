"""A fake clock for strategy="auto" tests (tensorized layers and adapters alike)."""
from tnlayers import strategy as strategy_module


def fake_timings(monkeypatch, times):
    """Replace the clock: each strategy still runs, and takes ``times[strategy]`` seconds. Returns the list
    of strategies timed, in order."""
    calls = []

    def fake(run, strategy, device):
        run(strategy)
        calls.append(strategy)
        return times[strategy]
    monkeypatch.setattr(strategy_module, "_time", fake)
    return calls
