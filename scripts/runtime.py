# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Process-level settings for running the bundle on a CPU.

A 3D network at full resolution allocates feature maps of tens of megabytes (``32 x 64^3`` float32 is 32 MiB).
glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns
it to the system on ``free``, so each such tensor costs one page fault per 4 KiB page every time it is allocated,
in every layer, in every step: a noticeable share of a CPU forward pass and training step (figures in
``docs/benchmarks/``). :func:`reuse_freed_cpu_memory` asks glibc to serve large blocks from its heap and to keep
freed memory for the next allocation instead. The results are unchanged; the price is that the process keeps its
peak memory (plus some fragmentation) until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["reuse_freed_cpu_memory"]

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_ALL = 2**31 - 1  # bytes above the heap top before glibc trims it: never, in practice

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def reuse_freed_cpu_memory(enable: bool = True) -> bool:
    """Let glibc's ``malloc`` keep and reuse freed memory instead of mapping large blocks afresh every time.

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap) and a very high ``M_TRIM_THRESHOLD`` (freed memory
    stays with the process). Speeds up CPU training and inference of 3D networks; does not change any result.
    The setting holds for the rest of the process (and for worker processes it forks); it cannot be undone.

    Args:
        enable: ``False`` changes nothing (so a config can pass a hyper-parameter straight through).

    Returns:
        whether the setting is in effect in this process: ``False`` on a system without glibc (e.g. macOS,
        Windows or musl, where nothing is changed) and when neither this call nor an earlier one enabled it.
    """
    global _applied
    if not enable:
        return _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        logger.info("reuse_freed_cpu_memory: not a glibc system, the allocator is left as it is")
        return False
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL) != 1:
        logger.warning("reuse_freed_cpu_memory: glibc refused mallopt(M_MMAP_MAX / M_TRIM_THRESHOLD); not in effect")
        return False
    _applied = True
    logger.info("glibc malloc keeps freed memory for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d)", _KEEP_ALL)
    return True
