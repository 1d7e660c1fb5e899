# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""How the models' CPU time holds on a busy machine: the same benchmark alone, then several copies at once.

``python -m scripts.benchmark.contention --copies 2 --out DIR -- <arguments of python -m scripts.benchmark>`` runs
the benchmark once alone (``DIR/quiet``), then ``--copies`` copies of it at the same time (``DIR/copy1`` ...), and
writes ``DIR/contention.json`` and ``DIR/contention.md`` (with the machine, its threads and their OpenMP wait
policy, which the copies inherit from this process's environment): for every model and timed phase, the median
process CPU time per call alone, the median and the range over all the copies' calls under contention, and their ratio. Wall-clock
time under contention says little (the copies share the cores); CPU time shows the work a model does per call,
which grows under contention when it spends time in many small multithreaded operations (waiting threads spin).
The copies run without the memory, sliding-window and scaling phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.benchmark.machine import summarize_machine
from scripts.benchmark.rounds import spread
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["main", "summarise"]

logger = logging.getLogger(__name__)

_PHASE_OFF = ["--no-memory", "--no-sliding", "--scaling-sizes"]


def _cpu_times(results: dict[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """Process CPU seconds of every timed call of a benchmark ``results.json``, by (model, size, mode)."""
    return {key: [m["cpu_s"] for m in calls] for key, calls in _measurements(results).items()}


def _measurements(results: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The timed calls of a benchmark ``results.json`` (``models.<model>.sizes.<edge>.<mode>.measurements``), by
    (model, size, mode)."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for model, entry in results.get("models", {}).items():
        for size, by_mode in entry.get("sizes", {}).items():
            for mode in ("forward", "train"):
                calls = by_mode.get(mode, {}).get("measurements", []) if isinstance(by_mode.get(mode), dict) else []
                if calls:
                    out[(model, size, mode)] = calls
    return out


def _loads(results: dict[str, Any]) -> list[float]:
    return [m["load_1min"] for calls in _measurements(results).values() for m in calls if m.get("load_1min") is not None]


def summarise(quiet: dict[str, Any], loaded: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, size, mode) timed both alone and under contention.

    Args:
        quiet: ``results.json`` of the run alone.
        loaded: ``results.json`` of each copy run at the same time.

    Returns:
        Rows with ``model``, ``size``, ``mode``, ``quiet_cpu`` and ``loaded_cpu`` (:func:`spread` of the CPU seconds
        of the calls alone and of all the copies' calls), ``ratio`` (loaded median / quiet median) and
        ``worst_ratio`` (loaded maximum / quiet median).
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
        q, b = spread(alone[key]), spread(busy[key])
        rows.append({"model": key[0], "size": key[1], "mode": key[2], "quiet_cpu": q, "loaded_cpu": b,
                     "ratio": b["median"] / q["median"] if q["median"] > 0 else None,
                     "worst_ratio": b["max"] / q["median"] if q["median"] > 0 else None})
    return rows


def _markdown(rows: list[dict[str, Any]], command: list[str], copies: int, loads: list[float],
              machine: dict[str, Any] | None = None) -> str:
    lines = [
        "# CPU time under contention",
        "",
        f"- Command: `{' '.join(command)}`",
        *([f"- Machine (the run alone): {summarize_machine(machine)}"] if machine else []),
        f"- {copies} copies of the benchmark at once after one run alone; 1-minute load average during the copies' "
        f"calls: {min(loads):.1f}-{max(loads):.1f}" if loads else f"- {copies} copies at once after one run alone",
        "",
        "| model | patch | phase | CPU s / call alone: median [min-max] (n) | under contention: median [min-max] (n) "
        "| ratio of medians | worst call / median alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q, b = r["quiet_cpu"], r["loaded_cpu"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        worst = "-" if r["worst_ratio"] is None else f"{r['worst_ratio']:.2f}"
        lines.append(
            f"| {r['model']} | {r['size']}^3 | {r['mode']} | {q['median']:.2f} [{q['min']:.2f}-{q['max']:.2f}] ({q['n']}) | "
            f"{b['median']:.2f} [{b['min']:.2f}-{b['max']:.2f}] ({b['n']}) | {ratio} | {worst} |"
        )
    return "\n".join(lines) + "\n"


def _benchmark(args: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scripts.benchmark", *args, *_PHASE_OFF, "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark.log", "w") as log:  # the child keeps its own descriptor
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
    p.add_argument("--render-only", action="store_true",
                   help="summarise the results.json files already in OUT/quiet and OUT/copy1..N without running")
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
    folders = [out / f"copy{i + 1}" for i in range(args.copies)]
    if args.render_only:
        missing = [str(f / "results.json") for f in [out / "quiet", *folders] if not (f / "results.json").is_file()]
        if missing:
            print(f"ERROR: --render-only needs {', '.join(missing)}", file=sys.stderr)
            return 2
        quiet = json.loads((out / "quiet" / "results.json").read_text())
        loaded = [json.loads((f / "results.json").read_text()) for f in folders]
    else:
        logger.info("the benchmark alone -> %s", out / "quiet")
        try:
            quiet = _finish(_benchmark(bench, out / "quiet"), out / "quiet")
            logger.info("%d copies at once -> %s/copy*", args.copies, out)
            procs = [_benchmark(bench, folder) for folder in folders]
            try:
                loaded = [_finish(proc, folder) for proc, folder in zip(procs, folders)]
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
        except RuntimeError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 1
    rows = summarise(quiet, loaded)
    command = ["python", "-m", "scripts.benchmark.contention", *(argv if argv is not None else sys.argv[1:])]
    loads = [x for results in loaded for x in _loads(results)]
    atomic_write_json({"command": command, "copies": args.copies, "rows": rows}, out / "contention.json")
    atomic_write_text(_markdown(rows, command, args.copies, loads, quiet.get("machine")), out / "contention.md")
    print((out / "contention.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
