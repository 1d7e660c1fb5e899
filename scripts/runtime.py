# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Process-level settings for running the bundle on a CPU.

A 3D network at full resolution allocates feature maps of tens of megabytes (``32 x 64^3`` float32 is 32 MiB).
glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns
it to the system on ``free``, so each such tensor costs one page fault per 4 KiB page every time it is allocated,
in every layer, in every step: a noticeable share of a CPU forward pass and training step (figures in
``docs/benchmarks/``). :func:`reuse_freed_cpu_memory` asks glibc to serve large blocks from its heap and to keep
freed memory for the next allocation instead. The results are unchanged; the price is that the process keeps its
peak memory (plus some fragmentation) until it exits.

PyTorch's CPU kernels run on OpenMP threads (GNU libgomp in the Linux wheels). By default a thread that has finished
its share of an operation keeps spinning on the CPU for a while before it sleeps, which is right on a machine of its
own; on a machine whose cores are shared with other busy processes the spinning threads burn CPU time that the
threads still working need, and a network of many short operations pays on every one of them (figures in
``docs/benchmarks/contention/``). ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at once. The OpenMP
runtime reads it once, when it is loaded with ``torch``, so it has to be in the environment of the process before
that: the bundle's ``make`` targets export it (:data:`SHARED_CPU_ENVIRONMENT`), and
:func:`check_openmp_wait_policy` (in the configs' ``initialize``) warns when it is missing on a busy machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

__all__ = [
    "SHARED_CPU_ENVIRONMENT", "check_openmp_wait_policy", "load_average", "openmp_wait_policy", "reuse_freed_cpu_memory"
]

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_ALL = 2**31 - 1  # bytes above the heap top before glibc trims it: never, in practice

_applied = False
_warned_spinning = False


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


def load_average() -> list[float]:
    """The system load average over 1, 5 and 15 minutes (``os.getloadavg``); empty where unavailable."""
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return []


SHARED_CPU_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
"""The OpenMP wait policy for a shared CPU machine (waiting threads sleep instead of spinning; see the module's
docstring): what the benchmark's ``+omppassive`` timing processes get, and the value that the ``Makefile`` and
``scripts/label/run_server.sh`` write themselves as their default (shell code cannot import it;
``tests/test_runtime.py`` checks the ``Makefile``'s against it)."""


def openmp_wait_policy(environ: Mapping[str, str] | None = None) -> str:
    """How the OpenMP threads of a process started with ``environ`` wait, from ``OMP_WAIT_POLICY``.

    Args:
        environ: the environment (default: this process's ``os.environ``; it takes effect only if it was set
            before ``torch`` was imported).

    Returns:
        ``"passive"`` or ``"active"`` (the variable's value, in any case, as the OpenMP standard reads it), or
        ``"default"`` when it is unset or not one of the two (libgomp then spins for a while before sleeping).
    """
    value = (os.environ if environ is None else environ).get("OMP_WAIT_POLICY", "").strip().lower()
    return value if value in ("passive", "active") else "default"


def check_openmp_wait_policy(environ: Mapping[str, str] | None = None, load: float | None = None,
                             cores: int | None = None) -> bool:
    """Warn (once per process) when OpenMP threads spin while they wait and the machine is busier than its cores.

    Changes nothing (the OpenMP runtime has read its settings already); the warning names the setting to export
    before the next start.

    Args:
        environ: the environment the process started with (default: ``os.environ``).
        load: the 1-minute load average (default: :func:`load_average`; no check where it is unavailable).
        cores: the CPUs this process may run on (default: its affinity mask, or ``os.cpu_count()``).

    Returns:
        whether the warning was given by this call.

    Raises:
        ValueError: ``cores`` is not positive.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 1:
        raise ValueError(f"cores must be positive, got {cores}.")
    if load is None:
        loads = load_average()
        if not loads:
            return False
        load = loads[0]
    global _warned_spinning
    policy = openmp_wait_policy(environ)
    if policy == "passive" or load <= cores or _warned_spinning:
        return False
    _warned_spinning = True
    logger.warning(
        "The machine is busy (1-minute load %.1f on %d CPUs) and OpenMP threads spin while they wait "
        "(OMP_WAIT_POLICY %s): CPU work per step can grow severalfold. Start the next run with "
        "OMP_WAIT_POLICY=PASSIVE in the environment (the make targets set it).", load, cores,
        "unset" if policy == "default" else policy.upper())
    return True
