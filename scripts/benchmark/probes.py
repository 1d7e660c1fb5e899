# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""What the benchmarks measure besides time: FLOPs, the machine's peak throughput and peak memory.

- FLOPs (:func:`count_flops`): :class:`torch.utils.flop_counter.FlopCounterMode` on fake tensors counts matmuls,
  convolutions and attention only; the elementwise work of Mamba's selective scan is invisible to it, so the
  analytic count of mamba-ssm's reference is added for every Mamba module.
- Machine peaks (:func:`measure_peaks`): dense fp32 matmul and dense 3x3x3 convolution throughput.
- Peak memory on CPU: the process's peak resident set size since a reset (:func:`reset_peak_rss`,
  :func:`peak_rss_mib`, Linux ``VmHWM``), its lifetime peak (:func:`lifetime_peak_rss_mib`, ``ru_maxrss``), and the
  peak of the memory held by tensors (:func:`peak_tensor_mib`, from PyTorch's allocation events, independent of the
  C allocator). On CUDA, ``torch.cuda.max_memory_allocated`` after a reset.
- :func:`measure_memory`: both phases (forward, training step) of one model and patch edge, on CPU in a fresh
  subprocess (:func:`run_module_json`) so that no other case shares its peak.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from scripts.benchmark.procfs import proc_status_mib, reset_peak_rss_of
from scripts.benchmark.workload import Workload, timed

