"""The documentation lives in the repository: no reference to files outside it, and every pointer into
docs/design.md names a section that exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tnlayers", "tests", "README.md", "benchmarks", "examples", "docs")
SUFFIXES = {".py", ".md", ".txt", ".rst", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
# Built from pieces so that this file does not match its own scan.
FORBIDDEN = ("DESIGN" + ".md", "shared" + "/")
POINTER = re.compile(r"docs/design\.md,\s+'([^']+)'")


def _files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts:
                    yield f


def _headings():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for f in _files():
        for number, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for word in FORBIDDEN:
                if word in line:
                    hits.append(f"{f.relative_to(ROOT)}:{number}: {word}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_design_pointers_name_existing_sections():
    headings = _headings()
    pointers, missing = 0, []
    for f in _files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for match in POINTER.finditer(text):
            pointers += 1
            section = " ".join(match.group(1).split())  # a pointer may wrap inside a docstring
            if section not in headings:
                missing.append(f"{f.relative_to(ROOT)}: '{section}'")
    assert pointers > 0
    assert not missing, f"pointers to sections docs/design.md does not have {sorted(headings)}:\n" + "\n".join(missing)


def test_design_document_covers_the_library():
    headings = _headings()
    for section in ("Norm deviation: s_k, γ_k, Q and Cov", "DAS: deviation-aware scaling", "DAS: the max_scale bound",
                    "BAR: balancedness-aware rescaling", "The SAM family: SAM, ASAM, GSAM, X-SAM",
                    "The step size on W", "Contraction planning", "Strategy cost model", "Inference weight cache",
                    "Triton kernels for DAS"):
        assert section in headings
