# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""How a section reports what did not run: :class:`SectionSkipped` and the one-line text of an exception."""

from __future__ import annotations

__all__ = ["SectionSkipped", "error_text"]


class SectionSkipped(Exception):
    """Raised by a section that cannot run on this machine (or in the time left); the message is the reason."""


def error_text(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it), or ``"Type"`` without one."""
    first = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
