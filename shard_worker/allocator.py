"""A worker's allocator gives back what it frees (issue 27.5).

glibc keeps freed memory in its heaps for reuse: a worker whose KV buffers grow and are freed, and whose
steps allocate and free activations of every size, holds on to that memory, and its RSS climbs past what it
uses (measured: SmolLM2 over 3 workers each planned for 450 MiB, 24 prompts of ~1,500 tokens: peak RSS
881-948 MiB, a runtime of 360 MiB plus 450 plus 70-140 of freed memory never returned). With blocks over
MMAP_THRESHOLD mapped on their own, a freed tensor goes back to the system at once, and the peak was 755-820
MiB against the 810 the runtime and the budget make; with the runtime and a reserve taken off the bound
(shardline/limits.py), the KV memory test's workers peaked at 717-760 MiB under a bound of 800 (a threshold of
1 MiB instead let them reach 811-869). It costs: mapping
and unmapping each step's larger temporaries took 5-9% of 16-stream decode throughput, so a worker does it
only when --worker-memory-mb bounds its process (as `launch` always sets). Linux with glibc only; elsewhere
nothing changes. SHARDLINE_KEEP_FREED_MEMORY=1 leaves the allocator as it is (a benchmark's
baseline, or an operator's way back).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 64 * 1024
ARENA_MAX = 2


LOADING_THRESHOLD = 32 * 2**20  # glibc's largest: while a shard loads, its buffers come from the heap
_state = {"giving_back": False}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (musl, macOS: nothing here applies)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both, or it is not glibc
    except (OSError, AttributeError):
        return None
    return libc


def give_back_freed_memory() -> bool:
    """Set the process's allocator so that large freed blocks return to the system; False where it cannot
    (or SHARDLINE_KEEP_FREED_MEMORY=1 says not to)."""
    if os.environ.get("SHARDLINE_KEEP_FREED_MEMORY") == "1":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
    if not ok:
        log.debug("mallopt refused: freed memory may stay in the process")
    _state["giving_back"] = ok
    return ok


def trim() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def heap_while_loading() -> Iterator[None]:
    """While a shard's weights arrive: its many short-lived buffers come from the heap (mapping and unmapping
    each made loading 20-26% slower, bench/recovery.py), and the heap's free pages go back to the system after.
    Nothing changes unless give_back_freed_memory is on."""
    libc = _libc() if _state["giving_back"] else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
