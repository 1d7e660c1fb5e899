# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Plots of :mod:`scripts.benchmark` results (PNG, matplotlib's Agg backend), each file written atomically."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from scripts.io_utils import atomic_path

__all__ = ["latency_plot", "make_plots", "scaling_plot"]


def scaling_plot(result: dict[str, Any]) -> Any | None:
    """Log-log forward latency against the patch edge, one line per model with its fitted exponent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = result.get("scaling")
    if not scaling:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, sc in scaling["models"].items():
        pts = sorted((int(s), p["median_s"]) for s, p in sc["points"].items() if "median_s" in p)
        if not pts:
            continue
        edges, times = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        line = ax.plot(edges, times, "o-", label=f"{name} (k = {sc['exponent']:.2f})" if sc["exponent"] else name)[0]
        if sc["exponent"] is not None and len(pts) > 1:
            a = np.mean(np.log(times) - sc["exponent"] * np.log(edges))
            grid = np.linspace(edges.min(), edges.max(), 20)
            ax.plot(grid, np.exp(a) * grid ** sc["exponent"], "--", color=line.get_color(), alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patch edge (voxels, cubic patch)")
    ax.set_ylabel("forward latency (s, batch 1)")
    mach = result["machine"]
    ax.set_title(f"Forward latency vs patch edge ({mach['device']}, {mach['threads']} threads)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def latency_plot(result: dict[str, Any], key: str = "forward") -> Any | None:
    """Bar chart of the ``key`` (``"forward"`` or ``"train"``) median latency per model, grouped by patch edge, with
    the range over the rounds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def timed(m: dict[str, Any]) -> list[int]:
        return [int(s) for s, e in m["sizes"].items() if "median_s" in e.get(key, {})]

    models = [name for name, m in result["models"].items() if timed(m)]  # memory-only models have no bar
    sizes = sorted({s for name in models for s in timed(result["models"][name])})
    if not sizes:
        return None
    # one distinct colour per model: tab10 repeats after 10 models, so use tab20 (then a sampled map) beyond that
    n = len(models)
    if n <= 20:
        colours = [plt.get_cmap("tab10" if n <= 10 else "tab20")(i) for i in range(n)]
    else:
        colours = [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) * len(sizes) / 2), 4))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        timings = [result["models"][name]["sizes"].get(str(s), {}).get(key, {}) for s in sizes]
        vals = np.array([t.get("median_s", np.nan) for t in timings])
        # the range over the rounds as error bars (results of the earlier method have none)
        low = np.array([t.get("min_s", t.get("median_s", np.nan)) for t in timings])
        high = np.array([t.get("max_s", t.get("median_s", np.nan)) for t in timings])
        ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=name, color=colours[i],
               yerr=np.nan_to_num(np.stack([vals - low, high - vals])), capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}^3" for s in sizes])
    ax.set_ylabel(f"{'forward' if key == 'forward' else 'training step'} latency (s)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: no bar hidden
    return fig


def make_plots(result: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``scaling.png``, ``latency_forward.png`` and ``latency_train.png`` (those with data) to ``out_dir``.

    Returns:
        The paths written.
    """
    import matplotlib.pyplot as plt

    paths = []
    for fname, make in (
        ("scaling.png", lambda: scaling_plot(result)),
        ("latency_forward.png", lambda: latency_plot(result, "forward")),
        ("latency_train.png", lambda: latency_plot(result, "train")),
    ):
        fig = make()
        if fig is None:
            continue
        path = os.path.join(out_dir, fname)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
