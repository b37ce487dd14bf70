"""The wheel ships the license, py.typed (PEP 561) and the version of tnlayers.__version__; built from a copy of
the sources in a temporary folder (no build/ or egg-info in the working tree), without build isolation."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import tnlayers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setuptools_version():
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())


@pytest.mark.skipif(_setuptools_version() < (77,), reason="pyproject's license fields need setuptools>=77")
def test_wheel_ships_license_py_typed_and_version(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "tnlayers", src / "tnlayers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "dist").glob("tnlayers-*.whl")
    assert wheel.name.startswith(f"tnlayers-{tnlayers.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"tnlayers-{tnlayers.__version__}.dist-info"
        assert "tnlayers/py.typed" in names
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = z.read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert f"Version: {tnlayers.__version__}\n" in metadata
    assert "MIT License" in (ROOT / "LICENSE").read_text()
