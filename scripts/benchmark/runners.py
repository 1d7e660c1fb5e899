# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark run (see :mod:`scripts.benchmark` for what is measured), in phases whose measurements never overlap:

1. the machine's peaks (dense matmul and 3x3x3 convolution throughput), in a fresh process before any model runs;
   refused (measured and recorded, but no FLOP-proportional figure is derived from them) when the 1-minute load
   average exceeds the number of cores at that time;
2. peak memory, each (model, patch edge) in a fresh process (:func:`scripts.benchmark.probes.measure_memory`),
   while the model workers of phase 3 start and build their models (nothing is timed meanwhile);
3. the timed phases, each model in a worker process of its own with the run's C allocator
   (:mod:`scripts.benchmark.worker`): per patch edge the FLOPs, then forward and training-step rounds in a rotated
   order with per-round ratios of the reference model to every other model (:mod:`scripts.benchmark.rounds`);
   then sliding-window inference and the patch-edge scaling study.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scripts.benchmark.machine import describe_machine
from scripts.runtime import load_average
from scripts.benchmark.models import (
    DEFAULT_MODELS,
    MODELS,
    SCALING_MODELS,
    build_model,
    count_parameters,
    edge_problem,
    parse_model_name,
)
from scripts.benchmark.peers import authors_unavailable
from scripts.benchmark.probes import measure_memory
from scripts.benchmark.rounds import load_1min, round_ratios, run_rounds
from scripts.benchmark.worker import ALLOCATORS, ModelWorker, WorkerError

__all__ = ["fit_exponent", "flop_figures", "measure_machine_peaks", "run_benchmark"]

logger = logging.getLogger(__name__)

_COMPILED = {"compile", "freeze"}


