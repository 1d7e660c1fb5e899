# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""How the models' CPU time holds on a busy machine: the same benchmark alone, then several copies at once.

``python -m scripts.benchmark.contention --copies 2 --out DIR -- <arguments of python -m scripts.benchmark>`` runs
the benchmark once alone (``DIR/quiet``), then ``--copies`` copies of it at the same time (``DIR/copy1`` ...), and
writes ``DIR/contention.json`` and ``DIR/contention.md``: for every model and timed phase, the median process CPU time
per call alone, the median and the range over all the copies' calls under contention, and their ratio. Wall-clock
time under contention says little (the copies share the cores); CPU time shows the work a model does per call,
which grows under contention when it spends time in many small multithreaded operations (waiting threads spin).
The copies run without the memory, sliding-window and scaling phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.benchmark.rounds import spread
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["main", "summarise"]

logger = logging.getLogger(__name__)

_PHASE_OFF = ["--no-memory", "--no-sliding", "--scaling-sizes"]


def _cpu_times(results: dict[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """Process CPU seconds of every timed call of a benchmark ``results.json``, by (model, size, mode)."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for model, by_size in results.get("models", {}).items():
        for size, by_mode in by_size.items():
            for mode, result in by_mode.items():
                calls = [m["cpu_s"] for m in result.get("measurements", [])] if isinstance(result, dict) else []
                if calls:
                    out[(model, size, mode)] = calls
    return out


def _loads(results: dict[str, Any]) -> list[float]:
    return [
        m["load_1min"]
        for by_size in results.get("models", {}).values()
        for by_mode in by_size.values()
        for result in by_mode.values()
        for m in result.get("measurements", [])
        if m.get("load_1min") is not None
    ]


def summarise(quiet: dict[str, Any], loaded: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, size, mode) timed both alone and under contention.

    Args:
        quiet: ``results.json`` of the run alone.
        loaded: ``results.json`` of each copy run at the same time.

    Returns:
        Rows with ``model``, ``size``, ``mode``, ``quiet_cpu_s`` (median), ``loaded_cpu`` (:func:`spread` of the CPU
        seconds of all the copies' calls) and ``ratio`` (loaded median / quiet median).
    """
    alone = _cpu_times(quiet)
    busy: dict[tuple[str, str, str], list[float]] = {}
    for results in loaded:
        for key, calls in _cpu_times(results).items():
            busy.setdefault(key, []).extend(calls)
    rows = []
    for key in alone:
        if key not in busy:
            continue
        q = statistics.median(alone[key])
        b = spread(busy[key])
        rows.append({"model": key[0], "size": key[1], "mode": key[2], "quiet_cpu_s": q, "loaded_cpu": b,
                     "ratio": b["median"] / q if q > 0 else None})
    return rows


def _markdown(rows: list[dict[str, Any]], command: list[str], copies: int, loads: list[float]) -> str:
    lines = [
        "# CPU time under contention",
        "",
        f"- Command: `{' '.join(command)}`",
        f"- {copies} copies of the benchmark at once after one run alone; 1-minute load average during the copies' "
        f"calls: {min(loads):.1f}-{max(loads):.1f}" if loads else f"- {copies} copies at once after one run alone",
        "",
        "| model | patch | phase | CPU s / call alone (median) | under contention: median [min-max] (n) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["loaded_cpu"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['model']} | {r['size']}^3 | {r['mode']} | {r['quiet_cpu_s']:.2f} | "
            f"{b['median']:.2f} [{b['min']:.2f}-{b['max']:.2f}] ({b['n']}) | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _benchmark(args: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scripts.benchmark", *args, *_PHASE_OFF, "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "benchmark.log", "w")  # noqa: SIM115 - closed with the process by the caller's wait
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def _finish(proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"the benchmark in {out} ended with exit code {code}; see {out / 'benchmark.log'}")
    return json.loads((out / "results.json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    from scripts.cli import CommandLineError, OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m scripts.benchmark.contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=2, help="copies of the benchmark run at the same time (>= 2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="-- then the arguments of python -m scripts.benchmark")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        args = p.parse_args(argv)
        if args.copies < 2:
            raise CommandLineError(f"--copies must be at least 2, got {args.copies}.")
    except CommandLineError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    bench = [a for a in args.benchmark_args if a != "--"]
    out = Path(args.out)
    logger.info("the benchmark alone -> %s", out / "quiet")
    quiet = _finish(_benchmark(bench, out / "quiet"), out / "quiet")
    logger.info("%d copies at once -> %s/copy*", args.copies, out)
    procs = [(_benchmark(bench, out / f"copy{i + 1}"), out / f"copy{i + 1}") for i in range(args.copies)]
    try:
        loaded = [_finish(proc, folder) for proc, folder in procs]
    except RuntimeError as e:
        for proc, _ in procs:
            proc.kill()
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    rows = summarise(quiet, loaded)
    command = ["python", "-m", "scripts.benchmark.contention", *(argv if argv is not None else sys.argv[1:])]
    loads = [x for results in loaded for x in _loads(results)]
    atomic_write_json({"command": command, "copies": args.copies, "rows": rows}, out / "contention.json")
    atomic_write_text(_markdown(rows, command, args.copies, loads), out / "contention.md")
    print((out / "contention.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
