"""Host memory of a training step on CPU: keep freed blocks in the process for the next step.

glibc's malloc serves every block over 32 MB (activations, the tied embedding's (V, D) gradient, GEMM packing
buffers) with a fresh mmap and unmaps it on free, so each step faults its activations in again, page by page: on
ofa_base at 384 px (benchmarks/model_step.py, one thread) that is 15-25% of the step, spent in the kernel.
torch's own CPU launcher (torch.backends.xeon.run_cpu) preloads jemalloc or tcmalloc for this; glibc's mallopt
does it without a dependency. GPU training is unaffected (its activations are on the device).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never give its free top back: a step reuses the last one's pages.
    The process keeps its peak resident. Returns whether glibc took both settings (False elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
