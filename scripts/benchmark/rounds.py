# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Interleaved rounds of timed calls, and what they give: each model's time and each ratio with its spread.

Every round calls every model once, in an order rotated by one from round to round (round ``r`` starts at model
``r mod n``: :func:`rotated`), after untimed warm-up calls, so that neither a drift of the machine's load nor a
model's place after another one favours any model. A ratio between two models is taken within each round, where
both ran under the same load (:func:`round_ratios`), and summarised over the rounds by its median and spread
(:func:`spread`: minimum, maximum and quartiles). Every call is recorded with its wall-clock and process CPU time and
the 1-minute load average just before it.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from scripts.runtime import load_average
from scripts.benchmark.worker import error_line

__all__ = ["load_1min", "rotated", "round_ratios", "run_rounds", "spread"]

logger = logging.getLogger(__name__)


def load_1min() -> float | None:
    """The 1-minute load average now (``None`` where unavailable)."""
    load = load_average()
    return load[0] if load else None


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The call order of round ``round_index``: ``names`` rotated to start at ``names[round_index % len(names)]``."""
    if not names:
        return []
    start = round_index % len(names)
    return list(names[start:]) + list(names[:start])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum, maximum and first / third quartiles (``statistics.quantiles``, inclusive) of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("spread() needs at least one value.")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {
        "median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
        "n": len(values),
    }


def _summary(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The time fields of one model's result from its timed calls (``median_s``, ``min_s`` ... as before)."""
    wall = spread([m["wall_s"] for m in measurements])
    loads = [m["load_1min"] for m in measurements if m["load_1min"] is not None]
    return {
        "median_s": wall["median"], "min_s": wall["min"], "max_s": wall["max"], "q1_s": wall["q1"], "q3_s": wall["q3"],
        "runs_s": [round(m["wall_s"], 4) for m in measurements],
        "cpu_median_s": statistics.median(m["cpu_s"] for m in measurements),
        **({"load_1min": spread(loads)} if loads else {}),
    }


def run_rounds(
    names: Sequence[str],
    call: Callable[[str], tuple[float, float]],
    rounds: int,
    warmup: int = 1,
    max_call_s: float = math.inf,
    predicted: Mapping[str, float] | None = None,
    compiled: Collection[str] = (),
    load: Callable[[], float | None] = load_1min,
) -> dict[str, dict[str, Any]]:
    """Time ``call(name)`` for every model in ``rounds`` interleaved rounds (order :func:`rotated`).

    A model is left out, with the reason recorded, when its predicted call time exceeds ``max_call_s``, when a
    warm-up call fails or takes longer than ``max_call_s`` (a compiled model is judged by its second call: the
    first compiles), and from the rounds after a timed call that fails or takes longer than that.

    Args:
        names: the models, in the order of the first round.
        call: runs one call of the model and returns its wall-clock and process CPU seconds; ``RuntimeError`` or
            ``ValueError`` when the call fails.
        rounds: timed rounds (at least 1).
        warmup: untimed calls per model before the rounds (0: none; then the first round's call decides skipping).
        max_call_s: the longest call kept.
        predicted: a predicted call time per model (e.g. from a smaller patch), to skip a model without calling it.
        compiled: the models whose first call compiles (they get one more warm-up call).
        load: the load figure recorded with each timed call (default the 1-minute load average).

    Returns:
        Per model: ``measurements`` (one record per timed call: ``round``, ``position`` in the round, ``wall_s``,
        ``cpu_s``, ``load_1min``), ``warmup_s`` (wall seconds of the warm-up calls) and, when it has timed calls,
        ``median_s``, ``min_s``, ``max_s``, ``q1_s``, ``q3_s``, ``runs_s``, ``cpu_median_s`` and ``load_1min``
        (:func:`spread` of the loads); ``skipped`` or ``error`` with the reason when it was left out.

    Raises:
        ValueError: ``rounds`` below 1 or ``warmup`` below 0.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}.")
    predicted = predicted or {}
    results: dict[str, dict[str, Any]] = {}
    active: list[str] = []
    for name in names:
        if predicted.get(name, 0.0) > max_call_s:
            results[name] = {"skipped": f"predicted {predicted[name]:.0f} s per call > --max-call-s {max_call_s:.0f}"}
            continue
        warm: list[float] = []
        try:
            for _ in range(warmup + (1 if warmup and name in compiled else 0)):
                warm.append(call(name)[0])
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: record it and go on with the others
            logger.warning("%s failed: %s", name, error_line(e))
            results[name] = {"error": error_line(e), "warmup_s": warm}
            continue
        results[name] = {"warmup_s": warm, "measurements": []}
        if warm and warm[-1] > max_call_s:
            results[name]["skipped"] = f"a warm-up call took {warm[-1]:.0f} s > --max-call-s {max_call_s:.0f}"
            continue
        active.append(name)
    for r in range(rounds):
        for position, name in enumerate(rotated(active, r)):
            record: dict[str, Any] = {"round": r, "position": position, "load_1min": load()}
            try:
                record["wall_s"], record["cpu_s"] = call(name)
            except (RuntimeError, ValueError) as e:
                logger.warning("%s failed in round %d: %s", name, r + 1, error_line(e))
                results[name]["error"] = error_line(e)
                continue
            results[name]["measurements"].append(record)
            if record["wall_s"] > max_call_s:
                results[name]["skipped"] = f"round {r + 1} took {record['wall_s']:.0f} s > --max-call-s {max_call_s:.0f}"
        active = [n for n in active if "error" not in results[n] and "skipped" not in results[n]]
    for result in results.values():
        if result.get("measurements"):
            result.update(_summary(result["measurements"]))
    return results


def round_ratios(results: Mapping[str, Mapping[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Per-round ratios ``reference time / peer time`` for every other model of a :func:`run_rounds` result.

    Only the rounds in which both models were timed count.

    Args:
        results: a :func:`run_rounds` result.
        reference: the model in the numerator (e.g. ``"mambaclinix"``).

    Returns:
        Per peer with at least one common round: ``per_round`` (the wall-clock ratios in round order), the :func:`spread`
        fields (``median``, ``min``, ``max``, ``q1``, ``q3``, ``n``) and ``cpu_median`` (the median of the per-round
        ratios of process CPU time); empty when the reference has no timed calls.
    """
    ref = {m["round"]: m for m in results.get(reference, {}).get("measurements", [])}
    out: dict[str, dict[str, Any]] = {}
    for peer, result in results.items():
        if peer == reference:
            continue
        common = [(ref[m["round"]], m) for m in result.get("measurements", []) if m["round"] in ref]
        if not common:
            continue
        ratios = [a["wall_s"] / b["wall_s"] for a, b in common]
        cpu = [a["cpu_s"] / b["cpu_s"] for a, b in common if b["cpu_s"] > 0]
        out[peer] = {"per_round": ratios, **spread(ratios), **({"cpu_median": statistics.median(cpu)} if cpu else {})}
    return out
