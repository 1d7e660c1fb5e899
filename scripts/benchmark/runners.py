# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark run: timed cases interleaved over the models, sliding-window inference, the patch-edge scaling
study, and the FLOP and peak-memory figures of each case (see :mod:`scripts.benchmark` for what is measured)."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scripts.benchmark.machine import describe_machine
from scripts.benchmark.models import (
    DEFAULT_MODELS,
    MODELS,
    SCALING_MODELS,
    build_model,
    count_parameters,
    edge_problem,
    parse_model_name,
)
from scripts.benchmark.probes import count_flops, measure_memory, measure_peaks
from scripts.benchmark.workload import Workload, timed
from scripts.runtime import reuse_freed_cpu_memory

__all__ = ["fit_exponent", "run_benchmark"]

logger = logging.getLogger(__name__)


def fit_exponent(edges: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope ``k`` of ``log t = a + k log edge`` (``None`` with fewer than two points)."""
    if len(edges) < 2:
        return None
    return float(np.polyfit(np.log(np.asarray(edges, float)), np.log(np.asarray(times, float)), 1)[0])


def _summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    walls = [s[0] for s in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "runs_s": [round(w, 4) for w in walls],
        "cpu_median_s": statistics.median(s[1] for s in samples),
    }


def _round_robin(
    workloads: dict[str, Workload],
    make: Callable[[Workload], Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    max_call_s: float,
    predicted: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Time ``make(workload)()`` for every workload, interleaved over repetitions; skip calls that are too slow."""
    results: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, workload in workloads.items():
        if predicted.get(name, 0.0) > max_call_s:
            results[name] = {"skipped": f"predicted {predicted[name]:.0f} s per call > --max-call-s {max_call_s:.0f}"}
            continue
        try:
            fn = make(workload)
            first = timed(fn, device)[0]
            if workload.compiled:  # the first call compiles: judge the speed by the second
                first = timed(fn, device)[0]
            for _ in range(max(0, warmup - 1)):
                fn()
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: record it and go on with the others
            logger.warning("%s failed: %s", name, e)
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        if first > max_call_s:
            results[name] = {"skipped": f"first call took {first:.0f} s > --max-call-s {max_call_s:.0f}", "first_s": first}
            continue
        fns[name] = fn
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    for name, s in samples.items():
        results[name] = _summary(s)
    return results


def _sliding_window(
    workloads: dict[str, Workload], volume: int, roi: int, repeats: int, device: torch.device, max_call_s: float
) -> dict[str, Any]:
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=1, overlap=0.5)
    x = torch.randn(1, 1, volume, volume, volume, generator=torch.Generator().manual_seed(0)).to(device)

    def make(workload: Workload) -> Callable[[], Any]:
        def run():
            workload.model.eval()
            with torch.inference_mode():
                return inferer(x, workload.infer)

        return run

    return _round_robin(workloads, make, repeats, 0, device, max_call_s, {})


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    sizes: Sequence[int] = (64, 96),
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    device: str = "cpu",
    modes: Sequence[str] = ("forward", "train"),
    train_sizes: Sequence[int] | None = (64,),
    train_batch: int = 2,
    memory: bool = True,
    memory_sizes: Sequence[int] | None = (64,),
    sliding: bool = True,
    sliding_volume: int = 160,
    sliding_roi: int | None = None,
    sliding_models: Sequence[str] | None = None,
    sliding_repeats: int = 1,
    scaling_sizes: Sequence[int] = (),
    scaling_models: Sequence[str] = SCALING_MODELS,
    scaling_repeats: int = 1,
    max_call_s: float = 120.0,
    peaks: bool = True,
    conv_scale: float = 1.0,
    matmul_n: int = 2048,
    memory_models: Sequence[str] = (),
    cpu_memory_reuse: bool = False,
) -> dict[str, Any]:
    """Run the benchmark and return its results as a JSON-serialisable dict (see :mod:`scripts.benchmark`).

    Times are medians after ``warmup`` calls; the repetitions are interleaved (round-robin over the models within
    each repetition) so that drift of a shared machine hits all models alike, and each timing also records the
    process CPU time. A model/size whose first call exceeds ``max_call_s`` (or is predicted to, from a smaller size
    and time proportional to voxels) is skipped and the reason recorded; so is an edge the model does not divide.

    Args:
        models: model names (keys of :data:`scripts.benchmark.models.MODELS`, optionally with ``+`` options).
        sizes: cubic patch edges for forward latency and FLOPs.
        repeats: timed runs per case (medians reported).
        warmup: untimed runs before timing (the first one also decides skipping).
        threads: ``torch.set_num_threads`` value.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        modes: ``"forward"`` and/or ``"train"``.
        train_sizes: edges for the training step (``None``: all ``sizes``).
        train_batch: batch size of the training step and its peak memory.
        memory: measure peak memory.
        memory_sizes: edges for peak memory (``None``: all ``sizes``).
        sliding: time sliding-window inference on a ``sliding_volume^3`` volume.
        sliding_volume: edge of that volume.
        sliding_roi: window edge (default 64 on CPU, 96 on CUDA).
        sliding_models: models for sliding-window inference (default all).
        sliding_repeats: timed sliding-window runs (no warm-up: the forward timings warmed the models up).
        scaling_sizes: edges of the latency-vs-edge study (forward only); edges in ``sizes`` are reused.
        scaling_models: models of the scaling study (those not in ``models`` are added for it).
        scaling_repeats: timed runs per scaling point.
        max_call_s: skip a case whose single call takes (or is predicted to take) longer than this.
        peaks: measure the dense matmul peak and 3D-conv throughput.
        conv_scale: factor on the edges of the conv-throughput cases (smaller for a quick smoke test).
        matmul_n: size of the square matmul that measures the dense peak.
        memory_models: extra models measured for peak memory only (e.g. ``mambaclinix+naive``).
        cpu_memory_reuse: on CPU, time with :func:`scripts.runtime.reuse_freed_cpu_memory` in effect, as the
            bundle's configs run (it holds for the rest of this process). The peak-memory subprocesses keep the
            system allocator: with freed memory kept, the growth over a baseline would not show a step's peak.

    Raises:
        ValueError: CUDA requested but not available, or an unknown mode or model name.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu.")
    for m in modes:
        if m not in ("forward", "train"):
            raise ValueError(f"modes must be 'forward' and/or 'train', got {m!r}.")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reuse = reuse_freed_cpu_memory() if cpu_memory_reuse and dev.type == "cpu" else False
    started = time.time()
    result: dict[str, Any] = {
        "machine": describe_machine(dev, threads),
        "settings": {
            "models": list(models), "sizes": list(sizes), "repeats": repeats, "warmup": warmup, "modes": list(modes),
            "train_sizes": list(train_sizes) if train_sizes is not None else list(sizes), "train_batch": train_batch,
            "device": str(dev), "threads": threads, "max_call_s": max_call_s, "sliding_volume": sliding_volume,
            "scaling_sizes": list(scaling_sizes), "scaling_models": list(scaling_models),
            "memory_models": list(memory_models), "cpu_memory_reuse": reuse,
        },
        "load_average_start": list(os.getloadavg()),
        "models": {},
    }
    if peaks:
        logger.info("measuring the matmul peak and conv throughput")
        result["peaks"] = measure_peaks(dev, matmul_n=matmul_n, conv_scale=conv_scale)
    all_names = list(dict.fromkeys(list(models) + ([s for s in scaling_models] if scaling_sizes else [])))
    workloads = {name: Workload(name, dev, train_batch) for name in all_names}
    for name, workload in workloads.items():
        result["models"][name] = {
            "description": MODELS[parse_model_name(name)[0]], "params": workload.params, "sizes": {},
        }

    def entry(name: str, size: int) -> dict[str, Any]:
        return result["models"][name]["sizes"].setdefault(str(size), {})

    train_sizes = list(sizes) if train_sizes is None else list(train_sizes)
    memory_sizes = list(sizes) if memory_sizes is None else list(memory_sizes)
    last_fwd: dict[str, tuple[int, float]] = {}
    last_train: dict[str, tuple[int, float]] = {}

    def predict(last: dict[str, tuple[int, float]], size: int) -> dict[str, float]:
        return {n: t * (size / s) ** 3 for n, (s, t) in last.items()}

    def valid(names: Sequence[str], size: int) -> dict[str, Workload]:
        chosen = {}
        for n in names:
            problem = edge_problem(n, size)
            if problem:
                entry(n, size)["skipped"] = problem
            else:
                chosen[n] = workloads[n]
        return chosen

    for size in sorted(set(sizes) | set(train_sizes)):
        chosen = valid(models, size)
        for name, workload in list(chosen.items()):
            try:
                entry(name, size)["flops"] = count_flops(workload.model, size)
            except (RuntimeError, ValueError) as e:  # e.g. instance norm over a single bottleneck voxel
                entry(name, size)["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                del chosen[name]
        if "forward" in modes and size in sizes:
            logger.info("forward latency at %d^3", size)
            for name, r in _round_robin(chosen, lambda w: w.forward(size), repeats, warmup, dev, max_call_s,
                                        predict(last_fwd, size)).items():
                entry(name, size)["forward"] = r
                if "median_s" in r:
                    last_fwd[name] = (size, r["median_s"])
                    flops = entry(name, size)["flops"]["total"]
                    r["gflops_per_s"] = flops / r["median_s"] / 1e9
                    if peaks:
                        r["fraction_of_matmul_peak"] = r["gflops_per_s"] / result["peaks"]["matmul_gflops"]
                        r["flop_proportional_s"] = flops / (result["peaks"]["conv3d_gflops"] * 1e9)
                        r["ratio_to_flop_proportional"] = r["median_s"] / r["flop_proportional_s"]
                        cf_peak = result["peaks"].get("conv3d_gflops_by_layout", {}).get("channels_first")
                        if cf_peak:
                            r["ratio_to_flop_proportional_channels_first"] = r["median_s"] * cf_peak * 1e9 / flops
        if "train" in modes and size in train_sizes:
            logger.info("training step at %d^3 (batch %d)", size, train_batch)
            for name, r in _round_robin(chosen, lambda w: w.train_step(size), repeats, warmup, dev, max_call_s,
                                        predict(last_train, size)).items():
                entry(name, size)["train"] = r
                if "median_s" in r:
                    last_train[name] = (size, r["median_s"])
        if memory and size in memory_sizes:
            for name in memory_models:
                result["models"].setdefault(name, {
                    "description": MODELS[parse_model_name(name)[0]] + " (peak memory only)",
                    "params": count_parameters(build_model(name)), "sizes": {},
                })
            for name in list(chosen) + [n for n in memory_models if n not in chosen and not edge_problem(n, size)]:
                if parse_model_name(name)[1] & {"compile", "freeze"}:
                    entry(name, size)["memory"] = {"error": "not measured for compiled models (compilation dominates)"}
                    continue
                logger.info("peak memory of %s at %d^3", name, size)
                entry(name, size)["memory"] = measure_memory(name, size, train_batch, str(dev), threads)

    if sliding:
        roi = sliding_roi or (96 if dev.type == "cuda" else 64)
        names = list(sliding_models) if sliding_models is not None else list(models)
        logger.info("sliding-window inference, %d^3 volume, roi %d^3", sliding_volume, roi)
        chosen = valid(names, roi)
        result["sliding_window"] = {
            "volume": [1, 1] + [sliding_volume] * 3, "roi": roi, "overlap": 0.5, "sw_batch_size": 1,
            "results": _sliding_window(chosen, sliding_volume, roi, sliding_repeats, dev, max_call_s * 20),
        }

    if scaling_sizes:
        scaling: dict[str, Any] = {"sizes": list(scaling_sizes), "models": {}}
        points: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in scaling_models}
        last: dict[str, tuple[int, float]] = {}
        for size in sorted(scaling_sizes):
            todo = []
            for n in scaling_models:
                problem = edge_problem(n, size)
                if problem:
                    points[n][size] = {"skipped": problem}
                elif "forward" in result["models"][n]["sizes"].get(str(size), {}):
                    points[n][size] = result["models"][n]["sizes"][str(size)]["forward"]
                else:
                    todo.append(n)
            logger.info("scaling: forward latency at %d^3", size)
            timed_points = _round_robin({n: workloads[n] for n in todo}, lambda w: w.forward(size), scaling_repeats,
                                        warmup, dev, max_call_s, predict(last, size))
            points = {n: {**p, **({size: timed_points[n]} if n in timed_points else {})} for n, p in points.items()}
            for n in scaling_models:
                if "median_s" in points[n].get(size, {}):
                    last[n] = (size, points[n][size]["median_s"])
        for n, p in points.items():
            ok = [(s, r["median_s"]) for s, r in sorted(p.items()) if "median_s" in r]
            scaling["models"][n] = {
                "points": {str(s): r for s, r in sorted(p.items())},
                "exponent": fit_exponent([s for s, _ in ok], [t for _, t in ok]),
            }
        result["scaling"] = scaling
    result["load_average_end"] = list(os.getloadavg())
    result["elapsed_s"] = time.time() - started
    return result
