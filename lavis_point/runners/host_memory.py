"""Keep freed host memory for reuse (glibc's allocator), so a CPU training step does not fault its
large tensors in afresh every time.

glibc serves allocations above its mmap threshold (at most 32 MB, lower until a freed block raises
it) with fresh mappings and unmaps them on free, and returns the heap's free top to the system past
its trim threshold. A training step allocates and frees the same large tensors every time
(activations, gradients, the dense gradient of a 30522-word embedding, AdamW temporaries), so each
step touches them as new pages: one fault per 4 KB, each page zeroed by the kernel. On the embedded
stage 1 that is ~74k faults and ~0.28 s of system time per step at one thread, 10% of its CPU time
(``scripts/bench_train_step.py`` prints the figures). Serving everything from the heap and never
trimming it makes the next step reuse the same memory: the process keeps its peak footprint instead
of giving memory back between steps.
"""
import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory in the heap for reuse (no mmap, no trimming).
    Process-wide, and it cannot be undone for what was already freed. Returns whether it applied:
    False where the C library is not glibc (macOS, musl), which then keeps its own behaviour."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only: others lack it
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return False
    applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    if applied:
        logging.info("glibc %s: freed host memory is kept for reuse (run.keep_freed_memory)", version)
    return applied
