"""Importing tnlayers must not import triton, tensorly or transformers (the adapters recognize its Conv1D by
name), nor initialize CUDA (torchao's habit)."""
import subprocess
import sys


def test_import_is_lean():
    code = ("import sys, tnlayers, torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'tensorly' not in sys.modules, 'tensorly imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialized'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
