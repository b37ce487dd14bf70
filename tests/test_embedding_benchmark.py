"""benchmarks/layers.py's Embedding section, end to end on a small table (untimed: only that it runs and writes
every row and its verdicts); its rivals are built as the full-size run builds them."""
import pytest
import torch

from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("layers")


def test_the_embedding_section_writes_its_rows_and_verdicts(bench, tmp_path, monkeypatch):
    import _embedding_bench as emb_bench  # on the path once the benchmark module is loaded

    monkeypatch.setattr(emb_bench, "NUM", 1000)
    monkeypatch.setattr(emb_bench, "LOOKUPS", 64)
    out = tmp_path / "layers.md"
    bench.main(["--sections", "embedding", "--formats", "tt", "tr", "--embedding-ranks", "0.05", "--repeats", "2",
                "--embedding-rebuild-rounds", "0", "--out", str(out)])
    text = out.read_text()
    assert "## Verdicts" in text and "## Embedding 100,000 x 128" in text  # (the title names the full-size run)
    rows = [line for line in text.splitlines() if line.startswith(("| tt |", "| tr |"))]
    assert len(rows) == 2 * 2  # formats x modes
    assert text.count("- embedding: ") == 3  # the three verdict lines of every section


def test_rivals_share_the_shapes_and_start_from_their_own_inits(monkeypatch):
    pytest.importorskip("tltorch")
    load_benchmark("layers")
    import _embedding_bench as emb_bench

    monkeypatch.setattr(emb_bench, "NUM", 1000)
    for fmt in ("tt", "cp", "tucker"):
        (tl,) = emb_bench.tltorch_embeddings(fmt, 0.05, torch.device("cpu")).values()
        ours = emb_bench.our_embedding(fmt, 0.05, "auto", torch.device("cpu"))
        assert tl.tensor_shape == (ours.in_shape, ours.out_shape)
        rows = tl(torch.arange(10)).detach()
        assert torch.isfinite(rows).all() and 0 < float(rows.std()) < 1
        assert emb_bench.tltorch_embeddings("tr", 0.05, torch.device("cpu")) == {}
