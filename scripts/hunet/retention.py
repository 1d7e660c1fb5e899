# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Retention of the lesion service's per-request result folders: the oldest go first, folders in use never."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ResultRetention", "RESULT_ID"]

logger = logging.getLogger(__name__)

#: name of a request folder: a uuid4 in hex
RESULT_ID = re.compile(r"^[0-9a-f]{32}$")


class ResultRetention:
    """Keep at most ``max_results`` request folders under ``root``, none older than ``retention_hours``.

    Folders are the ``root/<32 hex>`` request folders; their age is the modification time of ``result.json`` (or of
    the folder while it has none). :meth:`sweep` removes, oldest first, every folder beyond the newest
    ``max_results`` and every folder older than ``retention_hours``, except the folders held by :meth:`in_use`
    (requests still running). Other files and folders under ``root`` are never touched.

    Args:
        root: the service's work folder.
        retention_hours: age limit (> 0); ``None`` keeps folders regardless of age.
        max_results: count limit (>= 1); ``None`` keeps any number.
    """

    def __init__(self, root: str | Path, retention_hours: float | None = 24.0, max_results: int | None = 1000) -> None:
        if retention_hours is not None and not retention_hours > 0:
            raise ValueError(f"retention_hours must be > 0 or None, got {retention_hours}.")
        if max_results is not None and int(max_results) < 1:
            raise ValueError(f"max_results must be >= 1 or None, got {max_results}.")
        self.root = Path(root)
        self.retention_s = None if retention_hours is None else float(retention_hours) * 3600.0
        self.max_results = None if max_results is None else int(max_results)
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def in_use(self, folder: Path) -> Iterator[Path]:
        """Protect ``folder`` from :meth:`sweep` while the block runs."""
        with self._lock:
            self._busy.add(folder.name)
        try:
            yield folder
        finally:
            with self._lock:
                self._busy.discard(folder.name)

    @staticmethod
    def _age_key(folder: Path) -> float:
        result = folder / "result.json"
        try:
            return (result if result.is_file() else folder).stat().st_mtime
        except OSError:  # removed meanwhile
            return 0.0

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove what the policy says, oldest first; returns the names removed."""
        now = time.time() if now is None else now
        with self._lock:
            busy = set(self._busy)
            folders = [p for p in self.root.iterdir() if p.is_dir() and RESULT_ID.match(p.name)] if self.root.is_dir() else []
            folders.sort(key=self._age_key, reverse=True)  # newest first
            removed = []
            for rank, folder in enumerate(folders):
                if folder.name in busy:
                    continue
                too_many = self.max_results is not None and rank >= self.max_results
                too_old = self.retention_s is not None and now - self._age_key(folder) > self.retention_s
                if too_many or too_old:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        if removed:
            logger.info("retention: removed %d result folder(s)", len(removed))
        return removed
