"""Test-session set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be
chosen before triton is first imported (it is read then, not at launch)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
