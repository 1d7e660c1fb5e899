# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Speed, FLOP and memory benchmark of MambaClinix against MONAI baselines (a benchmark, not a test).

Run as ``python -m scripts.benchmark [--models ...] [--sizes 64 96] [--repeats 3] [--quick] [--device cpu]``;
``python -m scripts.benchmark --help`` lists every option. Results go to ``docs/benchmarks/``: ``results.json``,
``table.md``, ``README.md`` and PNG plots (:mod:`scripts.bench_plots`), each written atomically.

What is measured, per model and cubic patch edge:

- ``params``: trainable parameters.
- ``flops``: forward FLOPs of one sample (batch 1). ``counted`` comes from :class:`torch.utils.flop_counter.FlopCounterMode`
  run on fake tensors (no compute), which counts matmuls, convolutions and attention only; the elementwise work
  of Mamba's selective scan is invisible to it, so ``scan`` adds the analytic count of mamba-ssm's reference
  (``9 * batch * d_inner * d_state * length`` for the recurrence, plus ``D`` skip and ``z`` gate), and
  ``total = counted + scan``.
- ``forward_s``: latency of one forward pass (batch 1, ``eval()`` + ``torch.inference_mode``).
- ``train_s``: one training step (batch ``--train-batch``): forward, cross-entropy, backward and an SGD step
  (momentum 0.99, Nesterov, as nnU-Net).
- ``memory``: peak memory of a forward pass and of a training step. On CPU each (model, size) runs in a fresh
  subprocess; the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each
  phase) is reported, absolute and above the RSS just before the phase (model, optimizer and inputs built); on CUDA
  ``torch.cuda.max_memory_allocated`` after a reset. The training step measured is the second one: the first
  (warm-up) step creates the optimizer's momentum buffers, which then count in the baseline as in a running training.
  On CPU also ``*_tensor_peak_mib``: the peak of the memory held by the tensors a further call allocates, from
  PyTorch's allocation events (:func:`peak_tensor_mib`), which does not depend on the C allocator.
- ``gflops_per_s``: ``flops.total / forward_s``, compared with the machine's measured dense fp32 matmul peak and
  dense 3D-convolution throughput (``peaks``), and the FLOP-proportional time ``flops.total / conv throughput``.
- ``sliding_window_s``: :class:`monai.inferers.SlidingWindowInferer` over a ``1 x 1 x 160^3`` volume (overlap 0.5,
  roi 64^3 on CPU, 96^3 on CUDA).
- ``scaling``: forward latency against the patch edge and a least-squares fit of ``log t = a + k log edge``.

