# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The written form of a benchmark run: ``results.json``, a markdown table, a README with the targets, and plots.

Results of the earlier method (one process, ``repeats`` instead of rounds, no per-round ratios) still render: their
columns that need rounds read ``-``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

from scripts.benchmark.machine import summarize_machine
from scripts.benchmark.plots import make_plots
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["markdown_table", "ratio_table", "write_outputs"]

ALLOCATOR_LABELS = {
    "reuse": "reuse (the bundle's default: `scripts.runtime.reuse_freed_cpu_memory`, `cpu_memory_reuse: true` in the "
    "configs; glibc malloc keeps freed memory for reuse)",
    "system": "system (glibc malloc's defaults; a variant, NOT the bundle's default)",
}
"""How the README names each allocator setting of :func:`scripts.benchmark.runners.run_benchmark`."""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _span(median: float | None, low: float | None = None, high: float | None = None, digits: int = 2) -> str:
    """``median [low-high]``, or the median alone without a range, ``-`` without a median."""
    if median is None:
        return "-"
    if low is None or high is None:
        return _fmt(median, digits)
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def _time_span(timing: dict[str, Any]) -> str:
    """A timing's median and its range over the rounds, with the reason where it was skipped."""
    text = _span(timing.get("median_s"), timing.get("min_s"), timing.get("max_s"))
    return text + (f" ({timing['skipped']})" if "skipped" in timing else "")


def _loads(*timings: dict[str, Any]) -> list[float]:
    """The 1-minute load averages recorded with the timed calls of ``timings``."""
    return [m["load_1min"] for t in timings for m in t.get("measurements", []) if m.get("load_1min") is not None]


