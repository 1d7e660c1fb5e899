# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The summary of ``make demo-lesions``: the lesion workflow's evaluation files as one table.

``configs/hunet_evaluate.yaml`` writes per-case metrics (:func:`scripts.hunet.report.case_metrics`) to
``metrics.json``; this reads one such file per evaluated set (e.g. the held-out synthetic volumes and the real
pyradiomics cases) and writes ``summary.json`` and ``summary.md``: per set, the mean over the cases of IoU, DSC,
HD95 (mm), sensitivity, specificity, lesion-wise recall and precision and false-positive lesions, and the pooled
lesion-wise recall (detected reference lesions over all reference lesions of the set); per lesion load too when a
datalist of the synthetic set names them.

Usage::

    python -m scripts.demo.lesions --set "synthetic test=eval/lesions/synthetic/metrics.json" \\
        --set "real (pyradiomics)=eval/lesions/real/metrics.json" --datalist data/lesions/datalist.json \\
        --output eval/lesions
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.cli import CommandLineError, OneLineArgumentParser
from scripts.io_utils import atomic_write_json, atomic_write_text
from scripts.metrics import summarise

__all__ = ["COLUMNS", "summarise_cases", "summarise_sets", "markdown", "main"]

COLUMNS: tuple[str, ...] = ("dsc", "iou", "hd95", "sensitivity", "specificity", "lesion_recall",
                            "lesion_precision", "lesion_fp")
"""The per-case metrics averaged over a set's cases."""


def summarise_cases(cases: Sequence[Mapping]) -> dict:
    """Means over ``cases`` (rows of a ``metrics.json``) of :data:`COLUMNS` (cases where a metric is undefined are
    left out of its mean), the case count and the pooled lesion-wise counts."""
    out: dict = {"cases": len(cases)}
    for column in COLUMNS:
        # the evaluation's own rule (scripts.metrics.summarise): mean over the finite values, None without one
        out[column] = summarise(np.array([c.get(column) for c in cases], dtype=np.float64))["mean"]
    gt = sum(int(c.get("gt_lesions") or 0) for c in cases)
    detected = sum(int(c.get("detected_lesions") or 0) for c in cases)
    out.update(gt_lesions=gt, detected_lesions=detected,
               pooled_lesion_recall=detected / gt if gt else None,
               pred_lesions=sum(int(c.get("pred_lesions") or 0) for c in cases),
               fp_lesions=sum(int(c.get("lesion_fp") or 0) for c in cases))
    return out


def _loads(datalist: Path | None) -> dict[str, str]:
    """The lesion load of each image file name of a generated datalist (``{}`` without one)."""
    if datalist is None:
        return {}
    content = json.loads(datalist.read_text())
    return {Path(e["image"]).name: e["lesion_load"] for split in ("training", "validation", "test")
            for e in content.get(split, []) if isinstance(e, Mapping) and "lesion_load" in e}


def summarise_sets(sets: Mapping[str, Path], datalist: Path | None = None) -> dict:
    """One summary per set (:func:`summarise_cases`), and per lesion load of the cases a datalist names."""
    loads = _loads(datalist)
    summary: dict = {}
    for name, path in sets.items():
        try:
            cases = json.loads(Path(path).read_text())["cases"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an evaluation metrics.json with 'cases' ({e}).") from e
        entry = {"metrics_file": str(path), **summarise_cases(cases)}
        by_load = {}
        for load in sorted({loads[c["case"]] for c in cases if c.get("case") in loads}):
            by_load[load] = summarise_cases([c for c in cases if loads.get(c.get("case")) == load])
        if by_load:
            entry["by_lesion_load"] = by_load
        summary[name] = entry
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: Mapping[str, Mapping]) -> str:
    """The summary as a markdown table (one row per set and per lesion load)."""
    head = ("| set | cases | DSC | IoU | HD95 (mm) | sensitivity | specificity | lesion recall (mean; pooled) | "
            "lesion precision | FP lesions per case |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = []
    for name, entry in summary.items():
        rows.append((name, entry))
        rows += [(f"{name}, {load} load", sub) for load, sub in entry.get("by_lesion_load", {}).items()]
    for name, e in rows:
        recall = (f"{_fmt(e['lesion_recall'])}; {_fmt(e['pooled_lesion_recall'])} "
                  f"({e['detected_lesions']}/{e['gt_lesions']})")
        lines.append(f"| {name} | {e['cases']} | {_fmt(e['dsc'])} | {_fmt(e['iou'])} | {_fmt(e['hd95'], 1)} | "
                     f"{_fmt(e['sensitivity'])} | {_fmt(e['specificity'], 5)} | {recall} | "
                     f"{_fmt(e['lesion_precision'])} | {_fmt(e['lesion_fp'], 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``summary.json`` and ``summary.md`` under ``--output`` and print the table; 2 with one ``ERROR:`` line
    for bad input."""
    parser = OneLineArgumentParser(prog="python -m scripts.demo.lesions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", required=True, metavar="NAME=METRICS_JSON",
                        help="an evaluated set and its metrics.json (repeat)")
    parser.add_argument("--datalist", default=None, help="the generated datalist, for the per-load rows")
    parser.add_argument("--output", required=True, help="folder of summary.json and summary.md")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        sets = {}
        for item in args.set:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--set expects NAME=METRICS_JSON, got {item!r}.")
            sets[name] = Path(path)
        summary = summarise_sets(sets, Path(args.datalist) if args.datalist else None)
    except (CommandLineError, ValueError, OSError) as e:
        sys.stderr.write(f"ERROR: {' '.join(str(e).split())} (python -m scripts.demo.lesions --help)\n")
        return 2
    out = Path(args.output)
    atomic_write_json(summary, out / "summary.json")
    table = markdown(summary)
    atomic_write_text(table, out / "summary.md")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