def fit_exponent(edges: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope ``k`` of ``log t = a + k log edge`` (``None`` with fewer than two points)."""
    if len(edges) < 2:
        return None
    return float(np.polyfit(np.log(np.asarray(edges, float)), np.log(np.asarray(times, float)), 1)[0])


def measure_machine_peaks(
    device: str, threads: int, allocator: str, matmul_n: int = 2048, conv_scale: float = 1.0
) -> dict[str, Any]:
    """The machine's peaks (:func:`scripts.benchmark.probes.measure_peaks`) in a fresh worker process, alone.

    The 1-minute load average is read just before the measurement (after the process started); above the number of
    cores the peaks are ``refused``: recorded, but other processes shared the machine, so no FLOP-proportional figure
    may be derived from them (a warning is logged).

    Returns:
        The peaks with ``load_1min_before``, ``load_1min_after`` and ``cores``, plus ``refused`` (the reason) where
        the load was too high; ``{"error": ...}`` when the measurement failed.
    """
    cores = os.cpu_count() or 1
    with ModelWorker(None, device, 1, threads, allocator) as worker:
        try:
            worker.ready()
            before = load_1min()
            peaks = worker.request("peaks", matmul_n=matmul_n, conv_scale=conv_scale)
        except WorkerError as e:
            logger.warning("the machine's peaks could not be measured: %s", e)
            return {"error": str(e)}
    peaks.update(load_1min_before=before, load_1min_after=load_1min(), cores=cores)
    if before is not None and before > cores:
        peaks["refused"] = (
            f"the 1-minute load average was {before:.2f} > {cores} cores when the machine's peaks were measured: "
            "FLOP-proportional figures refused (run again on a quiet machine)"
        )
        logger.warning("WARNING: %s", peaks["refused"])
    return peaks


def flop_figures(timing: dict[str, Any], flops: float, peaks: dict[str, Any] | None) -> None:
    """Add ``gflops_per_s`` to a forward ``timing`` and, where the machine's ``peaks`` were measured and not
    refused, ``fraction_of_matmul_peak``, ``flop_proportional_s`` and ``ratio_to_flop_proportional`` (median time /
    FLOP-proportional time at the best-layout conv throughput; ``..._channels_first`` at the channels-first one)."""
    timing["gflops_per_s"] = flops / timing["median_s"] / 1e9
    if not peaks or "refused" in peaks or "error" in peaks:
        return
    timing["fraction_of_matmul_peak"] = timing["gflops_per_s"] / peaks["matmul_gflops"]
    timing["flop_proportional_s"] = flops / (peaks["conv3d_gflops"] * 1e9)
    timing["ratio_to_flop_proportional"] = timing["median_s"] / timing["flop_proportional_s"]
    cf_peak = peaks.get("conv3d_gflops_by_layout", {}).get("channels_first")
    if cf_peak:
        timing["ratio_to_flop_proportional_channels_first"] = timing["median_s"] * cf_peak * 1e9 / flops


def _drop_unavailable(names: Sequence[str], unavailable: dict[str, str]) -> list[str]:
    """``names`` without the optional peers that cannot be built here (one warning line each, reason recorded)."""
    kept = []
    for name in names:
        if parse_model_name(name)[0] == "authors" and name not in unavailable:
            reason = authors_unavailable()
            if reason:
                logger.warning("%s", reason)
                unavailable[name] = reason
        if name not in unavailable:
            kept.append(name)
    return kept


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    sizes: Sequence[int] = (64, 96),
    rounds: int = 5,
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
    allocator: str = "reuse",
    reference: str = "mambaclinix",
) -> dict[str, Any]:
    """Run the benchmark and return its results as a JSON-serialisable dict (see :mod:`scripts.benchmark`).

    Each timed phase (a mode at a patch edge) calls every model ``warmup`` times, then runs ``rounds`` rounds in
    which every model is called once, in an order rotated by one each round; every call is recorded (wall-clock
    and process CPU time, 1-minute load average before it), each model gets the median and spread of its times,
    and ``reference`` gets per-round ratios to every other model (``result["ratios"][mode][edge][peer]``). A
    model/size whose warm-up call exceeds ``max_call_s`` (or is predicted to, from a smaller size and time
    proportional to voxels) is skipped and the reason recorded; so is an edge the model does not divide, and an
    optional peer that is not installed (``result["unavailable"]``).

    Args:
        models: model names (keys of :data:`scripts.benchmark.models.MODELS`, optionally with ``+`` options).
        sizes: cubic patch edges for forward latency and FLOPs.
        rounds: timed rounds per phase (every model once per round).
        warmup: untimed calls per model before the rounds of a phase.
        threads: ``torch.set_num_threads`` of every process.
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
        sliding_repeats: rounds of sliding-window inference (no warm-up: the forward rounds warmed the models up).
        scaling_sizes: edges of the latency-vs-edge study (forward only); edges in ``sizes`` are reused.
        scaling_models: models of the scaling study (those not in ``models`` are added for it).
        scaling_repeats: rounds per scaling point.
        max_call_s: skip a case whose single call takes (or is predicted to take) longer than this.
        peaks: measure the dense matmul peak and 3D-conv throughput (in a phase of their own, first).
        conv_scale: factor on the edges of the conv-throughput cases (smaller for a quick smoke test).
        matmul_n: size of the square matmul that measures the dense peak.
        memory_models: extra models measured for peak memory only (e.g. ``mambaclinix+naive``).
        allocator: the C allocator of the timing processes (:data:`scripts.benchmark.worker.ALLOCATORS`): ``reuse``,
            the bundle's default (:func:`scripts.runtime.reuse_freed_cpu_memory`, ``cpu_memory_reuse: true`` in the
            configs), or ``system`` (glibc's defaults). The peak-memory processes keep the system allocator: with
            freed memory kept, the growth over a baseline would not show a call's peak.
        reference: the model whose per-round ratios to the others are reported (MambaClinix).

    Raises:
        ValueError: CUDA requested but not available, an unknown mode, allocator or model name, or fewer than one
            round.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu.")
    for m in modes:
        if m not in ("forward", "train"):
            raise ValueError(f"modes must be 'forward' and/or 'train', got {m!r}.")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}.")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}.")
    sliding_names = list(sliding_models) if sliding_models is not None else list(models)
    for name in [*models, *scaling_models, *sliding_names, *memory_models, reference]:
        parse_model_name(name)  # an unknown model or option: ValueError before anything runs
    started = time.time()
    unavailable: dict[str, str] = {}
    models, memory_models = _drop_unavailable(models, unavailable), _drop_unavailable(memory_models, unavailable)
    scaling_models = _drop_unavailable(scaling_models, unavailable) if scaling_sizes else []
    sliding_names = _drop_unavailable(sliding_names, unavailable) if sliding else []
    result: dict[str, Any] = {
        "machine": describe_machine(dev, threads),
        "settings": {
            "models": list(models), "sizes": list(sizes), "rounds": rounds, "warmup": warmup, "modes": list(modes),
            "train_sizes": list(train_sizes) if train_sizes is not None else list(sizes), "train_batch": train_batch,
            "device": str(dev), "threads": threads, "max_call_s": max_call_s, "sliding_volume": sliding_volume,
            "scaling_sizes": list(scaling_sizes), "scaling_models": list(scaling_models),
            "memory_models": list(memory_models), "allocator": allocator, "memory_allocator": "system",
            "reference": reference, "order": "rotated by one model each round",
        },
        "load_average_start": load_average(),
        "unavailable": unavailable,
        "models": {},
        "ratios": {},
    }

    if peaks:
        logger.info("phase 1: the machine's peaks (matmul and conv throughput), alone")
        result["peaks"] = measure_machine_peaks(str(dev), threads, allocator, matmul_n, conv_scale)
    train_sizes = list(sizes) if train_sizes is None else list(train_sizes)
    workers: dict[str, ModelWorker] = {}
    try:
        # the workers start now and build their models while the peak-memory processes run (nothing is timed then)
        for name in dict.fromkeys([*models, *scaling_models, *sliding_names]):
            workers[name] = ModelWorker(name, str(dev), train_batch, threads, allocator)
        if memory:
            _memory_phase(result, memory_models, list(sizes) if memory_sizes is None else memory_sizes, dev, threads)
        for name, worker in list(workers.items()):
            try:
                info = worker.ready()
            except WorkerError as e:
                logger.warning("%s could not be built: %s", name, e)
                _model_entry(result, name)["error"] = str(e)
                worker.close()
                del workers[name]
                continue
            _model_entry(result, name).update(params=info["params"], reuse_in_effect=info["reuse"],
                                              openmp_wait_policy=info["openmp_wait_policy"])
        result["settings"]["reuse_in_effect"] = bool(workers) and all(
            result["models"][n]["reuse_in_effect"] for n in workers
        )
        phases = _TimedPhases(result, workers, reference, max_call_s)
        phases.by_edge(sizes, train_sizes, modes, rounds, warmup)
        if sliding_names:
            phases.sliding(sliding_names, sliding_volume, sliding_roi or (96 if dev.type == "cuda" else 64),
                           sliding_repeats)
        if scaling_sizes:
            phases.scaling(scaling_sizes, scaling_models, scaling_repeats, warmup)
    finally:
        for name, worker in workers.items():
            rss = worker.peak_rss_mib()
            if rss is not None:  # what the run's allocator kept: the memory the run needs is about their sum
                _model_entry(result, name)["worker_peak_rss_mib"] = rss
            worker.close()
    result["load_average_end"] = load_average()
    result["elapsed_s"] = time.time() - started
    return result


