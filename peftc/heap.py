"""glibc's allocator, where peftc tunes it: the mmap threshold while ONNX Runtime loads a session
(:func:`peftc.export.onnx.load_session`) and giving freed heap pages back after a one-off build."""
from __future__ import annotations

import ctypes
import gc
import platform

#: glibc's mallopt parameter; the threshold while a session loads (glibc's default) and after it
M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD = -3, 128 << 10, 32 << 20


def glibc():
    """The C library when it is glibc (whose allocator the calls here tune), else None."""
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's ``malloc_trim``): what a
    one-off build (compiling each adapter of a bank) freed stays resident otherwise."""
    gc.collect()
    libc = glibc()
    if libc:
        libc.malloc_trim(0)
