# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Memory figures of a process from Linux's ``/proc`` (no torch import: the hostile-input checks use it too)."""

from __future__ import annotations

__all__ = ["proc_status_mib", "reset_peak_rss_of"]


def proc_status_mib(field: str, pid: int | str = "self") -> float | None:
    """A memory field of ``/proc/<pid>/status`` (e.g. ``VmRSS``, ``VmHWM``) in MiB; ``None`` where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss_of(pid: int | str = "self") -> bool:
    """Reset the peak RSS (``VmHWM``) of process ``pid`` to its current RSS (``/proc/<pid>/clear_refs`` 5).

    Returns:
        False where the kernel does not allow it (not Linux, or another user's process).
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
