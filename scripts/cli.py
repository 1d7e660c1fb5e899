# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""How the bundle's commands end on bad input: one readable line, not a traceback.

MONAI's ``python -m monai.bundle run`` evaluates config expressions; an error in a user's data (a
:class:`scripts.data.DataError`, which names the file and the fix) reaches the terminal wrapped in
``RuntimeError: Failed to evaluate ConfigExpression`` at the end of an ~85-line traceback. The configs call
:func:`install_error_handler` in ``initialize``, after which an uncaught exception whose cause chain holds a
``DataError`` ends the process with exit status 1 and one line on standard error::

    ERROR: case 0: image file data/x.nii.gz does not exist; fix the path in the datalist or --dataset_dir.

The full traceback goes to the ``scripts.cli`` logger at DEBUG level, and to standard error as well when the
command line holds ``--debug`` (e.g. ``--debug True``, a config value the configs ignore) or the environment sets
``MAMBACLINIX_DEBUG=1``. Any other exception keeps Python's default report (a bug, not bad data).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from types import TracebackType

__all__ = [
    "DEBUG_ENV",
    "CommandLineError",
    "OneLineArgumentParser",
    "data_error_in_chain",
    "install_error_handler",
    "report_uncaught",
]

logger = logging.getLogger(__name__)

#: environment variable that keeps the full traceback on standard error
DEBUG_ENV = "MAMBACLINIX_DEBUG"


class CommandLineError(Exception):
    """A bad command line, raised by :class:`OneLineArgumentParser` for its caller to report in one line."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`CommandLineError` instead of printing usage and exiting,
    so that a command can report them like its other input errors (one ``ERROR:`` line, its own exit status)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandLineError(message)


def data_error_in_chain(exc: BaseException | None,
                        types: tuple[type[BaseException], ...] | None = None) -> BaseException | None:
    """The first exception of ``types`` (default :class:`scripts.data.DataError`) among ``exc`` and its
    causes/contexts, else ``None``."""
    if types is None:
        from scripts.data import DataError

        types = (DataError,)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _debug_requested(argv: list[str]) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return any(a == "--debug" or a.startswith("--debug=") for a in argv)


def report_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None,
                    argv: list[str] | None = None, stream=None,
                    types: tuple[type[BaseException], ...] | None = None) -> bool:
    """Report an uncaught exception as one line if it comes from bad data.

    Args:
        exc_type, exc, tb: what ``sys.excepthook`` receives.
        argv: the command line (default ``sys.argv``), searched for ``--debug``.
        stream: where to write (default standard error).
        types: exception types that mean bad input (default :class:`scripts.data.DataError`).

    Returns:
        ``True`` when the exception was reported here (one of ``types`` in its chain), ``False`` when the caller
        should fall back to the default report.
    """
    data_error = data_error_in_chain(exc, types)
    if data_error is None:
        return False
    stream = stream if stream is not None else sys.stderr
    argv = list(sys.argv if argv is None else argv)
    full = "".join(traceback.format_exception(exc_type, exc, tb))
    logger.debug("uncaught exception:\n%s", full)
    if _debug_requested(argv):
        stream.write(full)
    else:
        stream.write(f"(full traceback: set {DEBUG_ENV}=1, or add --debug True to a monai.bundle command)\n")
    message = " ".join(str(data_error).split())  # one line, whatever the message held
    stream.write(f"ERROR: {message}\n")
    stream.flush()
    return True


def install_error_handler(types: tuple[type[BaseException], ...] | None = None) -> None:
    """Make an uncaught bad-data error end the process with one readable line (see the module docs).

    Args:
        types: exception types that mean bad input (default :class:`scripts.data.DataError`); a command whose
            own code raises ``ValueError`` only for bad input (the planner) may pass wider types.

    Idempotent; other exceptions go to the hook that was installed before.
    """
    previous = sys.excepthook
    if getattr(previous, "_mambaclinix", False):
        return

    def hook(exc_type, exc, tb):
        if not report_uncaught(exc_type, exc, tb, types=types):
            previous(exc_type, exc, tb)

    hook._mambaclinix = True  # type: ignore[attr-defined]
    sys.excepthook = hook
