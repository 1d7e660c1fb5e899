# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The written results of a check run: ``gpu_check.json`` (everything) and ``gpu_check.md`` (a table per section,
headed by the machine), both written atomically (:mod:`scripts.io_utils`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.benchmark.machine import summarize_machine
from scripts.gpu_check.errors import error_text
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["JSON_NAME", "MARKDOWN_NAME", "render_markdown", "write_report"]

JSON_NAME = "gpu_check.json"
MARKDOWN_NAME = "gpu_check.md"


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant digits, ``None`` as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _environment(result: Mapping[str, Any]) -> list[str]:
    gpus = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in result.get("gpus", []))
    rows = [[k, v] for k, v in result.items() if k not in ("gpus", "imports")]
    rows.insert(0, ["gpus", gpus or "none"])
    rows += [[f"import {module}", status] for module, status in result.get("imports", {}).items()]
    return _table(["item", "value"], rows)


def _parity_row(case: Mapping[str, Any]) -> list[Any]:
    if "error" in case:
        return [case["case"], case["dtype"], "", "", None, None, "", "", f"FAIL: {case['error']}"]
    worst = case["worst"]
    return [case["case"], case["dtype"], case["reference"], case["shape"], case["max_abs_err"], case["max_rel_err"],
            f"{worst} ({_fmt(case['outputs'][worst]['ratio'])}, {case['outputs'][worst]['criterion']})",
            f"{case['rtol']:g} / {case['atol']:g}", "pass" if case["passed"] else "FAIL"]


def _parity(result: Mapping[str, Any]) -> list[str]:
    rows = [_parity_row(c) for c in result["cases"]]
    rows += [[s["case"], "", "", "", None, None, "", "", f"skipped: {s['reason']}"] for s in result.get("skipped", [])]
    return _table(["case", "dtype", "reference", "shape", "max abs err", "max rel err", "worst (err / tol)",
                   "rtol / atol", "result"], rows)


def _amp_training(result: Mapping[str, Any]) -> list[str]:
    losses = result["losses"]
    lines = _table(["plan", "edge", "batch", "autocast", "grad scaler", "lr", "steps", "first loss", "last loss",
                    "finite", "loss fell", "result"],
                   [[result["plan"], result["size"], result["batch"], result["autocast"], result["grad_scaler"],
                     result["lr"], result["steps"], losses[0], losses[-1], result["finite"], result["loss_fell"],
                     "pass" if result["passed"] else "FAIL"]])
    lines.append("")
    lines.append("Losses: " + ", ".join(f"{v:.4f}" for v in losses) + ".")
    return lines + ([f"Stopped {result['stopped']}."] if result.get("stopped") else [])


def _timing_cell(mode: Mapping[str, Any] | None, key: str) -> Any:
    if not mode:
        return None
    return mode["error"] if "error" in mode else mode.get(key)


def _timing(result: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, case in result["cases"].items():
        if "params" not in case:
            rows.append([name, None, None, None, None, None, case.get("skipped") or case.get("error")])
            continue
        fwd, train = case.get("forward"), case.get("train")
        rows.append([name, case["params"] / 1e6, _timing_cell(fwd, "median_s"), _timing_cell(train, "median_s"),
                     _timing_cell(fwd, "peak_mib"), _timing_cell(train, "peak_mib"), ""])
    lines = [f"Edge {result['size']}^3, forward batch 1, training step batch {result['train_batch']}, "
             f"{result['precision']}, {result['warmup']} warm-up + {result['repeats']} timed rounds (interleaved).", ""]
    lines += _table(["model", "params (M)", "forward s", "train step s", "forward peak MiB", "train peak MiB", "note"],
                    rows)
    return lines + ([f"Stopped {result['stopped']}."] if result.get("stopped") else [])


def _sliding_window(result: Mapping[str, Any]) -> list[str]:
    return _table(["volume", "roi", "overlap", "windows", "sw batch", "precision", "median s", "runs s", "peak MiB"],
                  [[f"{result['volume']}^3", f"{result['roi']}^3", result["overlap"], result["windows"],
                    result["sw_batch_size"], result["precision"], result["median_s"],
                    ", ".join(f"{t:.3g}" for t in result["runs_s"]), result["peak_mib"]]])


def _distributed(result: Mapping[str, Any]) -> list[str]:
    lines = _table(["processes", "exit code", "seconds", "checkpoint written", "result"],
                   [[result["nproc"], result["rc"], result["elapsed_s"], result["checkpoint"],
                     "pass" if result["passed"] else "FAIL"]])
    return lines + ["", "```", *result["tail"][-8:], "```"]


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "environment": _environment, "parity": _parity, "amp_training": _amp_training, "timing": _timing,
    "sliding_window": _sliding_window, "distributed": _distributed,
}


def render_markdown(report: Mapping[str, Any]) -> str:
    """``gpu_check.md``: the machine, the command, a summary row per section, then a table per section that ran."""
    machine = report.get("machine", {})
    sections = report.get("sections", {})
    lines = [f"# GPU check: {summarize_machine(machine)}", "",
             f"`{report.get('command', '')}`, started {report.get('started', '?')}, torch {machine.get('torch', '?')}, "
             f"monai {machine.get('monai', '?')}, {_fmt(report.get('elapsed_s'))} s, exit status "
             f"{_fmt(report.get('exit_status'))}.", ""]
    summary = []
    for name, entry in sections.items():
        note = entry.get("reason") or entry.get("error") or entry.get("result", {}).get("stopped", "")
        seconds = entry.get("elapsed_s")
        summary.append([name, entry["status"], None if seconds is None else f"{seconds:.1f}", note])
    lines += _table(["section", "status", "seconds", "note"], summary)
    for name, entry in sections.items():
        if "result" in entry and name in _RENDERERS:
            try:
                table = _RENDERERS[name](entry["result"])
            except (KeyError, TypeError, ValueError, IndexError) as e:  # a partial result: the JSON still has it
                table = [f"No table ({error_text(e)}); see {JSON_NAME}."]
            lines += ["", f"## {name}", ""] + table
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into the folder ``out`` atomically; returns their paths."""
    out = Path(out)
    return atomic_write_json(report, out / JSON_NAME), atomic_write_text(render_markdown(report), out / MARKDOWN_NAME)