The timings use the system allocator unless ``--cpu-memory-reuse`` applies :func:`scripts.runtime.reuse_freed_cpu_memory`
(the bundle configs' CPU default) to the whole run. One process that holds a dozen networks and runs workloads of
very different sizes is the worst case for a heap that never gives memory back: the full run with it was stopped
by the OOM killer at 24 GB. :mod:`scripts.bench_allocator` measures the setting per network in fresh processes.

Times are medians after ``--warmup`` runs; the repetitions are interleaved (round-robin over the models within
each repetition) so that drift of a shared machine hits all models alike. Each timing also records the process
CPU time, which is less sensitive to other processes on a shared machine than the wall-clock time.
A model/size whose first call exceeds ``--max-call-s`` (or is predicted to, from a smaller size) is skipped
and the reason recorded.

Model names may carry ``+`` options: ``+cl`` (channels_last_3d weights and input), ``+bf16`` (bfloat16 autocast),
``+compile`` (``torch.compile(dynamic=False)``), ``+freeze`` (the same with Inductor's ``freezing``: inference only); for the MambaClinix models also ``+cf`` (``channels_last=False``: channels-first
memory, PyTorch's default; MambaClinix itself runs channels-last on CPU), ``+ckpt`` (``gradient_checkpointing=True``, by sub-step), ``+ckptblock`` (``gradient_checkpointing="block"``)
and ``+naive`` / ``+chunked`` / ``+cuda`` (scan backend), e.g. ``mambaclinix+cf+bf16``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.runtime import reuse_freed_cpu_memory

__all__ = [
    "MODELS",
    "build_model",
    "count_flops",
    "fit_exponent",
    "machine_info",
    "main",
    "measure_memory",
    "measure_peaks",
    "peak_tensor_mib",
    "run_benchmark",
    "run_module_json",
    "size_divisor",
    "write_outputs",
]

logger = logging.getLogger("scripts.benchmark")

DEFAULT_FEATURES = (32, 64, 128, 256, 320, 320)
DEFAULT_STRIDES = (1, 2, 2, 2, 2, 2)
DEMO_PLAN = {
    "features": [16, 32, 64, 128, 128],
    "strides": [1, 2, 2, 2, 2],
    "block_types": ["hgcn", "hgcn", "hgcn", "mamba", "mamba"],
    "hgcn_orders": [2, 3, 4],
}

MODELS = {
    "mambaclinix": "MambaClinix, default plan: features (32,64,128,256,320,320), strides (1,2,2,2,2,2), Eq. 11 layout",
    "mambaclinix_demo": "MambaClinix, demo plan: features (16,32,64,128,128), HGCN x3 (orders 2,3,4) + Mamba x2",
    "umamba_bot": "U-Mamba-Bot-like: MambaClinix default plan with block_types ['res']*5 + ['mamba']",
    "dynunet": "MONAI DynUNet (residual), the same nnU-Net topology: filters (32..320), kernels 3, strides (1,2,2,2,2,2)",
    "swinunetr": "MONAI SwinUNETR, feature_size 48",
    "segresnet": "MONAI SegResNet, init_filters 16, blocks_down (1,2,2,4) (as the MONAI BraTS bundle)",
}
"""Base model names and what they build (in 1 channel, out 2 classes)."""

OPTIONS = ("cl", "cf", "ckpt", "ckptblock", "bf16", "compile", "freeze", "naive", "chunked", "cuda")
DEFAULT_MODELS = ("mambaclinix", "mambaclinix_demo", "umamba_bot", "dynunet", "swinunetr", "segresnet")
SCALING_MODELS = ("mambaclinix", "swinunetr", "dynunet")


def _parse_name(name: str) -> tuple[str, set[str]]:
    base, *opts = name.split("+")
    if base not in MODELS:
        raise ValueError(f"unknown model {base!r}; use one of {sorted(MODELS)} (optionally with +{'/+'.join(OPTIONS)}).")
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise ValueError(f"unknown model option(s) {bad} in {name!r}; use {OPTIONS}.")
    return base, set(opts)


def size_divisor(name: str) -> int:
    """The patch edge must be a multiple of this for the model ``name`` (models with instance normalisation also
    need more than one voxel at the bottleneck: at the smallest edge they fail and the error is recorded)."""
    base, _ = _parse_name(name)
    return {"mambaclinix_demo": 16, "segresnet": 8}.get(base, 32)


def _edge_ok(name: str, size: int) -> bool:
    return size % size_divisor(name) == 0


def _edge_reason(name: str, size: int) -> str:
    return f"edge {size} is not a multiple of {size_divisor(name)}"


def build_model(name: str, in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    """Build the 3D model ``name`` (a key of :data:`MODELS`, optionally with ``+`` options) in float32 on CPU."""
    from monai.networks.nets import DynUNet, SegResNet, SwinUNETR

    from scripts.networks import MambaClinix

    base, opts = _parse_name(name)
    backend = next((o for o in ("naive", "chunked", "cuda") if o in opts), None)
    clinix = base.startswith("mambaclinix") or base == "umamba_bot"
    for opt in [o for o in opts if o in ("naive", "chunked", "cuda", "ckpt", "ckptblock", "cf")]:
        if not clinix:
            raise ValueError(f"the option +{opt} applies to MambaClinix models only, not {base!r}.")
    if "cf" in opts and "cl" in opts:
        raise ValueError(f"+cf (channels-first) and +cl (channels-last) exclude each other in {name!r}.")
    if "ckpt" in opts and "ckptblock" in opts:
        raise ValueError(f"+ckpt (by sub-step) and +ckptblock (by block) exclude each other in {name!r}.")
    checkpointing = "block" if "ckptblock" in opts else "ckpt" in opts
    kwargs: dict[str, Any] = {"scan_backend": backend, "gradient_checkpointing": checkpointing}
    if "cf" in opts:
        kwargs["channels_last"] = False
    if base == "mambaclinix":
        model: nn.Module = MambaClinix(3, in_channels, out_channels, **kwargs)
    elif base == "mambaclinix_demo":
        model = MambaClinix(3, in_channels, out_channels, **kwargs, **DEMO_PLAN)
    elif base == "umamba_bot":
        n = len(DEFAULT_FEATURES)
        model = MambaClinix(3, in_channels, out_channels, block_types=["res"] * (n - 1) + ["mamba"], **kwargs)
    elif base == "dynunet":
        model = DynUNet(
            3, in_channels, out_channels, kernel_size=[3] * 6, strides=list(DEFAULT_STRIDES),
            upsample_kernel_size=list(DEFAULT_STRIDES[1:]), filters=list(DEFAULT_FEATURES), res_block=True,
        )
    elif base == "swinunetr":
        model = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=48, spatial_dims=3)
    else:
        model = SegResNet(3, init_filters=16, in_channels=in_channels, out_channels=out_channels)
    return model


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Runner:
    """A model prepared for timing: device, memory format, autocast and ``torch.compile`` options applied."""

    def __init__(self, name: str, device: torch.device, train_batch: int, lr: float = 1e-4) -> None:
        _, opts = _parse_name(name)
        self.name = name
        self.device = device
        self.channels_last = "cl" in opts
        self.bf16 = "bf16" in opts
        self.model = build_model(name).to(device)
        self.params = _num_params(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.freeze = "freeze" in opts
        self.compiled = "compile" in opts or self.freeze
        self.fn: nn.Module | Callable = torch.compile(self.model, dynamic=False) if self.compiled else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.99, nesterov=True)
        self.train_batch = train_batch

    def _input(self, batch: int, size: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 1, size, size, size, generator=gen).to(self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:  # Inductor's freezing (weights folded in as constants) applies to inference graphs only
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                return self.fn(x)
        return self.fn(x)

    def forward(self, size: int) -> Callable[[], Any]:
        x = self._input(1, size)

        def run():
            self.model.eval()
            with torch.inference_mode(), self._autocast():
                return self._call(x)

        return run

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._call(x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x).float()

    def train_step(self, size: int) -> Callable[[], Any]:
        if self.freeze:
            raise ValueError("+freeze (Inductor freezing) is an inference-only option: no training step.")
        x = self._input(self.train_batch, size)
        gen = torch.Generator().manual_seed(1)
        target = torch.randint(0, 2, (self.train_batch, size, size, size), generator=gen).to(self.device)

        def run():
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.fn(x)
            loss = F.cross_entropy(out.float(), target)
            loss.backward()
            self.optimizer.step()
            return loss.detach()

        return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    walls = [s[0] for s in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "runs_s": [round(w, 4) for w in walls],
        "cpu_median_s": statistics.median(s[1] for s in samples),
    }


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

    Returns ``counted`` (FlopCounterMode: matmul/conv/attention), ``scan`` (analytic selective-scan count, not
    seen by FlopCounterMode) and ``total``, all in FLOPs (multiply and add counted separately).
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
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, generator=gen).to(device)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        samples = [_timed(lambda: a @ a, device) for _ in range(repeats + 1)][1:]
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
                samples = [_timed(lambda: conv(x), device) for _ in range(repeats + 1)][1:]
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


def _status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB from ``/proc/self/status`` (``None`` where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Reset the peak RSS (Linux ``clear_refs`` 5) and return the new baseline in MiB.

    The baseline is the reset peak itself (``VmHWM`` right after the reset, i.e. the RSS the kernel recorded then),
    not a separate ``VmRSS`` read: the kernel's RSS counters are synchronised lazily, so a later ``VmRSS`` read can
    exceed the recorded peak by a fraction of a MiB and make a small growth look negative.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: fall back to the lifetime peak (ru_maxrss, KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return _status_mib("VmHWM") or _status_mib("VmRSS") or 0.0


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_tensor_mib(fn: Callable[[], Any]) -> float | None:
    """Peak growth (MiB) of the CPU memory held by tensors while ``fn()`` runs, from PyTorch's allocation events.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of PyTorch's CPU allocator; their
    running sum in time order is the memory held by the tensors allocated during ``fn`` (activations, gradients,
    temporaries), whatever the C allocator keeps or returns to the system. This is the CPU counterpart of
    ``torch.cuda.max_memory_allocated`` and, unlike the RSS, gives the same figure on every run. Memory allocated
    before the call and freed during it is not subtracted (the profiler does not know its size), so callers free
    what they can first (e.g. ``zero_grad(set_to_none=True)``).

    Returns ``None`` (after running ``fn``) where this PyTorch build does not expose the raw profiler events.
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


def _memory_case(name: str, size: int, train_batch: int, device: torch.device) -> dict[str, float]:
    """Peak memory (MiB) of a forward pass, then of a training step (the second one), in this process.

    On CPU the RSS figures come first (an unprofiled call), then ``*_tensor_peak_mib`` from one more, profiled call
    (:func:`peak_tensor_mib`; for the training step after ``zero_grad(set_to_none=True)``, so that the step's
    gradients count as allocated by it).
    """
    runner = _Runner(name, device, train_batch)
    fwd, step = runner.forward(size), runner.train_step(size)
    out: dict[str, float] = {}
    for key, fn in (("forward", fwd), ("train", step)):
        if key == "train":  # one step first: the optimizer state then belongs to the baseline, as in training
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2**20
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            base = _reset_peak_rss()
            fn()
            # the kernel keeps per-thread RSS counters that it folds in lazily, so when the phase adds ~nothing the
            # peak can read a fraction of a MiB below the baseline (seen: -0.14 MiB): growth is never negative
            peak = max(_peak_rss_mib(), base)
            if key == "train":  # the profiled step then allocates its gradients afresh (no unknown-size frees)
                runner.optimizer.zero_grad(set_to_none=True)
            tensors = peak_tensor_mib(fn)
            if tensors is not None:
                out[f"{key}_tensor_peak_mib"] = tensors
        out[f"{key}_baseline_mib"] = base
        out[f"{key}_peak_mib"] = peak
        out[f"{key}_delta_mib"] = peak - base
    return out


def run_module_json(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (bundle root on the path); parse its last stdout line.

    Returns the JSON object, or ``{"error": ...}`` with the last line of stderr when the process failed.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=root, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"subprocess failed ({proc.returncode}): {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(name: str, size: int, train_batch: int, device: str = "cpu", threads: int = 2) -> dict[str, Any]:
    """Peak memory of ``name`` at ``size``: in a fresh subprocess on CPU (RSS), in-process on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return _memory_case(name, size, train_batch, dev)
    return run_module_json(
        "scripts.benchmark", "--memory-case", name, str(size), str(train_batch), "--threads", str(threads)
    )


# ------------------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------------------


def fit_exponent(edges: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope ``k`` of ``log t = a + k log edge`` (``None`` with fewer than two points)."""
    if len(edges) < 2:
        return None
    return float(np.polyfit(np.log(np.asarray(edges, float)), np.log(np.asarray(times, float)), 1)[0])


def _round_robin(
    runners: dict[str, _Runner],
    make: Callable[[_Runner], Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    max_call_s: float,
    predicted: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Time ``make(runner)()`` for every runner, interleaved over repetitions; skip calls that are too slow."""
    results: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, runner in runners.items():
        if predicted.get(name, 0.0) > max_call_s:
            results[name] = {"skipped": f"predicted {predicted[name]:.0f} s per call > --max-call-s {max_call_s:.0f}"}
            continue
        try:
            fn = make(runner)
            first = _timed(fn, device)[0]
            if runner.compiled:  # the first call compiles: judge the speed by the second
                first = _timed(fn, device)[0]
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
            samples[name].append(_timed(fn, device))
    for name, s in samples.items():
        results[name] = _summary(s)
    return results


def _sliding_window(runners: dict[str, _Runner], volume: int, roi: int, repeats: int, device: torch.device, max_call_s: float) -> dict[str, Any]:
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=1, overlap=0.5)
    x = torch.randn(1, 1, volume, volume, volume, generator=torch.Generator().manual_seed(0)).to(device)

    def make(runner: _Runner) -> Callable[[], Any]:
        def run():
            runner.model.eval()
            with torch.inference_mode():
                return inferer(x, runner.infer)

        return run

    out = _round_robin(runners, make, repeats, 0, device, max_call_s, {})
    return out


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
    """Run the benchmark and return its results as a JSON-serialisable dict (see the module docstring).

    Args:
        models: model names (keys of :data:`MODELS`, optionally with ``+`` options).
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
        "machine": machine_info(dev, threads),
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
    runners = {name: _Runner(name, dev, train_batch) for name in all_names}
    for name, runner in runners.items():
        result["models"][name] = {
            "description": MODELS[_parse_name(name)[0]], "params": runner.params, "sizes": {},
        }

    def entry(name: str, size: int) -> dict[str, Any]:
        return result["models"][name]["sizes"].setdefault(str(size), {})

    train_sizes = list(sizes) if train_sizes is None else list(train_sizes)
    memory_sizes = list(sizes) if memory_sizes is None else list(memory_sizes)
    last_fwd: dict[str, tuple[int, float]] = {}
    last_train: dict[str, tuple[int, float]] = {}

    def predict(last: dict[str, tuple[int, float]], size: int) -> dict[str, float]:
        return {n: t * (size / s) ** 3 for n, (s, t) in last.items()}

    def valid(names: Sequence[str], size: int) -> dict[str, _Runner]:
        chosen = {}
        for n in names:
            if not _edge_ok(n, size):
                entry(n, size)["skipped"] = _edge_reason(n, size)
            else:
                chosen[n] = runners[n]
        return chosen

    for size in sorted(set(sizes) | set(train_sizes)):
        chosen = valid(models, size)
        for name, runner in list(chosen.items()):
            try:
                entry(name, size)["flops"] = count_flops(runner.model, size)
            except (RuntimeError, ValueError) as e:  # e.g. instance norm over a single bottleneck voxel
                entry(name, size)["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                del chosen[name]
        if "forward" in modes and size in sizes:
            logger.info("forward latency at %d^3", size)
            for name, r in _round_robin(chosen, lambda r: r.forward(size), repeats, warmup, dev, max_call_s,
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
            for name, r in _round_robin(chosen, lambda r: r.train_step(size), repeats, warmup, dev, max_call_s,
                                        predict(last_train, size)).items():
                entry(name, size)["train"] = r
                if "median_s" in r:
                    last_train[name] = (size, r["median_s"])
        if memory and size in memory_sizes:
            for name in memory_models:
                result["models"].setdefault(name, {
                    "description": MODELS[_parse_name(name)[0]] + " (peak memory only)",
                    "params": _num_params(build_model(name)), "sizes": {},
                })
            for name in list(chosen) + [n for n in memory_models if n not in chosen and _edge_ok(n, size)]:
                if _parse_name(name)[1] & {"compile", "freeze"}:
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
                if not _edge_ok(n, size):
                    points[n][size] = {"skipped": _edge_reason(n, size)}
                elif "forward" in result["models"][n]["sizes"].get(str(size), {}):
                    points[n][size] = result["models"][n]["sizes"][str(size)]["forward"]
                else:
                    todo.append(n)
            logger.info("scaling: forward latency at %d^3", size)
            timed = _round_robin({n: runners[n] for n in todo}, lambda r: r.forward(size), scaling_repeats, warmup, dev,
                                 max_call_s, predict(last, size))
            points = {n: {**p, **({size: timed[n]} if n in timed else {})} for n, p in points.items()}
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


def machine_info(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """CPU model, core count, thread setting, CPU flags of interest, library versions and date."""
    import monai

    cpu, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("unknown", "", platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = [fl for fl in line.split(":", 1)[1].split() if fl.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_flags": sorted(flags),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.device(device).type == "cuda":
        from scripts.networks.selective_scan import cuda_scan_available

        info["gpu"] = torch.cuda.get_device_name(device)
        info["mamba_ssm_cuda_scan"] = cuda_scan_available()
    return info


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------


def _atomic_write(path: str, data: str | bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per model and size: params, GFLOPs, latencies, GFLOP/s, peak memory, sliding-window time."""
    peaks = result.get("peaks", {})
    sliding = result.get("sliding_window", {}).get("results", {})
    batch = result["settings"]["train_batch"]
    lines = [
        f"| model | params (M) | patch | GFLOPs fwd (counted + scan) | forward (s) | train step b{batch} (s) "
        "| GFLOP/s | % matmul peak | fwd / FLOP-prop. | peak mem fwd / train (MiB) | tensors fwd / train (MiB) "
        "| sliding 160^3 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        for size, e in sorted(m["sizes"].items(), key=lambda kv: int(kv[0])):
            if "flops" not in e and "memory" not in e:
                continue
            fl = e.get("flops", {"total": math.nan, "counted": math.nan, "scan": math.nan})
            fwd, tr, mem = e.get("forward", {}), e.get("train", {}), e.get("memory", {})
            flops_s = "-" if math.isnan(fl["total"]) else f"{fl['total'] / 1e9:.1f} ({fl['counted'] / 1e9:.1f} + {fl['scan'] / 1e9:.2f})"
            mem_s = "-" if not mem or "error" in mem else f"{mem['forward_delta_mib']:.0f} / {mem['train_delta_mib']:.0f}"
            tensors_s = (
                f"{mem['forward_tensor_peak_mib']:.0f} / {mem['train_tensor_peak_mib']:.0f}"
                if "train_tensor_peak_mib" in mem
                else "-"
            )
            sw = sliding.get(name, {}).get("median_s") if size == str(result.get("settings", {}).get("sizes", [0])[0]) else None
            lines.append(
                f"| {name} | {m['params'] / 1e6:.2f} | {size}^3 | {flops_s} | {_fmt(fwd.get('median_s'))}"
                f"{' (' + fwd['skipped'] + ')' if 'skipped' in fwd else ''} | {_fmt(tr.get('median_s'))} "
                f"| {_fmt(fwd.get('gflops_per_s'), 1)} "
                f"| {_fmt(100 * fwd['fraction_of_matmul_peak'] if 'fraction_of_matmul_peak' in fwd else None, 0)} "
                f"| {_fmt(fwd.get('ratio_to_flop_proportional'))} | {mem_s} | {tensors_s} | {_fmt(sw, 1)} |"
            )
    if peaks:
        lines.append("")
        lines.append(
            f"Machine peaks: dense fp32 matmul ({peaks['matmul_n']}^2) {peaks['matmul_gflops']:.1f} GFLOP/s; dense 3x3x3 "
            f"conv {peaks['conv3d_gflops']:.1f} GFLOP/s, the better of the two layouts ("
            + "; ".join(
                f"{layout.replace('_', '-')} {gf:.1f}: "
                + ", ".join(
                    f"{c['channels']}ch@{c['edge']}^3 {c['gflops_per_s']:.1f}"
                    for c in peaks["conv3d_cases"] if c.get("layout", "channels_first") == layout
                )
                for layout, gf in peaks.get("conv3d_gflops_by_layout", {"channels_first": peaks["conv3d_gflops"]}).items()
            )
            + "). 'fwd / FLOP-prop.' is measured against that better figure."
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: str, command: str | None = None, plots: bool = True) -> list[str]:
    """Write ``results.json``, ``table.md``, ``README.md`` and the plots to ``out_dir`` atomically; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if command is not None:
        result["command"] = command
    path = os.path.join(out_dir, "results.json")
    _atomic_write(path, json.dumps(result, indent=1, sort_keys=False) + "\n")
    paths.append(path)
    table = markdown_table(result)
    path = os.path.join(out_dir, "table.md")
    _atomic_write(path, table)
    paths.append(path)
    images: list[str] = []
    if plots:
        from scripts import bench_plots

        images = bench_plots.make_plots(result, out_dir, _atomic_write)
        paths += images
    path = os.path.join(out_dir, "README.md")
    _atomic_write(path, _readme(result, table, [os.path.basename(p) for p in images], out_dir))
    paths.append(path)
    return paths


def _targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets, evaluated on this run's numbers where they are present."""
    models = result["models"]

    def get(name: str, size: int, *keys: str) -> Any:
        node: Any = models.get(name, {}).get("sizes", {}).get(str(size), {})
        for k in keys:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, (int, float)) else None

    lines = []
    for size in sorted({int(s) for m in models.values() for s in m["sizes"]}):
        mc, sw = get("mambaclinix", size, "forward", "median_s"), get("swinunetr", size, "forward", "median_s")
        if mc and sw:
            mc_cpu, sw_cpu = get("mambaclinix", size, "forward", "cpu_median_s"), get("swinunetr", size, "forward", "cpu_median_s")
            lines.append(
                f"- Forward {size}^3: MambaClinix / SwinUNETR = {mc / sw:.2f} (wall), {mc_cpu / sw_cpu:.2f} (CPU time); "
                f"target <= 0.75: {'met' if mc / sw <= 0.75 else 'not met'}."
            )
        ratio = get("mambaclinix", size, "forward", "ratio_to_flop_proportional")
        if ratio:
            cf_ratio = get("mambaclinix", size, "forward", "ratio_to_flop_proportional_channels_first")
            lines.append(
                f"- Forward {size}^3: MambaClinix time / FLOP-proportional time at the measured conv throughput = "
                f"{ratio:.2f} (best-layout throughput); target <= 1.1: {'met' if ratio <= 1.1 else 'not met'}."
                + (f" Against the channels-first (PyTorch default) throughput: {cf_ratio:.2f}." if cf_ratio else "")
            )
        for key, what in (("train_delta_mib", "peak memory (RSS growth)"), ("train_tensor_peak_mib", "peak tensor memory")):
            naive = get("mambaclinix+naive", size, "memory", key)
            for variant, label in (
                ("mambaclinix", "chunked scan"),
                ("mambaclinix+ckpt", "chunked scan + gradient_checkpointing"),
                ("mambaclinix+ckptblock", "chunked scan + gradient_checkpointing='block'"),
            ):
                mem = get(variant, size, "memory", key)
                if mem and naive:
                    lines.append(
                        f"- Training-step {what} {size}^3 (batch {result['settings']['train_batch']}): {label} "
                        f"{mem:.0f} MiB vs naive per-step scan {naive:.0f} MiB = {mem / naive:.2f}; target <= 0.5: "
                        f"{'met' if mem / naive <= 0.5 else 'not met'}."
                    )
    return ["## Targets", "", *lines, ""] if lines else []


def _shared_machine(load_start: Sequence[float], load_end: Sequence[float], threads: int) -> bool:
    """Whether other processes loaded the machine: a busy start, or an end load well above our own threads."""
    return bool(load_start and load_start[0] > 1.5) or bool(load_end and load_end[0] > threads + 1.0)


def _readme(result: dict[str, Any], table: str, images: list[str], out_dir: str) -> str:
    mach, st = result["machine"], result["settings"]
    load0, load1 = result.get("load_average_start", []), result.get("load_average_end", [])
    text = [
        "# MambaClinix benchmarks",
        "",
        "Generated by `scripts/benchmark.py`; do not edit by hand (the optimisation notes come from "
        "`docs/benchmarks/optimizations.md`).",
        "",
        f"- Command: `{result.get('command', 'python -m scripts.benchmark')}`",
        f"- Date: {mach['date']}; run time {result.get('elapsed_s', 0) / 60:.1f} min",
        f"- Machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['threads']}, device {mach['device']}"
        + (f" ({mach['gpu']})" if "gpu" in mach else "")
        + f"; CPU flags: {' '.join(mach['cpu_flags']) or 'n/a'}",
        f"- Versions: torch {mach['torch']}, monai {mach['monai']}, python {mach['python']}",
        f"- Load average (1, 5, 15 min) at start {', '.join(f'{v:.1f}' for v in load0)}, at end "
        f"{', '.join(f'{v:.1f}' for v in load1)}"
        + (" - a shared machine: other jobs ran at the same time, so wall-clock times are inflated and noisy "
           "(`results.json` also has the process CPU time of every run)."
           if _shared_machine(load0, load1, int(st.get("threads", 1))) else
           " - no other jobs of ours ran (at the end the load includes the benchmark's own threads)."),
        f"- Settings: {st['repeats']} timed runs (median) after {st['warmup']} warm-up, interleaved round-robin "
        f"over the models; forward batch 1 in `inference_mode`, training step batch {st['train_batch']} "
        "(forward + cross-entropy + backward + SGD step); float32 unless a model name says `+bf16`; "
        + ("glibc malloc keeps freed memory for reuse (`scripts.runtime.reuse_freed_cpu_memory`, the bundle's CPU "
           "default) in the timings, the system allocator in the peak-memory subprocesses."
           if st.get("cpu_memory_reuse") else "the system allocator's defaults."),
        "",
        "## Results",
        "",
        table,
        "Columns: GFLOPs of one forward pass (batch 1): `torch.utils.flop_counter.FlopCounterMode` counts matmuls, "
        "convolutions and attention only, so the selective scan's elementwise work is added analytically "
        "(mamba-ssm's reference count, 9 x batch x d_inner x d_state x length, plus the D skip, gate and softplus). "
        "GFLOP/s = total GFLOPs / forward time. 'fwd / FLOP-prop.' = forward time / (GFLOPs / measured conv "
        "throughput). Peak memory: growth of the peak RSS (VmHWM, reset before each phase) over the RSS just before the phase (model, "
        "optimizer and inputs built) in a fresh process on CPU, `torch.cuda.max_memory_allocated` on CUDA; the train column is the second "
        "training step (after one warm-up step, so the optimizer's momentum buffers are in the baseline, as in a running training). "
        "The RSS depends on how much freed memory the C allocator keeps, so it varies by tens of MiB between runs. Tensors "
        "(CPU): the peak of the memory held by the tensors allocated during the phase, summed from PyTorch's allocation "
        "events (`torch.profiler`, `profile_memory=True`) in one more call, the same on every run; for the training step "
        "it includes the step's gradients (allocated after `zero_grad(set_to_none=True)`). "
        "Sliding window: `monai.inferers.SlidingWindowInferer` on a 1x1x160^3 volume, overlap 0.5, "
        f"roi {result.get('sliding_window', {}).get('roi', '-')}^3, sw_batch_size 1 (shown on the first patch-size row).",
        "",
    ]
    skipped = [
        f"- {n} at {s}^3 ({k}): {v['skipped']}"
        for n, m in result["models"].items() for s, e in m["sizes"].items()
        for k, v in ([("size", e)] + [(k, e[k]) for k in ("forward", "train") if k in e]) if "skipped" in v
    ]
    if skipped:
        text += ["Skipped cases:", "", *skipped, ""]
    text += _targets(result)
    if "scaling" in result:
        text += ["## Scaling with the patch edge (forward latency, batch 1)", "", "| model | " + " | ".join(
            f"{s}^3 (s)" for s in result["scaling"]["sizes"]) + " | exponent k (t ~ edge^k) |",
            "|---|" + "---|" * (len(result["scaling"]["sizes"]) + 1)]
        for n, sc in result["scaling"]["models"].items():
            cells = []
            for s in result["scaling"]["sizes"]:
                p = sc["points"].get(str(s), {})
                cells.append(_fmt(p.get("median_s")) if "median_s" in p else f"skipped: {p.get('skipped', p.get('error', '-'))}")
            text.append(f"| {n} | " + " | ".join(cells) + f" | {_fmt(sc['exponent'])} |")
        text += ["", "k is the least-squares slope of log t against log edge; 3 means time proportional to voxels.", ""]
    for img in images:
        text += [f"![{img}]({img})", ""]
    notes = os.path.join(out_dir, "optimizations.md")
    if os.path.exists(notes):
        with open(notes) as f:
            text += [f.read().strip(), ""]
    return "\n".join(text)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"models (default {' '.join(DEFAULT_MODELS)}); +options: {OPTIONS}")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="patch edges for forward/FLOPs (default 64 96; GPU adds 128)")
    p.add_argument("--train-sizes", nargs="+", type=int, default=None, help="patch edges of the training step (default 64)")
    p.add_argument("--memory-sizes", nargs="+", type=int, default=None, help="patch edges of the peak-memory cases (default 64)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
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
    p.add_argument("--quick", action="store_true", help="64^3 only, 1 repeat, no memory/sliding/scaling")
    p.add_argument("--out", default="docs/benchmarks", help="output folder")
    p.add_argument("--no-write", action="store_true", help="print the JSON instead of writing the outputs")
    p.add_argument("--render", metavar="RESULTS_JSON", help="only re-write the table, README and plots from a results.json")
    p.add_argument("--cpu-memory-reuse", action="store_true",
                   help="time with scripts.runtime.reuse_freed_cpu_memory in effect (CPU; the process keeps its peak memory)")
    p.add_argument("--memory-case", nargs=3, metavar=("MODEL", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point (``python -m scripts.benchmark --help``)."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_case:
        name, size, batch = args.memory_case
        out = _memory_case(name, int(size), int(batch), torch.device("cpu"))
        sys.stdout.write(json.dumps(out) + "\n")
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        with open(args.render) as f:
            rendered = json.load(f)
        for path in write_outputs(rendered, args.out, rendered.get("command")):
            logger.info("wrote %s", path)
        return rendered
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
        kwargs.update(repeats=1, warmup=1, memory=False, sliding=False)
    result = run_benchmark(
        models=models, sizes=sizes, repeats=kwargs.get("repeats", args.repeats), warmup=kwargs.get("warmup", args.warmup),
        threads=args.threads, device=args.device, modes=args.modes,
        train_sizes=args.train_sizes or [min(sizes)], train_batch=args.train_batch,
        memory=kwargs.get("memory", not args.no_memory), memory_sizes=args.memory_sizes or [min(sizes)],
        sliding=kwargs.get("sliding", not args.no_sliding), sliding_volume=args.sliding_volume,
        sliding_roi=args.sliding_roi, sliding_models=args.sliding_models, scaling_sizes=scaling,
        scaling_models=args.scaling_models, max_call_s=args.max_call_s,
        memory_models=args.memory_models if args.memory_models is not None else ["mambaclinix+naive"],
        cpu_memory_reuse=args.cpu_memory_reuse,
    )
    command = "python -m scripts.benchmark" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    if args.no_write:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        for path in write_outputs(result, args.out, command):
            logger.info("wrote %s", path)
    return result


if __name__ == "__main__":
    main()