def _model_entry(result: dict[str, Any], name: str) -> dict[str, Any]:
    """``result["models"][name]``, created with its description on first use."""
    if name not in result["models"]:
        result["models"][name] = {"description": MODELS[parse_model_name(name)[0]], "sizes": {}}
    return result["models"][name]


def _memory_phase(
    result: dict[str, Any], memory_models: Sequence[str], sizes: Sequence[int], dev: torch.device, threads: int
) -> None:
    """Phase 2 of :func:`run_benchmark`: the peak memory of each model (and memory-only model) and patch edge,
    each in a fresh process (:func:`scripts.benchmark.probes.measure_memory`), one at a time."""
    models, batch = result["settings"]["models"], result["settings"]["train_batch"]
    for size in sizes:
        for name in dict.fromkeys([*models, *memory_models]):
            if edge_problem(name, size):
                continue
            entry = _model_entry(result, name)
            if name not in models and "params" not in entry:
                entry.update(description=entry["description"] + " (peak memory only)",
                             params=count_parameters(build_model(name)))
            case = entry["sizes"].setdefault(str(size), {})
            if parse_model_name(name)[1] & _COMPILED:
                case["memory"] = {"error": "not measured for compiled models (compilation dominates)"}
                continue
            logger.info("phase 2: peak memory of %s at %d^3 (fresh process)", name, size)
            case["memory"] = measure_memory(name, size, batch, str(dev), threads)