__all__ = [
    "BUNDLE_ROOT",
    "CONV_CASES",
    "bundle_env",
    "count_flops",
    "lifetime_peak_rss_mib",
    "measure_memory",
    "measure_peaks",
    "memory_case",
    "peak_rss_mib",
    "peak_tensor_mib",
    "proc_status_mib",
    "reset_peak_rss",
    "run_module_json",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The bundle's root folder: the working folder of the benchmarks' subprocesses."""

# ------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------


def _scan_flops_hooks(model: nn.Module, store: list[int]) -> list[Any]:
    """Forward hooks on every Mamba module adding the analytic selective-scan FLOPs of each call to ``store``."""
    from scripts.networks.mamba import Mamba

    def hook(module: Mamba, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        batch, length = int(inputs[0].shape[0]), int(inputs[0].shape[1])
        d, n = module.d_inner, module.d_state
        # mamba-ssm's reference count: 9 per (b, d, n, l) for the recurrence and the C contraction,
        # plus the D skip (2) and the silu(z) gate (~5) per (b, d, l), plus softplus of delta (~4)
        store.append(9 * batch * d * n * length + 11 * batch * d * length)

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Mamba)]


def count_flops(model: nn.Module, size: int, batch: int = 1) -> dict[str, float]:
    """Forward FLOPs of ``model`` on a ``(batch, 1, size, size, size)`` input, without computing anything.

    Returns:
        ``counted`` (FlopCounterMode: matmul/conv/attention), ``scan`` (analytic selective-scan count,
        ``9 * batch * d_inner * d_state * length`` for the recurrence plus the ``D`` skip, ``z`` gate and softplus,
        not seen by FlopCounterMode) and ``total``, all in FLOPs (multiply and add counted separately).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    scan: list[int] = []
    hooks = _scan_flops_hooks(model, scan)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(batch, 1, size, size, size, device=next(model.parameters()).device)
            with FlopCounterMode(display=False) as counter:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counted = float(counter.get_total_flops())
    return {"counted": counted, "scan": float(sum(scan)), "total": counted + float(sum(scan))}


# ------------------------------------------------------------------------------------------------------------
# machine peaks
# ------------------------------------------------------------------------------------------------------------

CONV_CASES = ((32, 64), (64, 32), (128, 16))
"""(channels, edge) of the dense 3x3x3 convolutions timed for the conv throughput (MambaClinix's main convs)."""


def measure_peaks(device: torch.device, repeats: int = 5, matmul_n: int = 2048, conv_scale: float = 1.0) -> dict[str, Any]:
    """Measured dense fp32 matmul peak and dense 3D convolution throughput (GFLOP/s) of this machine.

    The convolutions are timed in both memory layouts (channels-first, PyTorch's default, and channels_last_3d);
    ``conv3d_gflops`` is the better of the two aggregates, the throughput the machine can actually deliver.

    Args:
        device: where to measure.
        repeats: timed calls per case after one warm-up (median).
        matmul_n: edge of the square matmul.
        conv_scale: factor on the edges of :data:`CONV_CASES` (at least 4).

    Returns:
        ``matmul_gflops``, ``matmul_n``, ``conv3d_cases`` (per layout and case), ``conv3d_gflops_by_layout``,
        ``conv3d_layout`` (the better one) and ``conv3d_gflops``.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, generator=gen).to(device)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        samples = [timed(lambda: a @ a, device) for _ in range(repeats + 1)][1:]
        t = statistics.median(s[0] for s in samples)
        out["matmul_gflops"] = 2 * matmul_n**3 / t / 1e9
        out["matmul_n"] = matmul_n
        cases, by_layout = [], {}
        for layout, fmt in (("channels_first", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
            total_flops, total_t = 0.0, 0.0
            for ch, edge in CONV_CASES:
                edge = max(4, int(edge * conv_scale))
                conv = nn.Conv3d(ch, ch, 3, padding=1).to(device, memory_format=fmt)
                x = torch.randn(1, ch, edge, edge, edge, generator=gen).to(device).contiguous(memory_format=fmt)
                samples = [timed(lambda: conv(x), device) for _ in range(repeats + 1)][1:]
                t = statistics.median(s[0] for s in samples)
                flops = 2.0 * 27 * ch * ch * edge**3
                cases.append({"layout": layout, "channels": ch, "edge": edge, "gflops_per_s": flops / t / 1e9})
                total_flops, total_t = total_flops + flops, total_t + t
            by_layout[layout] = total_flops / total_t / 1e9
        out["conv3d_cases"] = cases
        out["conv3d_gflops_by_layout"] = by_layout
        out["conv3d_layout"] = max(by_layout, key=by_layout.get)
        out["conv3d_gflops"] = by_layout[out["conv3d_layout"]]
    return out


# ------------------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------------------


def lifetime_peak_rss_mib() -> float:
    """The peak resident set size of this process over its whole life (``ru_maxrss``) in MiB.

    No reset affects it, so it suits a measurement in a fresh process; ``ru_maxrss`` is in KiB on Linux (on macOS
    it is in bytes, and the figure is then 1024 times too large).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs`` 5) and return the new baseline in MiB.

    The baseline is the reset peak itself (``VmHWM`` right after the reset, i.e. the RSS the kernel recorded then),
    not a separate ``VmRSS`` read: the kernel's RSS counters are synchronised lazily, so a later ``VmRSS`` read can
    exceed the recorded peak by a fraction of a MiB and make a small growth look negative. Where the reset is not
    possible (not Linux) it returns :func:`lifetime_peak_rss_mib`.
    """
    if not reset_peak_rss_of("self"):
        return lifetime_peak_rss_mib()
    return proc_status_mib("VmHWM") or proc_status_mib("VmRSS") or 0.0


def peak_rss_mib() -> float:
    """The peak resident set size of this process since the last :func:`reset_peak_rss` (Linux ``VmHWM``) in MiB.

    Without a reset it is the lifetime peak; where ``/proc`` is unavailable, :func:`lifetime_peak_rss_mib`.
    """
    peak = proc_status_mib("VmHWM")
    return peak if peak is not None else lifetime_peak_rss_mib()


def peak_tensor_mib(fn: Callable[[], Any]) -> float | None:
    """Peak growth (MiB) of the CPU memory held by tensors while ``fn()`` runs, from PyTorch's allocation events.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of PyTorch's CPU allocator; their
    running sum in time order is the memory held by the tensors allocated during ``fn`` (activations, gradients,
    temporaries), whatever the C allocator keeps or returns to the system. This is the CPU counterpart of
    ``torch.cuda.max_memory_allocated`` and, unlike the RSS, gives the same figure on every run. Memory allocated
    before the call and freed during it is not subtracted (the profiler does not know its size), so callers free
    what they can first (e.g. ``zero_grad(set_to_none=True)``).

    Returns:
        The peak in MiB, or ``None`` (after running ``fn``) where this PyTorch build does not expose the raw
        profiler events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)  # the raw events (PyTorch 2.x with Kineto)
    if results is None or not hasattr(results, "events"):
        logger.warning("torch.profiler exposes no raw allocation events here: no tensor-memory figure.")
        return None
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def memory_case(name: str, size: int, train_batch: int, device: torch.device) -> dict[str, float]:
    """Peak memory (MiB) of a forward pass, then of a training step, each the second call of its kind, here.

    The first call of each kind is a warm-up, as in a running inference or training: it makes the one-time
    allocations (oneDNN's primitive and weight caches, lazy initialisations) that would otherwise count as the call's
    growth (about 430 against 250 MiB for MambaClinix's 64^3 forward), and the first training step creates the
    optimizer's moment buffers, which then count in the baseline. On CUDA the figures come from
    ``torch.cuda.max_memory_allocated`` after a reset. On CPU
    the RSS figures come first (an unprofiled call: :func:`reset_peak_rss`, then :func:`peak_rss_mib`), then
    ``*_tensor_peak_mib`` from one more, profiled call (:func:`peak_tensor_mib`; for the training step after
    ``zero_grad(set_to_none=True)``, so that the step's gradients count as allocated by it).

    Returns:
        ``{phase}_baseline_mib``, ``{phase}_peak_mib``, ``{phase}_delta_mib`` (peak - baseline) and, on CPU,
        ``{phase}_tensor_peak_mib``, for ``phase`` in ``forward``, ``train``.
    """
    workload = Workload(name, device, train_batch)
    fwd, step = workload.forward(size), workload.train_step(size)
    out: dict[str, float] = {}
    for key, fn in (("forward", fwd), ("train", step)):
        fn()  # warm-up: one-time allocations and the optimizer state then belong to the baseline
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2**20
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            base = reset_peak_rss()
            fn()
            # the kernel folds its per-thread RSS counters in lazily, so when the phase adds ~nothing the peak can
            # read a fraction of a MiB below the baseline: growth is never negative
            peak = max(peak_rss_mib(), base)
            if key == "train":  # the profiled step then allocates its gradients afresh (no unknown-size frees)
                workload.optimizer.zero_grad(set_to_none=True)
            tensors = peak_tensor_mib(fn)
            if tensors is not None:
                out[f"{key}_tensor_peak_mib"] = tensors
        out[f"{key}_baseline_mib"] = base
        out[f"{key}_peak_mib"] = peak
        out[f"{key}_delta_mib"] = peak - base
    return out


def bundle_env() -> dict[str, str]:
    """The environment of a benchmark subprocess: this process's, with :data:`BUNDLE_ROOT` first on ``PYTHONPATH``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [BUNDLE_ROOT, os.environ.get("PYTHONPATH")])))


def run_module_json(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (:func:`bundle_env`); parse its last stdout line.

    Returns:
        The JSON object, or ``{"error": ...}`` with the last line of stderr when the process failed.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=BUNDLE_ROOT, env=bundle_env()
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"subprocess failed ({proc.returncode}): {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(name: str, size: int, train_batch: int, device: str = "cpu", threads: int = 2) -> dict[str, Any]:
    """Peak memory of ``name`` at ``size`` (:func:`memory_case`): in a fresh subprocess on CPU
    (``python -m scripts.benchmark --memory-case``), in this process on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return memory_case(name, size, train_batch, dev)
    return run_module_json(
        "scripts.benchmark", "--memory-case", name, str(size), str(train_batch), "--threads", str(threads)
    )
