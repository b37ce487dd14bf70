"""The CPU named in a results file: the same grid ran 1.8x faster on one 2-core VM than on another (AVX-512 and
AMX against neither), so a figure means little without it."""
from __future__ import annotations

import platform

ISA = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the extensions oneDNN's fp32/bf16 kernels pick between


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'model name (extensions)' of the first processor in ``cpuinfo``; the platform's processor string
    where that file is missing."""
    model, flags = None, None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    isa = [name for name in ISA if name in (flags or ())]
    return f"{model} ({', '.join(isa)})" if isa else model
