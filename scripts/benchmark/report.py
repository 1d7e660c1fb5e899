# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The written form of a benchmark run: ``results.json``, a markdown table, a README with the targets, and plots."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from scripts.benchmark.machine import summarize_machine
from scripts.benchmark.plots import make_plots
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["markdown_table", "write_outputs"]


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
    """Write ``results.json``, ``table.md``, ``README.md`` and the plots to ``out_dir``, each atomically.

    Args:
        result: a :func:`scripts.benchmark.runners.run_benchmark` result.
        out_dir: the output folder (created if missing); ``optimizations.md`` there is appended to the README.
        command: the command line recorded as ``result["command"]`` and shown in the README.
        plots: also write the PNG plots of :func:`scripts.benchmark.plots.make_plots`.

    Returns:
        The paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if command is not None:
        result["command"] = command
    path = os.path.join(out_dir, "results.json")
    atomic_write_json(result, path, indent=1)
    paths.append(path)
    table = markdown_table(result)
    path = os.path.join(out_dir, "table.md")
    atomic_write_text(table, path)
    paths.append(path)
    images = make_plots(result, out_dir) if plots else []
    paths += images
    path = os.path.join(out_dir, "README.md")
    atomic_write_text(_readme(result, table, [os.path.basename(p) for p in images], out_dir), path)
    paths.append(path)
    return paths


def _targets(result: dict[str, Any]) -> list[str]:
    """The README's target lines: forward-time ratios and training-step memory ratios of MambaClinix, each with
    its threshold, for the cases this run measured."""
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
    """The README of a run: command, machine, load, settings, the table, skipped cases, targets, scaling, plots."""
    mach, st = result["machine"], result["settings"]
    load0, load1 = result.get("load_average_start", []), result.get("load_average_end", [])
    text = [
        "# MambaClinix benchmarks",
        "",
        "Generated by `python -m scripts.benchmark`; do not edit by hand (the optimisation notes come from "
        "`docs/benchmarks/optimizations.md`).",
        "",
        f"- Command: `{result.get('command', 'python -m scripts.benchmark')}`",
        f"- Date: {mach['date']}; run time {result.get('elapsed_s', 0) / 60:.1f} min",
        f"- Machine: {summarize_machine(mach)}",
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
