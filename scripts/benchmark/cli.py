# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Speed, FLOP and memory benchmark of MambaClinix against MONAI baselines (a benchmark, not a test).

The command line of :mod:`scripts.benchmark`: ``python -m scripts.benchmark --help`` lists every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from scripts.benchmark.models import DEFAULT_MODELS, OPTIONS, SCALING_MODELS
from scripts.benchmark.peers import AUTHORS_DEFAULT_MODULE, AUTHORS_MODULE_ENV
from scripts.benchmark.probes import memory_case
from scripts.benchmark.report import write_outputs
from scripts.benchmark.runners import run_benchmark
from scripts.benchmark.worker import ALLOCATORS

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.benchmark`` (``--memory-case`` is internal: one case of
    :func:`scripts.benchmark.probes.measure_memory`, run in a fresh process, printed as one JSON line)."""
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"models (default {' '.join(DEFAULT_MODELS)}); +options: {OPTIONS}")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="patch edges for forward/FLOPs (default 64 96; GPU adds 128)")
    p.add_argument("--train-sizes", nargs="+", type=int, default=None, help="patch edges of the training step (default 64)")
    p.add_argument("--memory-sizes", nargs="+", type=int, default=None, help="patch edges of the peak-memory cases (default 64)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                   help="timed rounds: every model once per round, the order rotated by one each round (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model before the rounds of each phase")
    p.add_argument("--allocator", default="reuse", choices=ALLOCATORS,
                   help="C allocator of the timing processes: reuse (the bundle's default, scripts.runtime."
                        "reuse_freed_cpu_memory) or system (glibc's defaults, a labelled variant)")
    p.add_argument("--reference", default="mambaclinix", help="the model whose per-round ratios to the others are reported")
    p.add_argument("--authors-module", default=None,
                   help=f"module of the authors' network for the 'authors' peer (default ${AUTHORS_MODULE_ENV} or "
                        f"{AUTHORS_DEFAULT_MODULE})")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-models", nargs="*", default=None,
                   help="extra models for peak memory only (default mambaclinix+naive)")
    p.add_argument("--no-sliding", action="store_true")
    p.add_argument("--sliding-models", nargs="+", default=None)
    p.add_argument("--sliding-volume", type=int, default=160)
    p.add_argument("--sliding-roi", type=int, default=None)
    p.add_argument("--scaling-sizes", nargs="*", type=int, default=None, help="default 32 64 96 128 (CPU); none to skip")
    p.add_argument("--scaling-models", nargs="+", default=list(SCALING_MODELS))
    p.add_argument("--max-call-s", type=float, default=120.0, help="skip a case whose single call takes longer")
    p.add_argument("--quick", action="store_true", help="64^3 only, 1 round, no memory/sliding/scaling")
    p.add_argument("--out", default="docs/benchmarks", help="output folder")
    p.add_argument("--no-write", action="store_true", help="print the JSON instead of writing the outputs")
    p.add_argument("--render", metavar="RESULTS_JSON", help="only re-write the table, README and plots from a results.json")
    p.add_argument("--memory-case", nargs=3, metavar=("MODEL", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point (``python -m scripts.benchmark --help``).

    Runs :func:`scripts.benchmark.runners.run_benchmark` with the options given (``--quick``: 64^3 only, one
    round, no memory, sliding-window or scaling cases; ``--authors-module`` sets
    :data:`scripts.benchmark.peers.AUTHORS_MODULE_ENV` for the run and its processes; on CUDA the chunked and,
    where available, the CUDA scan backends are added to the default models) and writes the outputs of
    :func:`scripts.benchmark.report.write_outputs` with the command line recorded; ``--render`` re-writes them from a ``results.json`` without measuring.

    Returns:
        The results (``None`` for an internal ``--memory-case`` run).

    Raises:
        ValueError: an invalid option value (see :func:`scripts.benchmark.runners.run_benchmark`).
    """
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_case:
        name, size, batch = args.memory_case
        out = memory_case(name, int(size), int(batch), torch.device("cpu"))
        sys.stdout.write(json.dumps(out) + "\n")
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        with open(args.render) as f:
            rendered = json.load(f)
        for path in write_outputs(rendered, args.out, rendered.get("command")):
            logger.info("wrote %s", path)
        return rendered
    if args.authors_module:
        os.environ[AUTHORS_MODULE_ENV] = args.authors_module  # the worker processes inherit it
    cuda = torch.device(args.device).type == "cuda"
    models = args.models or list(DEFAULT_MODELS)
    if cuda and args.models is None:
        from scripts.networks.selective_scan import cuda_scan_available

        models += ["mambaclinix+chunked"] + (["mambaclinix+cuda"] if cuda_scan_available() else [])
    sizes = args.sizes or ([64, 96, 128] if cuda else [64, 96])
    scaling = args.scaling_sizes if args.scaling_sizes is not None else [32, 64, 96, 128]
    kwargs: dict[str, Any] = {}
    if args.quick:
        sizes, scaling = (args.sizes or [64]), (args.scaling_sizes or [])
        kwargs.update(rounds=1, warmup=1, memory=False, sliding=False)
    result = run_benchmark(
        models=models, sizes=sizes, rounds=kwargs.get("rounds", args.rounds), warmup=kwargs.get("warmup", args.warmup),
        threads=args.threads, device=args.device, modes=args.modes,
        train_sizes=args.train_sizes or [min(sizes)], train_batch=args.train_batch,
        memory=kwargs.get("memory", not args.no_memory), memory_sizes=args.memory_sizes or [min(sizes)],
        sliding=kwargs.get("sliding", not args.no_sliding), sliding_volume=args.sliding_volume,
        sliding_roi=args.sliding_roi, sliding_models=args.sliding_models, scaling_sizes=scaling,
        scaling_models=args.scaling_models, max_call_s=args.max_call_s,
        memory_models=args.memory_models if args.memory_models is not None else ["mambaclinix+naive"],
        allocator=args.allocator, reference=args.reference,
    )
    command = "python -m scripts.benchmark" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    if args.no_write:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        for path in write_outputs(result, args.out, command):
            logger.info("wrote %s", path)
    return result