def _all_timings(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for m in result["models"].values():
        for e in m["sizes"].values():
            yield from (e[k] for k in ("forward", "train") if k in e)
    yield from result.get("sliding_window", {}).get("results", {}).values()


def _peaks_refused(result: dict[str, Any]) -> str | None:
    """Why the machine's peaks may not be used (refused under load, or failed), ``None`` when they may."""
    peaks = result.get("peaks", {})
    return peaks.get("refused") or (f"the machine's peaks failed: {peaks['error']}" if "error" in peaks else None)


def ratio_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the per-round ratios ``reference / peer``: median, quartiles, range, rounds, CPU-time ratio."""
    ratios = result.get("ratios", {})
    if not ratios:
        return []
    ref = result["settings"].get("reference", "mambaclinix")
    lines = [
        f"Per-round ratios {ref} / peer (each round's {ref} time over the peer's time in the same round; < 1: {ref} "
        "faster):",
        "",
        "| phase | peer | median | IQR | min-max | rounds | CPU-time ratio (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, by_size in ratios.items():
        for size, peers in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            for peer, r in peers.items():
                lines.append(
                    f"| {mode} {size}^3 | {peer} | {r['median']:.2f} | {r['q1']:.2f}-{r['q3']:.2f} "
                    f"| {r['min']:.2f}-{r['max']:.2f} | {r['n']} | {_fmt(r.get('cpu_median'))} |"
                )
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """One row per model and size (params, GFLOPs, times and ratios to the reference with their range over the
    rounds, load, GFLOP/s, peak memory, sliding-window time), the machine's peaks (or why they are refused) and
    :func:`ratio_table`."""
    peaks = result.get("peaks", {})
    refused = _peaks_refused(result)
    sliding = result.get("sliding_window", {}).get("results", {})
    st = result["settings"]
    ref, ratios = st.get("reference", "mambaclinix"), result.get("ratios", {})
    lines = [
        f"| model | params (M) | patch | GFLOPs fwd (counted + scan) | forward (s) | train step b{st['train_batch']} (s) "
        f"| {ref} / model fwd | {ref} / model train | load 1-min | GFLOP/s | % matmul peak | fwd / FLOP-prop. "
        "| peak mem fwd / train (MiB) | tensors fwd / train (MiB) | sliding 160^3 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        for size, e in sorted(m["sizes"].items(), key=lambda kv: int(kv[0])):
            if "flops" not in e and "memory" not in e:
                continue
            fl = e.get("flops", {})
            fwd, tr, mem = e.get("forward", {}), e.get("train", {}), e.get("memory", {})
            flops_s = (
                f"{fl['total'] / 1e9:.1f} ({fl['counted'] / 1e9:.1f} + {fl['scan'] / 1e9:.2f})" if "total" in fl else "-"
            )
            mem_s = "-" if not mem or "error" in mem else f"{mem['forward_delta_mib']:.0f} / {mem['train_delta_mib']:.0f}"
            tensors_s = (
                f"{mem['forward_tensor_peak_mib']:.0f} / {mem['train_tensor_peak_mib']:.0f}"
                if "train_tensor_peak_mib" in mem
                else "-"
            )
            cells = []
            for mode, timing in (("forward", fwd), ("train", tr)):
                r = ratios.get(mode, {}).get(size, {}).get(name)
                cells.append("1 (ref.)" if name == ref and "median_s" in timing else
                             _span(r["median"], r["min"], r["max"]) if r else "-")
            loads = _loads(fwd, tr)
            load_s = _span(statistics.median(loads), min(loads), max(loads), 1) if loads else "-"
            sw = sliding.get(name, {}).get("median_s") if size == str(st.get("sizes", [0])[0]) else None
            lines.append(
                f"| {name} | {_fmt(m['params'] / 1e6 if 'params' in m else None)} | {size}^3 | {flops_s} "
                f"| {_time_span(fwd)} | {_time_span(tr)} | {cells[0]} | {cells[1]} | {load_s} "
                f"| {_fmt(fwd.get('gflops_per_s'), 1)} "
                f"| {_fmt(100 * fwd['fraction_of_matmul_peak'] if 'fraction_of_matmul_peak' in fwd else None, 0)} "
                f"| {_fmt(fwd.get('ratio_to_flop_proportional'))} | {mem_s} | {tensors_s} | {_fmt(sw, 1)} |"
            )
    lines.append("")
    if refused:
        lines.append(f"WARNING: machine peaks not used: {refused}. '% matmul peak' and 'fwd / FLOP-prop.' are not given.")
    elif peaks:
        lines.append(
            f"Machine peaks (measured alone, before the models; 1-min load {_fmt(peaks.get('load_1min_before'), 1)}): "
            f"dense fp32 matmul ({peaks['matmul_n']}^2) {peaks['matmul_gflops']:.1f} GFLOP/s; dense 3x3x3 "
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
    ratio_lines = ratio_table(result)
    if ratio_lines:
        lines += ["", *ratio_lines]
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
    """The README's target lines: forward-time ratios (per-round, with their range) and training-step memory ratios
    of MambaClinix, each with its threshold, for the cases this run measured."""
    models = result["models"]
    refused = _peaks_refused(result)
    per_round = result.get("ratios", {}) if result["settings"].get("reference", "mambaclinix") == "mambaclinix" else {}

    def get(name: str, size: int, *keys: str) -> Any:
        node: Any = models.get(name, {}).get("sizes", {}).get(str(size), {})
        for k in keys:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, (int, float)) else None

    lines = []
    for size in sorted({int(s) for m in models.values() for s in m["sizes"]}):
        mc, sw = get("mambaclinix", size, "forward", "median_s"), get("swinunetr", size, "forward", "median_s")
        r = per_round.get("forward", {}).get(str(size), {}).get("swinunetr")
        if r:
            lines.append(
                f"- Forward {size}^3: MambaClinix / SwinUNETR = {_span(r['median'], r['min'], r['max'])} (median "
                f"[min-max] of {r['n']} per-round ratios, wall), {_fmt(r.get('cpu_median'))} (CPU time); target <= "
                f"0.75: {'met' if r['median'] <= 0.75 else 'not met'}."
            )
        elif mc and sw:
            mc_cpu, sw_cpu = get("mambaclinix", size, "forward", "cpu_median_s"), get("swinunetr", size, "forward", "cpu_median_s")
            lines.append(
                f"- Forward {size}^3: MambaClinix / SwinUNETR = {mc / sw:.2f} (wall), {mc_cpu / sw_cpu:.2f} (CPU time), "
                f"ratio of medians; target <= 0.75: {'met' if mc / sw <= 0.75 else 'not met'}."
            )
        ratio = get("mambaclinix", size, "forward", "ratio_to_flop_proportional")
        if mc and refused:
            lines.append(f"- Forward {size}^3: MambaClinix time / FLOP-proportional time: not given ({refused}).")
        elif ratio:
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
                ("mambaclinix+ckptnone", "chunked scan + gradient_checkpointing=False"),
                ("mambaclinix+ckpt", "chunked scan + gradient_checkpointing"),
                ("mambaclinix+ckptblock", "chunked scan + gradient_checkpointing='block'"),
                ("mambaclinix+ckptfirst", "chunked scan + gradient_checkpointing='first_level'"),
            ):
                mem = get(variant, size, "memory", key)
                if mem and naive:
                    lines.append(
                        f"- Training-step {what} {size}^3 (batch {result['settings']['train_batch']}): {label} "
                        f"{mem:.0f} MiB vs naive per-step scan {naive:.0f} MiB = {mem / naive:.2f}; target <= 0.5: "
                        f"{'met' if mem / naive <= 0.5 else 'not met'}."
                    )
    return ["## Targets", "", *lines, ""] if lines else []


def _shared_machine(load_start: Sequence[float], loads: Sequence[float], threads: int) -> bool:
    """Whether other processes loaded the machine: a busy start, or a 1-minute load during the timed calls well above
    the benchmark's own threads."""
    return bool(load_start and load_start[0] > 1.5) or bool(loads and max(loads) > threads + 1.0)


def _method_lines(result: dict[str, Any]) -> list[str]:
    """The README's lines on how the times were taken: rounds and order, allocator, load."""
    mach, st = result["machine"], result["settings"]
    load0, load1 = result.get("load_average_start", []), result.get("load_average_end", [])
    loads = [v for t in _all_timings(result) for v in _loads(t)]
    busy = _shared_machine(load0, loads, int(st.get("threads", 1)))
    if "rounds" in st:
        method = (
            f"{st['rounds']} round(s) after {st['warmup']} warm-up call(s) per model and phase: every model once per "
            "round, the order rotated by one model each round, each model in a process of its own; times are the "
            "median [min-max] over the rounds, ratios between models are taken within each round (same load) and "
            "given as median [min-max]"
        )
    else:  # results of the earlier method
        method = f"{st['repeats']} timed runs (median) after {st['warmup']} warm-up, interleaved round-robin over the models"
    allocator = st.get("allocator", "reuse" if st.get("cpu_memory_reuse") else "system")
    in_effect = st.get("reuse_in_effect", st.get("cpu_memory_reuse", False))
    lines = [
        f"- Load average (1, 5, 15 min) at start {', '.join(f'{v:.1f}' for v in load0)}, at end "
        f"{', '.join(f'{v:.1f}' for v in load1)}"
        + (f"; 1-min load before the timed calls {_span(statistics.median(loads), min(loads), max(loads), 1)} "
           f"({mach.get('cores', '?')} cores)" if loads else "")
        + (" - a shared machine: other jobs ran at the same time, so wall-clock times are inflated and noisy "
           "(`results.json` has the wall-clock and process CPU time and the load of every call)."
           if busy else " - no other jobs of ours ran (the load includes the benchmark's own threads)."),
        f"- Method: {method}; forward batch 1 in `inference_mode`, training step batch {st['train_batch']} "
        "(forward + cross-entropy + backward + Adam step, the optimizer of `configs/train.yaml`); float32 unless a model name says `+bf16`.",
        f"- Allocator of the timings: {ALLOCATOR_LABELS[allocator]}"
        + (" - requested but NOT in effect here (not glibc)." if allocator == "reuse" and not in_effect else ".")
        + " Peak memory: the system allocator, in a fresh process per case.",
    ]
    rss = [f"{n} {m['worker_peak_rss_mib']:.0f} MiB" for n, m in result["models"].items() if "worker_peak_rss_mib" in m]
    if rss:
        lines.append(f"- Peak RSS of the timing processes (they ran side by side): {', '.join(rss)}.")
    return lines


def _readme(result: dict[str, Any], table: str, images: list[str], out_dir: str) -> str:
    """The README of a run: command, machine, method and load, the table, skipped cases, targets, scaling, plots."""
    mach = result["machine"]
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
        *_method_lines(result),
        *[f"- Not run: {name}: {why}" for name, why in result.get("unavailable", {}).items()],
        "",
        "## Results",
        "",
        table,
        "Columns: GFLOPs of one forward pass (batch 1): `torch.utils.flop_counter.FlopCounterMode` counts matmuls, "
        "convolutions and attention only, so the selective scan's elementwise work is added analytically "
        "(mamba-ssm's reference count, 9 x batch x d_inner x d_state x length, plus the D skip, gate and softplus). "
        "Times: median [min-max] over the rounds. 'reference / model': the per-round ratio of the reference's time to "
        "the model's, median [min-max] over the rounds (details in the ratio table). Load 1-min: the 1-minute load "
        "average before each timed call of the row, median [min-max]. "
        "GFLOP/s = total GFLOPs / forward time. 'fwd / FLOP-prop.' = forward time / (GFLOPs / measured conv "
        "throughput), given only when the machine's peaks were measured on a machine not loaded beyond its cores. "
        "Peak memory: growth of the peak RSS (VmHWM, reset before each phase) over the RSS just before the phase "
        "(model, optimizer and inputs built) in a fresh process on CPU, `torch.cuda.max_memory_allocated` on CUDA; "
        "each column is the second call of its kind (after a warm-up call: one-time allocations and the optimizer's "
        "moment buffers are in the baseline, as in a running inference or training). "
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
