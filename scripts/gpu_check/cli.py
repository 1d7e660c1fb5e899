# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""What runs on this GPU, and how well: environment, kernel parity, AMP training, speed and memory (a script, not a
test). ``python -m scripts.gpu_check --out DIR``; ``--help`` lists the options and their CUDA / CPU defaults."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scripts.cli import CommandLineError, OneLineArgumentParser
from scripts.gpu_check.budget import Budget
from scripts.gpu_check.plans import PLANS, size_problem
from scripts.gpu_check.report import JSON_NAME, MARKDOWN_NAME
from scripts.gpu_check.runner import SECTIONS, Settings, run_checks

__all__ = ["CPU_DEFAULTS", "CUDA_DEFAULTS", "build_parser", "main", "resolve_settings"]

CUDA_DEFAULTS: dict[str, Any] = {
    "plan": "default", "size": 128, "amp_size": 128, "amp_steps": 10, "amp_batch": 2, "train_batch": 2,
    "sliding_size": 256, "warmup": 2, "repeats": 5, "budget_s": 480.0,
}
"""Defaults on CUDA: the default 6-stage plan at 128^3, a 256^3 sliding-window volume, an 8-minute budget."""

CPU_DEFAULTS: dict[str, Any] = {
    "plan": "demo", "size": 32, "amp_size": 16, "amp_steps": 3, "amp_batch": 1, "train_batch": 1,
    "sliding_size": 48, "warmup": 1, "repeats": 1, "budget_s": 150.0,
}
"""Defaults on CPU: the bundle's demo plan at 32^3 (AMP steps at 16^3: bfloat16 convolutions are slow on CPUs without
native bf16), one timed round, a 48^3 sliding-window volume, a 150 s budget."""

_DESCRIPTION = ("What runs on this GPU machine, and how well: environment, kernel parity, AMP training, speed and "
                "memory (a script, not a test).")
_EPILOG = """\
Sections, in order: environment, parity, amp_training, timing, sliding_window, distributed. Each runs behind its own
try: its status (ok, failed, error, skipped: <reason>) and results go to DIR/gpu_check.json and DIR/gpu_check.md,
rewritten after every section. Once the time budget is spent the remaining sections are skipped. Exit status: 0 when
the run completed and no check failed (skipped sections and errors of the measuring sections timing /
sliding_window are recorded only); 1 when parity, amp_training or distributed failed or raised; 2 for bad arguments.
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.gpu_check`` (defaults ``None`` resolve to CUDA / CPU defaults)."""
    p = OneLineArgumentParser(prog="python -m scripts.gpu_check", description=_DESCRIPTION, epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)

    def default(key: str) -> str:
        return f"CUDA {CUDA_DEFAULTS[key]}, CPU {CPU_DEFAULTS[key]}"

    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--plan", choices=sorted(PLANS), default=None,
                   help=f"network plan: default = 6-stage paper plan, demo = configs/train.yaml ({default('plan')})")
    for option, kind, text in (
        ("--size", int, "patch edge of the timing and roi of the sliding window"),
        ("--amp-size", int, "patch edge of the AMP training steps"),
        ("--amp-steps", int, "AMP training steps, at least 2"),
        ("--amp-batch", int, "batch of the AMP training steps"),
        ("--train-batch", int, "batch of the timed training step"),
        ("--sliding-size", int, "edge of the sliding-window volume"),
        ("--warmup", int, "untimed rounds before the timed ones"),
        ("--repeats", int, "timed rounds"),
        ("--budget-s", float, "time budget in seconds"),
    ):
        p.add_argument(option, type=kind, default=None, help=f"{text} ({default(option[2:].replace('-', '_'))})")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"sections to run, of {', '.join(SECTIONS)} (default all)")
    return p


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The settings of a parsed command line, defaults filled in for its device.

    Raises:
        ValueError: an unusable device, size, count or output folder (the message says what to use instead).
    """
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a device ({e}); use cuda, cuda:N or cpu.") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device} is not supported; use cuda, cuda:N or cpu.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0.")
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    for key, option in (("size", "--size"), ("amp_size", "--amp-size")):
        problem = size_problem(values["plan"], values[key], option)
        if problem:
            raise ValueError(problem)
    minimum = {"amp_steps": 2, "amp_batch": 1, "train_batch": 1, "warmup": 0, "repeats": 1}
    for key, low in minimum.items():
        if values[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {low}, got {values[key]}.")
    if values["sliding_size"] < values["size"]:
        raise ValueError(f"--sliding-size {values['sliding_size']} must be at least --size {values['size']} (the roi).")
    if not values["budget_s"] > 0:
        raise ValueError(f"--budget-s must be positive seconds, got {values['budget_s']}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder.")
    return Settings(device=str(device), sections=tuple(args.sections), out=str(out), **values)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Run the check; print one line naming the files written and the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        started: ``time.monotonic()`` at the process start, from which the time budget counts (default: now).

    Returns:
        The exit status (see the epilog of :func:`build_parser`): 0, 1 (a check failed) or 2 (bad arguments).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = resolve_settings(build_parser().parse_args(argv))
        Path(settings.out).mkdir(parents=True, exist_ok=True)
    except (CommandLineError, ValueError, OSError) as e:
        sys.stderr.write(f"ERROR: {e} (python -m scripts.gpu_check --help)\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if settings.torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the bundle's configs set it on CUDA
    budget = Budget(settings.budget_s, start=started)
    report = run_checks(settings, " ".join(["python -m scripts.gpu_check", *argv]), budget=budget)
    statuses = ", ".join(f"{name} {entry['status']}" for name, entry in report["sections"].items())
    out = Path(settings.out)
    print(f"gpu_check: {statuses}; wrote {out / JSON_NAME} and {out / MARKDOWN_NAME} in "
          f"{budget.elapsed():.0f} s; exit status {report['exit_status']}")
    return int(report["exit_status"])