class _TimedPhases:
    """Phase 3 of :func:`run_benchmark`: the timed rounds, written into ``result`` (its ``models`` and ``ratios``).

    Args:
        result: the run's result, with ``settings["models"]`` and, where measured, ``peaks``.
        workers: the ready worker of every model that runs.
        reference: the model whose per-round ratios are recorded.
        max_call_s: the longest call kept (:func:`scripts.benchmark.rounds.run_rounds`).
    """

    def __init__(
        self, result: dict[str, Any], workers: dict[str, ModelWorker], reference: str, max_call_s: float
    ) -> None:
        self.result, self.workers, self.reference, self.max_call_s = result, workers, reference, max_call_s

    def entry(self, name: str, size: int) -> dict[str, Any]:
        return _model_entry(self.result, name)["sizes"].setdefault(str(size), {})

    def phase(
        self, mode: str, size: int, names: Sequence[str], rounds: int, warmup: int,
        predicted: dict[str, float] | None = None, limit: float | None = None, **kwargs: Any,
    ) -> dict[str, Any]:
        """:func:`~scripts.benchmark.rounds.run_rounds` of ``mode`` at ``size`` over ``names``; the reference's
        ratios are recorded under ``result["ratios"][mode][size]`` (the first phase of that mode and size only)."""
        names = [n for n in names if n in self.workers]
        logger.info("phase 3: %s %d^3, %d round(s) over %s", mode, size, rounds, names)
        out = run_rounds(
            names, lambda n: self.workers[n].call(mode, size, **kwargs), rounds, warmup,
            self.max_call_s if limit is None else limit, predicted,
            compiled=[n for n in names if parse_model_name(n)[1] & _COMPILED],
        )
        ratios = round_ratios(out, self.reference) if self.reference in out else {}
        if ratios and str(size) not in self.result["ratios"].get(mode, {}):
            self.result["ratios"].setdefault(mode, {})[str(size)] = ratios
        return out

    def valid(self, names: Sequence[str], size: int) -> list[str]:
        """The models of ``names`` that run and divide the edge ``size`` (the others' reason is recorded)."""
        chosen = []
        for n in names:
            problem = edge_problem(n, size)
            if problem:
                self.entry(n, size)["skipped"] = problem
            elif n in self.workers:
                chosen.append(n)
        return chosen

    def by_edge(
        self, sizes: Sequence[int], train_sizes: Sequence[int], modes: Sequence[str], rounds: int, warmup: int
    ) -> None:
        """Per patch edge: the FLOPs of every model, then the forward and the training-step rounds."""
        last: dict[str, dict[str, tuple[int, float]]] = {"forward": {}, "train": {}}
        for size in sorted(set(sizes) | set(train_sizes)):
            chosen = self.valid(self.result["settings"]["models"], size)
            for name in chosen:
                try:
                    self.entry(name, size)["flops"] = self.workers[name].request("flops", size=size)
                except WorkerError as e:  # e.g. instance norm over a single bottleneck voxel
                    self.entry(name, size)["flops"] = {"error": str(e)}
            for mode, edges in (("forward", sizes), ("train", train_sizes)):
                if mode not in modes or size not in edges:
                    continue
                for name, r in self.phase(mode, size, chosen, rounds, warmup, _predict(last[mode], size)).items():
                    self.entry(name, size)[mode] = r
                    if "median_s" not in r:
                        continue
                    last[mode][name] = (size, r["median_s"])
                    flops = self.entry(name, size)["flops"].get("total")
                    if mode == "forward" and flops:
                        flop_figures(r, flops, self.result.get("peaks"))

    def sliding(self, names: Sequence[str], volume: int, roi: int, rounds: int) -> None:
        """Sliding-window inference over a ``volume^3`` volume (no warm-up: the forward rounds warmed up)."""
        self.result["sliding_window"] = {
            "volume": [1, 1] + [volume] * 3, "roi": roi, "overlap": 0.5, "sw_batch_size": 1,
            "results": self.phase("sliding", volume, self.valid(names, roi), rounds, 0, limit=self.max_call_s * 20,
                                  roi=roi),
        }

    def scaling(self, sizes: Sequence[int], models: Sequence[str], rounds: int, warmup: int) -> None:
        """Forward latency against the patch edge (edges timed already are reused) and its fitted exponent."""
        points: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in models}
        last: dict[str, tuple[int, float]] = {}
        for size in sorted(sizes):
            todo = []
            for n in models:
                problem = edge_problem(n, size)
                done = self.result["models"].get(n, {}).get("sizes", {}).get(str(size), {})
                if problem:
                    points[n][size] = {"skipped": problem}
                elif "forward" in done:
                    points[n][size] = done["forward"]
                else:
                    todo.append(n)
            for n, r in self.phase("forward", size, todo, rounds, warmup, _predict(last, size)).items():
                points[n][size] = r
            for n in models:
                if "median_s" in points[n].get(size, {}):
                    last[n] = (size, points[n][size]["median_s"])
        scaling: dict[str, Any] = {"sizes": list(sizes), "models": {}}
        for n, p in points.items():
            ok = [(s, r["median_s"]) for s, r in sorted(p.items()) if "median_s" in r]
            scaling["models"][n] = {
                "points": {str(s): r for s, r in sorted(p.items())},
                "exponent": fit_exponent([s for s, _ in ok], [t for _, t in ok]),
            }
        self.result["scaling"] = scaling


def _predict(last: dict[str, tuple[int, float]], size: int) -> dict[str, float]:
    """Call times at ``size`` predicted from the last timed edge of each model (time proportional to voxels)."""
    return {n: t * (size / s) ** 3 for n, (s, t) in last.items()}
