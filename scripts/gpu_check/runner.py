# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The check run: the sections in order, each behind its own ``try``, under one time budget, with the results
written after every section.

Every section ends with a status: ``ok``, ``failed`` (it ran and its check did not pass), ``error`` (it raised; the
error and the end of its traceback are recorded), or ``skipped`` with a reason (``skipped: ...``: not selected,
cannot run here, or the time budget is spent). The exit status is 1 when a check section (:data:`CHECK_SECTIONS`)
failed or raised, else 0: skipped sections and errors of the measuring sections do not change it.
"""

from __future__ import annotations

import datetime
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from scripts.benchmark.machine import describe_machine
from scripts.gpu_check.budget import Budget
from scripts.gpu_check.errors import SectionSkipped, error_text
from scripts.gpu_check.distributed import run_distributed
from scripts.gpu_check.environment import describe_environment
from scripts.gpu_check.parity import run_parity
from scripts.gpu_check.plans import bundle_parser
from scripts.gpu_check.report import write_report
from scripts.gpu_check.sliding import run_sliding_window
from scripts.gpu_check.timing import run_timing
from scripts.gpu_check.training import run_amp_training

__all__ = ["CHECK_SECTIONS", "SECTIONS", "Settings", "default_sections", "exit_status", "run_checks"]

logger = logging.getLogger(__name__)

SECTIONS = ("environment", "parity", "amp_training", "timing", "sliding_window", "distributed")
"""The sections, in the order they run."""

CHECK_SECTIONS = ("parity", "amp_training", "distributed")
"""Sections with a pass/fail check: their ``failed`` or ``error`` status makes the exit status 1."""


@dataclass(frozen=True)
class Settings:
    """What a check run does (``python -m scripts.gpu_check --help`` describes each)."""

    device: str
    plan: str
    size: int
    amp_size: int
    amp_steps: int
    amp_batch: int
    train_batch: int
    sliding_size: int
    warmup: int
    repeats: int
    budget_s: float
    sections: tuple[str, ...]
    out: str

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a :class:`torch.device`."""
        return torch.device(self.device)


Section = Callable[[Settings, Budget, Mapping[str, Any]], dict[str, Any]]
"""A section: (settings, budget, the entries of the sections run before it) -> its result."""


def _environment(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    return describe_environment(settings.torch_device)


def _parity(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    return run_parity(settings.torch_device, small=settings.torch_device.type != "cuda")


def _amp_training(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    return run_amp_training(settings.torch_device, settings.plan, settings.amp_size, settings.amp_batch,
                            settings.amp_steps, budget)


def _timing(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    classes = int(bundle_parser(settings.plan).get("out_channels"))
    return run_timing(settings.torch_device, settings.plan, settings.size, settings.train_batch, classes,
                      settings.warmup, settings.repeats, budget)


def _forward_s(done: Mapping[str, Any]) -> float | None:
    """The fastest measured MambaClinix forward time of the timing section, if it ran."""
    cases = done.get("timing", {}).get("result", {}).get("cases", {})
    times = [c["forward"].get("median_s") for n, c in cases.items() if n.startswith("mambaclinix") and "forward" in c]
    times = [t for t in times if t is not None]
    return min(times) if times else None


def _sliding_window(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    return run_sliding_window(settings.torch_device, settings.plan, settings.sliding_size, settings.size, budget,
                              forward_s=_forward_s(done))


def _distributed(settings: Settings, budget: Budget, done: Mapping[str, Any]) -> dict[str, Any]:
    return run_distributed(settings.torch_device, timeout_s=max(budget.remaining(), 1.0),
                           log=Path(settings.out) / "gpu_check_distributed.log")


def default_sections() -> dict[str, Section]:
    """The section functions by name (:data:`SECTIONS`)."""
    return {"environment": _environment, "parity": _parity, "amp_training": _amp_training, "timing": _timing,
            "sliding_window": _sliding_window, "distributed": _distributed}


def _run_section(name: str, section: Section, settings: Settings, budget: Budget, done: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """One section's entry: ``status`` and ``elapsed_s``, with ``result``, ``reason`` or ``error``."""
    if name not in settings.sections:
        return {"status": "skipped", "reason": "skipped: not in --sections", "elapsed_s": 0.0}
    if budget.remaining() <= 0:
        return {"status": "skipped", "reason": f"skipped: {budget.spent_reason()}", "elapsed_s": 0.0}
    logger.info("section %s (%.0f s of the budget left)", name, budget.remaining())
    start = time.perf_counter()
    try:
        result = section(settings, budget, done)
        entry: dict[str, Any] = {"status": "failed" if result.get("passed") is False else "ok", "result": result}
    except SectionSkipped as e:
        entry = {"status": "skipped", "reason": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - a section's failure is recorded and the next section runs
        logger.warning("section %s raised %s: %s", name, type(e).__name__, e)
        entry = {"status": "error", "error": error_text(e, limit=2000),
                 "traceback": traceback.format_exc().strip().splitlines()[-12:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    entry["elapsed_s"] = time.perf_counter() - start
    logger.info("section %s: %s in %.1f s", name, entry["status"], entry["elapsed_s"])
    return entry


def exit_status(report: Mapping[str, Any]) -> int:
    """1 when a section of :data:`CHECK_SECTIONS` is ``failed`` or ``error``, else 0."""
    sections = report.get("sections", {})
    return int(any(sections.get(name, {}).get("status") in ("failed", "error") for name in CHECK_SECTIONS))


def run_checks(settings: Settings, command: str, sections: Mapping[str, Section] | None = None,
               budget: Budget | None = None) -> dict[str, Any]:
    """Run every section of :data:`SECTIONS` and write ``gpu_check.json`` and ``gpu_check.md`` to ``settings.out``
    before the first section and after each one.

    Args:
        settings: what to run.
        command: the command line, recorded.
        sections: the section functions (default :func:`default_sections`; tests pass stand-ins).
        budget: the time budget (default ``settings.budget_s`` from now).

    Returns:
        The report: ``command``, ``settings``, ``machine``, ``started``, ``sections`` (by name, see
        :func:`_run_section`), ``elapsed_s`` and ``exit_status``.
    """
    budget = budget if budget is not None else Budget(settings.budget_s)
    functions = dict(default_sections(), **(sections or {}))
    report: dict[str, Any] = {
        "command": command,
        "settings": asdict(settings),
        "machine": describe_machine(settings.device),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sections": {name: {"status": "pending"} for name in SECTIONS},
        "elapsed_s": 0.0,
        "exit_status": None,
    }
    write_report(report, settings.out)
    for name in SECTIONS:
        report["sections"][name] = _run_section(name, functions[name], settings, budget, report["sections"])
        report["elapsed_s"] = budget.elapsed()
        write_report(report, settings.out)
    report["exit_status"] = exit_status(report)
    write_report(report, settings.out)
    return report
