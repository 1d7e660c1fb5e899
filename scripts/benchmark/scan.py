# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Benchmark of the selective-scan backends (a benchmark, not a test).

Run as ``python -m scripts.benchmark.scan [--json PATH] [--length 4096] [--backends chunked naive] ...``.

For each backend it measures, each case in a fresh subprocess so that peak memory is not shared between cases:

- ``forward``: the scan under ``torch.no_grad()`` (inference);
- ``forward_backward``: the scan with gradients for u, delta, A, B, C, D, z and delta_bias, then ``backward()``.

Times are medians over ``--repeats`` runs after ``--warmup`` runs: wall clock, and the process's CPU time
(``time.process_time``, less sensitive to other jobs on a shared machine; with several threads it sums them).
Peak memory is the growth of the process's lifetime peak resident set size
(:func:`scripts.benchmark.probes.lifetime_peak_rss_mib`, ``ru_maxrss``) during the first run, over a baseline taken
after the inputs are allocated. The JSON is written atomically. The inputs follow a Mamba layer: ``A = -(1..N)``, ``delta_bias`` with
softplus, ``D`` and the ``z`` gate.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import subprocess
import sys
import time

import torch

from scripts.benchmark.probes import lifetime_peak_rss_mib
from scripts.io_utils import atomic_write_json

# the package re-exports the function under the module's name, so fetch the module itself
scan_module = importlib.import_module("scripts.networks.selective_scan")

__all__ = ["main", "run_case"]

logger = logging.getLogger(__name__)

MODES = ("forward", "forward_backward")


def _make_inputs(batch: int, channels: int, state: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped like one Mamba layer's scan (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, channels, length, generator=gen),
        "delta": torch.randn(batch, channels, length, generator=gen) * 0.5,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": torch.randn(batch, state, length, generator=gen),
        "C": torch.randn(batch, state, length, generator=gen),
        "D": torch.ones(channels),
        "z": torch.randn(batch, channels, length, generator=gen),
        "delta_bias": torch.full((channels,), -4.0),
    }


def run_case(
    backend: str,
    mode: str,
    batch: int,
    channels: int,
    state: int,
    length: int,
    chunk_size: int,
    repeats: int,
    warmup: int,
) -> dict:
    """Time one (backend, mode) case in this process and return its figures (call it in a fresh process)."""
    inputs = _make_inputs(batch, channels, state, length)
    if mode == "forward_backward":
        for t in inputs.values():
            t.requires_grad_(True)

    def once() -> None:
        if mode == "forward":
            with torch.no_grad():
                scan_module.selective_scan(**inputs, delta_softplus=True, backend=backend, chunk_size=chunk_size)
        else:
            y = scan_module.selective_scan(**inputs, delta_softplus=True, backend=backend, chunk_size=chunk_size)
            y.sum().backward()
            for t in inputs.values():
                t.grad = None

    baseline = lifetime_peak_rss_mib()
    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    peak = lifetime_peak_rss_mib() - baseline
    for _ in range(max(0, warmup - 1)):
        once()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        once()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "backend": backend,
        "mode": mode,
        "median_s": statistics.median(times) if times else first,
        "min_s": min(times) if times else first,
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else float("nan"),
        "first_run_s": first,
        "peak_mem_mib": peak,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark.scan", description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--length", type=int, default=4096, help="sequence length L")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--channels", type=int, default=512, help="channels D")
    parser.add_argument("--state", type=int, default=16, help="state size N")
    parser.add_argument("--chunk-size", type=int, default=scan_module.DEFAULT_CHUNK_SIZE, help="chunk of 'chunked'")
    parser.add_argument("--backends", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case (the first one gives the memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.length, args.batch, args.channels, args.state, args.chunk_size) < 1 or args.repeats < 1:
        parser.error("sizes, --chunk-size and --repeats must be positive integers")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every case in a fresh subprocess, log the table and optionally write JSON."""
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [args.batch, args.channels, args.state, args.length, args.chunk_size, args.repeats, args.warmup]
    if args.worker:
        result = run_case(args.worker[0], args.worker[1], *sizes)
        sys.stdout.write(json.dumps(result) + "\n")
        return [result]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    common = ["--length", str(args.length), "--batch", str(args.batch), "--channels", str(args.channels)]
    common += ["--state", str(args.state), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    common += ["--warmup", str(args.warmup), "--threads", str(torch.get_num_threads())]
    results = []
    for backend in args.backends:
        for mode in args.modes:
            cmd = [sys.executable, "-m", "scripts.benchmark.scan", *common, "--worker", backend, mode]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark case {backend}/{mode} failed:\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            logger.info("done %s/%s", backend, mode)
    header = (
        f"selective scan on CPU: B={args.batch} D={args.channels} N={args.state} L={args.length} float32, "
        f"chunk={args.chunk_size}, torch threads={torch.get_num_threads()}, "
        f"repeats={args.repeats}, warmup={args.warmup}"
    )
    logger.info(header)
    columns = ("backend", "mode", "median_s", "min_s", "median_cpu_s", "peak_mem_MiB")
    logger.info("%-8s %-17s %10s %10s %14s %14s", *columns)
    for r in results:
        row = (r["backend"], r["mode"], r["median_s"], r["min_s"], r["median_cpu_s"], r["peak_mem_mib"])
        logger.info("%-8s %-17s %10.3f %10.3f %14.3f %14.1f", *row)
    by_key = {(r["backend"], r["mode"]): r for r in results}
    for mode in args.modes:
        if ("chunked", mode) in by_key and ("naive", mode) in by_key:
            c, n = by_key[("chunked", mode)], by_key[("naive", mode)]
            logger.info(
                "%s: chunked is %.2fx faster than naive, peak memory ratio chunked/naive %.3f",
                mode, n["median_s"] / c["median_s"], c["peak_mem_mib"] / max(n["peak_mem_mib"], 1e-9),
            )
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "worker"} | {"threads": torch.get_num_threads()}
        memory = "growth of ru_maxrss over the baseline after allocating the inputs, first run"
        atomic_write_json({"config": config, "memory": memory, "results": results}, args.json)
    return results


if __name__ == "__main__":
    main()
