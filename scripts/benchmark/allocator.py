# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""What :func:`scripts.runtime.reuse_freed_cpu_memory` changes on CPU (a benchmark, not a test).

Run as ``python -m scripts.benchmark.allocator [--models mambaclinix swinunetr] [--size 64] [--rounds 3]``.

The allocator setting holds for a whole process, so each case runs in a fresh subprocess, once with glibc's default
``malloc`` (``system``) and once with freed memory kept for reuse (``reuse``); the two alternate (their order flips
every round) so that drift of a shared machine hits both alike. A case builds the model of
:mod:`scripts.benchmark.models`, times ``--repeats`` forward passes (batch 1, ``inference_mode``) and training steps
(batch ``--train-batch``) after one warm-up each, and reports the process's peak resident set size (``VmHWM``,
absolute: with memory kept, growth over a baseline would hide the peak). Reported: the median over rounds of each
round's median, and the ratio reuse / system. Results go to ``--json`` (written atomically) and the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "run_case", "summarize"]

logger = logging.getLogger(__name__)

SETTINGS = ("system", "reuse")


def run_case(name: str, size: int, train_batch: int, repeats: int, reuse: bool, threads: int) -> dict[str, Any]:
    """Time one model in this process (the allocator setting is applied first when ``reuse``, before torch is
    imported here).

    Returns:
        ``reuse`` (whether the setting is in effect), ``forward_s`` and ``train_s`` (medians of ``repeats`` calls after
        one warm-up) and ``forward_peak_rss_mib`` / ``train_peak_rss_mib`` (the process's peak RSS after each phase,
        :func:`scripts.benchmark.probes.peak_rss_mib`, never reset here).
    """
    from scripts.runtime import reuse_freed_cpu_memory

    applied = reuse_freed_cpu_memory() if reuse else False
    import torch

    from scripts.benchmark.probes import peak_rss_mib
    from scripts.benchmark.workload import Workload, timed

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    workload = Workload(name, torch.device("cpu"), train_batch)
    out: dict[str, Any] = {"reuse": applied}
    for key, fn in (("forward", workload.forward(size)), ("train", workload.train_step(size))):
        fn()  # warm-up
        out[f"{key}_s"] = statistics.median(timed(fn, torch.device("cpu"))[0] for _ in range(repeats))
        out[f"{key}_peak_rss_mib"] = peak_rss_mib()
    return out


def _child(name: str, size: int, train_batch: int, repeats: int, reuse: bool, threads: int) -> dict[str, Any]:
    from scripts.benchmark.probes import run_module_json

    return run_module_json(
        "scripts.benchmark.allocator", "--case", name, str(size), str(train_batch), str(repeats), "1" if reuse else "0",
        "--threads", str(threads),
    )


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median over rounds per setting and metric, and the ratio ``reuse / system`` (``runs``: setting -> cases)."""
    summary: dict[str, Any] = {}
    for setting, cases in runs.items():
        ok = [c for c in cases if "error" not in c]
        keys = sorted({k for c in ok for k in c if k.endswith(("_s", "_mib"))})
        summary[setting] = {k: statistics.median(c[k] for c in ok) for k in keys} if ok else {}
    if summary.get("system") and summary.get("reuse"):
        summary["ratio_reuse_to_system"] = {
            k: summary["reuse"][k] / summary["system"][k] for k in summary["system"] if k in summary["reuse"]
        }
    return summary


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | setting | forward (s) | train step (s) | peak RSS after train (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in result["models"].items():
        for setting in (*SETTINGS, "ratio_reuse_to_system"):
            v = entry["summary"].get(setting) or {}
            ratio = setting == "ratio_reuse_to_system"
            cells = [f"{v[k]:.{3 if ratio else 2}f}" if k in v else "-" for k in ("forward_s", "train_s")]
            rss = v.get("train_peak_rss_mib")
            cells.append("-" if rss is None else f"{rss:.{3 if ratio else 0}f}")
            lines.append(f"| {name} | {'reuse / system' if ratio else setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark.allocator", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mambaclinix", "mambaclinix_demo", "swinunetr", "dynunet"])
    p.add_argument("--size", type=int, default=64, help="cubic patch edge")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--rounds", type=int, default=3, help="alternating system/reuse rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point (``python -m scripts.benchmark.allocator --help``).

    Returns:
        The results (also written to ``--json``), or ``None`` for an internal ``--case`` run.

    Raises:
        ValueError: ``--size``, ``--repeats`` or ``--rounds`` below 1, or an unknown model name.
    """
    args = _parser().parse_args(argv)
    if args.case:
        name, size, batch, repeats, reuse = args.case
        out = run_case(name, int(size), int(batch), int(repeats), reuse == "1", args.threads)
        sys.stdout.write(json.dumps(out) + "\n")
        return None
    for value, label in ((args.size, "--size"), (args.repeats, "--repeats"), (args.rounds, "--rounds")):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from scripts.benchmark.machine import describe_machine
    from scripts.benchmark.models import parse_model_name
    from scripts.io_utils import atomic_write_json
    from scripts.runtime import load_average

    for name in args.models:
        parse_model_name(name)  # raises ValueError on an unknown model or option
    result: dict[str, Any] = {
        "machine": describe_machine("cpu", args.threads),
        "settings": {k: getattr(args, k) for k in ("models", "size", "train_batch", "repeats", "rounds", "threads")},
        "load_average_start": load_average(),
        "models": {name: {"runs": {s: [] for s in SETTINGS}} for name in args.models},
    }
    for r in range(args.rounds):
        for name in args.models:
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                case = _child(name, args.size, args.train_batch, args.repeats, setting == "reuse", args.threads)
                logger.info("round %d %s %s: %s", r + 1, name, setting, case)
                result["models"][name]["runs"][setting].append(case)
    for entry in result["models"].values():
        entry["summary"] = summarize(entry["runs"])
    result["load_average_end"] = load_average()
    result["table"] = _markdown(result)
    logger.info("\n%s", result["table"])
    if args.json:
        atomic_write_json(result, args.json, indent=1)
        logger.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    main()
