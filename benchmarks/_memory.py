"""The benchmarks' shared allocator switch: glibc memory reuse, so page faults do not time thin layers."""
from __future__ import annotations

import ctypes

FLAG_HELP = ("glibc mallopt so freed tensors are reused instead of unmapped (see _memory.keep_freed_memory): "
             "without it, page faults on fresh multi-MB activations can cost more than a thin conv")
NOTE = "--keep-freed-memory: glibc mallopt (no page faults on reused buffers)"


def keep_freed_memory() -> bool:
    """glibc: serve large tensors from the heap and keep freed memory for reuse (``mallopt``), as jemalloc
    or tcmalloc do (PyTorch's CPU tuning guide). By default glibc maps every buffer over its (adaptive)
    threshold afresh and unmaps it on free, so each call page-faults its output in again: on this VM that
    is about 12 ms per 8 MB tensor, more than a whole thin 1x1 conv, and it lands on whichever calls happen
    to allocate such buffers. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def apply_flag(args) -> None:
    """Act on ``args.keep_freed_memory``; where glibc is missing, say so and record it as off."""
    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: no glibc here; measuring with the system allocator as it is")
        args.keep_freed_memory = False
