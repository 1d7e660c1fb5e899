# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Loss ablation of MambaClinix (the direction of Table 5 of the paper) on one real lesion case or on generated
volumes with many small lesions, run with the bundle's own workflows.

Each run trains a fresh small 3D MambaClinix on one pyradiomics lesion case with ``configs/train.yaml``
(:class:`monai.bundle.ConfigWorkflow`, workflow type ``train``: its data pipeline, augmentation, optimiser,
schedule, gradient clipping and handlers) with only the loss overridden, then segments the held-out case with
``configs/inference.yaml`` (sliding window, prediction inverted to the image's own grid) and counts the lesion
Dice / recall / precision on that grid against the held-out label. The loss settings of Table 5:

* ``a``: CE + Dice (the baseline, ``lambda_rs = 0``);
* ``b``: CE + Dice + 0.8 RS with fixed ``alpha = 0.3, beta = 0.7`` (``adaptive=False``);
* ``c``: CE + Dice + 0.8 RS adaptive (the MambaClinix loss, ``alpha = 0.3, beta = 0.4``), ``pooling="sum"``;
* ``d``: as ``c`` with the authors' ``pooling="mean"`` region statistics.

A setting sets train.yaml's top-level ``lambda_rs`` and the loss's ``alpha``, ``beta``, ``adaptive`` and
``pooling`` (config ids ``loss#alpha`` ...), see :func:`loss_overrides`. Everything else is shared: the plan
(:func:`ablation_plan`: the planner's intensity normalisation for the training case, a fixed small topology),
written to ``<work>/plan.yaml`` and merged over both configs as ``configs/plan.yaml`` would be; the datalist
(``<work>/datalist.json``: the training case, no validation, the held-out case as test); the iterations and the
seed of each run (:func:`run_overrides`: a seed gives every setting the same initialisation and crops). The runs
are interleaved seed-major (seed 0: a, b, c; seed 1: a, b, c; ...) so that machine load drifts hit every setting
alike. The JSON result is rewritten (atomically) after every run; a markdown table goes next to it.

With ``--case synthetic`` the runs train on the ``training`` list of a generated dataset with many small lesions
and are scored on its ``test`` list (:data:`SYNTHETIC_COMMAND` makes it), pooled over the held-out volumes,
voxel-wise and lesion-wise (recall: reference lesions touched by the prediction; precision: predicted lesions
touching a reference lesion), which is the question of Table 5 (small lesions).

Usage::

    python -m scripts.experiments.ablation_loss [--case brain|lung|synthetic] [--steps N] [--epochs E] [--seeds 0 1 2]
        [--settings a b c] [--patch 48 48 8] [--work-dir DIR] [--output docs/ablation_loss.json]

The images are fetched with ``python -m scripts.demo.data --output data --which pyradiomics``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from scripts.hunet.report import case_metrics
from scripts.io_utils import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow
    from monai.engines import SupervisedTrainer

    from scripts.planning import Plan

__all__ = [
    "SETTINGS",
    "CASES",
    "CaseSetup",
    "METRICS",
    "SYNTHETIC_COMMAND",
    "case_lists",
    "write_datalist",
    "pooled_counts",
    "ablation_plan",
    "loss_overrides",
    "run_overrides",
    "train_and_evaluate",
    "summarise",
    "paired_differences",
    "write_markdown",
    "main",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
"""The bundle whose ``configs/train.yaml`` and ``configs/inference.yaml`` the runs use."""
CONFIGS = BUNDLE_ROOT / "configs"

SETTINGS: dict[str, dict] = {
    "a": {
        "name": "CE + Dice (baseline)",
        "lambda_rs": 0.0,
        "alpha": 0.3,
        "beta": 0.4,
        "adaptive": True,
        "pooling": "sum",
    },
    "b": {
        "name": "CE + Dice + RS fixed (a=0.3, b=0.7)",
        "lambda_rs": 0.8,
        "alpha": 0.3,
        "beta": 0.7,
        "adaptive": False,
        "pooling": "sum",
    },
    "c": {
        "name": "CE + Dice + RS adaptive (MambaClinix, sum pooling)",
        "lambda_rs": 0.8,
        "alpha": 0.3,
        "beta": 0.4,
        "adaptive": True,
        "pooling": "sum",
    },
    "d": {
        "name": "CE + Dice + RS adaptive (authors' mean pooling)",
        "lambda_rs": 0.8,
        "alpha": 0.3,
        "beta": 0.4,
        "adaptive": True,
        "pooling": "mean",
    },
}
"""The loss settings; ``lambda_ce = lambda_dice = 1`` in all of them."""
METRICS = ("dice", "recall", "precision", "lesion_recall", "lesion_precision")
"""The held-out metrics summarised over seeds (voxel-wise, then lesion-wise)."""


class CaseSetup(dict):
    """Per-case settings (a dict): train/test case names, target spacing and modality (which sets the planner's
    intensity normalisation: ``CT`` clips and z-scores with the training foreground's statistics)."""


CASES: dict[str, CaseSetup] = {
    # MRI 256x256x25 at 0.78x0.78x6.5 mm: resampled in-plane to 2 mm, z kept (100x100x25)
    "brain": CaseSetup(train="brain1", test="brain2", pixdim=(2.0, 2.0, 6.5), modality="MR"),
    # CT 512x512x(48|61) at ~0.6x0.6x5 mm: resampled in-plane to 2 mm. lung2 (48 ml tumour) is the training
    # case, lung1 (1.4 ml nodule) the held-out one: the 3-slice nodule alone gives too few foreground patches.
    "lung": CaseSetup(train="lung2", test="lung1", pixdim=(2.0, 2.0, 5.0), modality="CT"),
    # synthetic FLAIR-like volumes with many small lesions (python -m scripts.lesions.generate ... --lesion_load
    # many_small --downsample 2): the training and test lists of the generated datalist, resampled to 2 x 2 x 3 mm
    "synthetic": CaseSetup(train="training", test="test", pixdim=(2.0, 2.0, 3.0), modality="MR", generated=True),
}
SYNTHETIC_COMMAND = ("python -m scripts.lesions.generate --mni_dir data/mni/raw --output data/lesions_ablation "
                     "--train 6 --val 0 --test 4 --seed 1 --lesion_load many_small --test_lesion_load many_small "
                     "--downsample 2")
"""The dataset the ``synthetic`` case expects in ``--data-dir`` (see docs/lesion_workflow.md)."""

# Sized for a 2-core CPU: 48x48x8 crops (96x96x52 mm), in-plane kernels and strides first (the slices are 6.5 mm
# thick), 3D in the two Mamba stages; the total stride (8, 8, 4) divides the patch.
PATCH = (48, 48, 8)
BATCH_SIZE = 2
FEATURES = (8, 16, 32, 32)
KERNELS = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3))
STRIDES = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
BLOCK_TYPES = ("hgcn", "hgcn", "mamba", "mamba")
HGCN_ORDERS = (2, 3)
DROP_PATH_RATE = 0.1


def _case_files(data_dir: Path, name: str) -> dict[str, str]:
    """The image and label of a pyradiomics case, relative to ``data_dir``."""
    files = {"image": f"{name}_image.nrrd", "label": f"{name}_label.nrrd"}
    for f in files.values():
        if not (data_dir / f).is_file():
            raise ValueError(
                f"{data_dir / f} is missing; fetch the images with "
                "`python -m scripts.demo.data --output data --which pyradiomics`."
            )
    return files


def case_lists(setup: CaseSetup, data_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training and held-out cases (``image``, ``label`` relative to ``data_dir``): one pyradiomics case each,
    or the ``training`` and ``test`` lists of a generated datalist (``data_dir/datalist.json``).

    Raises:
        ValueError: missing files or lists, with the command that makes them.
    """
    if not setup.get("generated"):
        return [_case_files(data_dir, setup["train"])], [_case_files(data_dir, setup["test"])]
    path = data_dir / "datalist.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; generate the volumes with `{SYNTHETIC_COMMAND}`.")
    content = json.loads(path.read_text())
    lists = []
    for key in (setup["train"], setup["test"]):
        cases = [{"image": c["image"], "label": c["label"]} for c in content.get(key) or []]
        missing = [f for c in cases for f in c.values() if not (data_dir / f).is_file()]
        if not cases or missing:
            raise ValueError(f"{path}: the '{key}' list is empty or names missing files {missing[:3]}; generate the "
                             f"volumes with `{SYNTHETIC_COMMAND}`.")
        lists.append(cases)
    return lists[0], lists[1]


def _names(cases: Sequence[Mapping[str, str]]) -> str:
    return ", ".join(Path(c["image"]).name.split("_image")[0].removesuffix(".nii.gz") for c in cases)


def write_datalist(train: Sequence[Mapping[str, str]], test: Sequence[Mapping[str, str]], modality: str,
                   path: Path) -> Path:
    """The runs' datalist: the training cases, an empty validation list, the held-out cases as the test list."""
    atomic_write_json(
        {
            "description": f"loss ablation: train on {_names(train)}, evaluate on {_names(test)}",
            "labels": {"0": "background", "1": "lesion"},
            "modality": {"0": modality},
            "training": [dict(c) for c in train],
            "validation": [],
            "test": [dict(c) for c in test],
        },
        path,
    )
    return path


def ablation_plan(setup: CaseSetup, datalist: Path, data_dir: Path, patch: Sequence[int] = PATCH) -> Plan:
    """The plan shared by all runs: the planner's (:func:`scripts.planning.plan_experiment`) intensity
    normalisation for the training case at ``setup["pixdim"]``, with the fixed small topology of the ablation
    (:data:`FEATURES`, :data:`STRIDES`, :data:`KERNELS`, :data:`BLOCK_TYPES`), ``patch``, batch
    :data:`BATCH_SIZE`, the planner's region grid for the patch and no test-time mirroring.

    Returns:
        a :class:`scripts.planning.Plan`.

    Raises:
        ValueError: the patch is not divisible by the total stride (8, 8, 4).
    """
    from scripts.planning import extract_fingerprint, plan_experiment, region_grid

    fingerprint = extract_fingerprint(str(datalist), str(data_dir), modality=setup["modality"])
    planned = plan_experiment(fingerprint, cpu=True, target_spacing=list(setup["pixdim"]))
    return dataclasses.replace(
        planned,
        out_channels=2,
        class_names=["lesion"],
        pixdim=list(setup["pixdim"]),
        spatial_axes_order=None,
        patch_size=[int(p) for p in patch],
        batch_size=BATCH_SIZE,
        features=list(FEATURES),
        strides=[list(s) for s in STRIDES],
        kernel_sizes=[list(k) for k in KERNELS],
        block_types=list(BLOCK_TYPES),
        hgcn_orders=list(HGCN_ORDERS),
        num_regions=region_grid(patch),
        tta_mirror_axes=None,
        plan_info={},
    )


def loss_overrides(setting: str) -> dict[str, object]:
    """The train.yaml overrides of one loss setting of :data:`SETTINGS`: ``lambda_ce``, ``lambda_dice``,
    ``lambda_rs`` (top-level keys) and ``loss#alpha``, ``loss#beta``, ``loss#adaptive``, ``loss#pooling``.

    Raises:
        ValueError: an unknown setting.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}.")
    s = SETTINGS[setting]
    return {
        "lambda_ce": 1.0,
        "lambda_dice": 1.0,
        "lambda_rs": s["lambda_rs"],
        "loss#alpha": s["alpha"],
        "loss#beta": s["beta"],
        "loss#adaptive": s["adaptive"],
        "loss#pooling": s["pooling"],
    }


def run_overrides(setting: str, seed: int, epochs: int, iterations: int, lr: float, run_dir: Path, datalist: Path,
                  data_dir: Path) -> dict[str, object]:
    """All train.yaml overrides of one run: :func:`loss_overrides`, the seed, ``epochs`` of ``iterations``
    iterations, the learning rate, drop-path rate :data:`DROP_PATH_RATE`, no resuming, and the run's own
    ``ckpt_dir`` (``<run_dir>/models``) and ``output_dir`` (``<run_dir>/runs``)."""
    return {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(data_dir),
        "datalist": str(datalist),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "runs"),
        "seed": int(seed),
        "epochs": int(epochs),
        "iterations_per_epoch": int(iterations),
        "learning_rate": float(lr),
        "drop_path_rate": DROP_PATH_RATE,
        "resume": False,
        "num_workers": 0,
        **loss_overrides(setting),
    }


def _workflow(config: str, plan_file: Path, workflow_type: str, **override: object) -> ConfigWorkflow:
    """The bundle's ``configs/<config>`` with ``plan_file`` merged over it and ``override`` applied, initialised."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / config), str(plan_file)],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )
    wf.initialize()
    return wf


def _loss_of(trainer: SupervisedTrainer) -> dict[str, object]:
    """The settings of the loss object the trainer was built with."""
    level = getattr(trainer.loss_function, "loss", trainer.loss_function)  # MambaClinixLoss wraps the level loss
    region = level.region_tversky
    return {
        "lambda_ce": level.lambda_ce,
        "lambda_dice": level.lambda_dice,
        "lambda_rs": level.lambda_rs,
        "alpha": region.alpha,
        "beta": region.beta,
        "adaptive": bool(region.adaptive),
        "pooling": region.pooling,
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def pooled_counts(cases: Sequence[Mapping[str, int]]) -> dict[str, float | int | None]:
    """Voxel-wise Dice, recall and precision and lesion-wise recall and precision of a set of cases, from their
    summed counts (:func:`scripts.hunet.report.case_metrics`: ``tp``, ``fp``, ``fn``, ``gt_lesions``,
    ``detected_lesions``, ``pred_lesions``, ``lesion_fp``); a ratio with nothing to count is ``None``."""
    total = {k: sum(int(c[k]) for c in cases) for k in
             ("tp", "fp", "fn", "gt_lesions", "detected_lesions", "pred_lesions", "lesion_fp")}
    tp, fp, fn = total["tp"], total["fp"], total["fn"]
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0,
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),  # undefined when nothing is predicted
        "lesion_recall": _ratio(total["detected_lesions"], total["gt_lesions"]),
        "lesion_precision": _ratio(total["pred_lesions"] - total["lesion_fp"], total["pred_lesions"]),
        **total,
    }


def _evaluate(case: Mapping[str, str], data_dir: Path, plan_file: Path, ckpt_dir: Path, out_dir: Path) -> dict:
    """Segment ``case["image"]`` with configs/inference.yaml and the run's ``model.pt`` and count the lesion
    voxels and lesions (26-connected) against ``case["label"]`` on the image's own grid."""
    from monai.transforms import LoadImage

    wf = _workflow("inference.yaml", plan_file, "infer", bundle_root=str(BUNDLE_ROOT), ckpt_dir=str(ckpt_dir),
                   output_dir=str(out_dir), input_files=[str(data_dir / case["image"])], save_overlay=False)
    wf.run()
    wf.finalize()
    saved = sorted(out_dir.rglob("*.nii.gz"))
    if len(saved) != 1:
        raise RuntimeError(f"expected one segmentation in {out_dir}, found {[str(p) for p in saved]}.")
    load = LoadImage(image_only=True)
    pred, gt = load(str(saved[0])), load(str(data_dir / case["label"]))
    if pred.shape != gt.shape or not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise RuntimeError(f"the segmentation {tuple(pred.shape)} is not on the grid of the label {tuple(gt.shape)}.")
    m = case_metrics(np.asarray(pred) > 0, np.asarray(gt) > 0)
    return {k: m[k] for k in ("tp", "fp", "fn", "gt_lesions", "detected_lesions", "pred_lesions", "lesion_fp")}


def _chunk_means(values: Sequence[float], every: int) -> list[float]:
    """Means of consecutive chunks of ``every`` values (the last chunk may be shorter)."""
    return [float(np.mean(values[i: i + every])) for i in range(0, len(values), every)]


def train_and_evaluate(
    setting: str,
    seed: int,
    epochs: int,
    iterations: int,
    work_dir: Path,
    plan_file: Path,
    datalist: Path,
    data_dir: Path,
    test_cases: Sequence[Mapping[str, str]],
    train_cases: Sequence[Mapping[str, str]] | None = None,
    lr: float = 1e-3,
    log_every: int = 50,
) -> dict:
    """Train a fresh network with configs/train.yaml and the loss of ``setting``, then evaluate it.

    Args:
        setting: a key of :data:`SETTINGS`.
        seed: train.yaml's ``seed`` (``monai.utils.set_determinism``: network initialisation, crops, augmentation).
        epochs: training epochs.
        iterations: iterations per epoch (batch of :data:`BATCH_SIZE` crops).
        work_dir: the run's folder (``<work_dir>/models``, ``runs``, ``eval``) is made in it.
        plan_file: the plan YAML merged over train.yaml and inference.yaml (:func:`ablation_plan`).
        datalist: the datalist JSON (:func:`write_datalist`).
        data_dir: the folder of the case files.
        test_cases: the held-out cases (``image``, ``label`` relative to ``data_dir``).
        train_cases: optionally the training cases, evaluated the same way (a check of the fit).
        lr: train.yaml's ``learning_rate``.
        log_every: ``train_loss`` holds the mean training loss of every this many iterations.

    Returns:
        ``setting``, ``seed``, ``steps`` (``epochs * iterations``), ``epochs``, ``loss`` (the settings of the
        loss object the trainer used), ``train_loss``, ``train_s``, ``test`` and ``train_case`` (the
        :func:`pooled_counts` of the cases), ``test_cases`` (their counts, in order) and ``eval_s``.
    """
    from ignite.engine import Events
    from monai.handlers import from_engine

    run_dir = Path(work_dir) / f"{setting}_seed{seed}"
    overrides = run_overrides(setting, seed, epochs, iterations, lr, run_dir, datalist, data_dir)
    wf = _workflow("train.yaml", plan_file, "train", **overrides)
    trainer = wf.trainer
    losses: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(from_engine(["loss"], first=True)(e.state.output)))
    )
    start = time.perf_counter()
    wf.run()
    wf.finalize()
    train_s = time.perf_counter() - start
    result = {"setting": setting, "seed": seed, "steps": epochs * iterations, "epochs": epochs,
              "loss": _loss_of(trainer), "train_loss": _chunk_means(losses, log_every), "train_s": round(train_s, 1)}
    logger.info("setting %s seed %d: %d iterations, mean loss per %d: %s", setting, seed, len(losses), log_every,
                [round(v, 4) for v in result["train_loss"]])
    start = time.perf_counter()
    ckpt_dir = run_dir / "models"
    result["test_cases"] = [_evaluate(c, data_dir, plan_file, ckpt_dir, run_dir / "eval" / "test" / str(i))
                            for i, c in enumerate(test_cases)]
    result["test"] = pooled_counts(result["test_cases"])
    if train_cases:
        result["train_case"] = pooled_counts([
            _evaluate(c, data_dir, plan_file, ckpt_dir, run_dir / "eval" / "train" / str(i))
            for i, c in enumerate(train_cases)])
    result["eval_s"] = round(time.perf_counter() - start, 1)
    return result


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def summarise(runs: list[dict], settings: Sequence[str]) -> dict[str, dict]:
    """Mean and sample std over seeds of the held-out (and training-case) metrics, per setting."""
    out = {}
    for s in settings:
        rs = [r for r in runs if r["setting"] == s]
        if not rs:
            continue
        entry: dict = {
            "name": SETTINGS[s]["name"],
            "runs": len(rs),
            "train_s_mean": float(np.mean([r["train_s"] for r in rs])),
        }
        for part in ("test", "train_case"):
            if all(part in r for r in rs):
                for m in METRICS:
                    mean, std, n = _mean_std([r[part][m] for r in rs])
                    entry[f"{part}_{m}"] = {"mean": mean, "std": std, "n": n}
        out[s] = entry
    return out


def paired_differences(runs: list[dict], settings: Sequence[str], reference: str = "a") -> dict[str, dict]:
    """Per-seed differences of the held-out :data:`METRICS` of every setting against ``reference``.

    Runs with the same seed share the network initialisation and the crop sequence (only the loss differs),
    so the comparison is paired: mean difference and the number of seeds where the setting is higher.
    """
    ref = {r["seed"]: r for r in runs if r["setting"] == reference}
    out = {}
    for s in settings:
        if s == reference:
            continue
        pairs = [(r, ref[r["seed"]]) for r in runs if r["setting"] == s and r["seed"] in ref]
        if not pairs:
            continue
        entry = {"vs": reference, "seeds": len(pairs)}
        for m in METRICS:
            diffs = [
                r["test"][m] - q["test"][m]
                for r, q in pairs
                if r["test"].get(m) is not None and q["test"].get(m) is not None
            ]
            entry[m] = {
                "mean_diff": float(np.mean(diffs)) if diffs else None,
                "higher_in": int(sum(d > 0 for d in diffs)),
                "n": len(diffs),
            }
        out[s] = entry
    return out


def _fmt(stat: dict | None, scale: float = 100.0) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    return f"{scale * stat['mean']:.1f} +- {scale * stat['std']:.1f}"


def _machine_text(machine: Mapping | str) -> str:
    """One line for a :func:`scripts.benchmark.machine.describe_machine` dict (a string is kept as it is)."""
    if isinstance(machine, str):
        return machine
    from scripts.benchmark.machine import summarize_machine

    load = machine.get("load_average")
    return summarize_machine(machine) + (f"; load average at the end {', '.join(f'{v:.1f}' for v in load)}"
                                         if load else "")


def write_markdown(report: dict, path: Path) -> None:
    """The markdown table of the ablation (atomically)."""
    cfg = report["config"]
    iterations = f"{cfg['steps']} training iterations" + (f" ({cfg['epochs']} epochs)" if cfg.get("epochs", 1) > 1
                                                          else "")
    source = ("synthetic FLAIR-like volumes with generated lesion masks" if cfg.get("case") == "synthetic"
              else "pyradiomics, real lesion masks")
    lines = [
        "# Loss ablation (direction of Table 5)",
        "",
        f"Train on `{cfg['train_case']}`, evaluate on `{cfg['test_case']}` ({source}); "
        f"{iterations} (lr {cfg['lr']}, batch {cfg.get('batch_size', BATCH_SIZE)} crops of {cfg['patch']}), "
        f"seeds {cfg['seeds']}, runs interleaved seed-major. Metrics in % on the held-out images' own grids, pooled "
        "over the held-out cases (voxel counts; lesions: 26-connected components, detected when any predicted voxel "
        "overlaps), mean +- sample std over seeds (precision over the runs that predicted any lesion).",
        "",
        "| setting | loss | held-out Dice | recall | precision | lesion-wise recall | lesion-wise precision "
        "| training-case Dice | steps | seeds | train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def counted(stat: dict | None, runs: int) -> str:
        return _fmt(stat) + (f" (n={stat['n']})" if stat and stat["n"] != runs else "")

    for key, entry in report["summary"].items():
        cells = [counted(entry.get(f"test_{m}"), entry["runs"]) for m in METRICS]
        lines.append(
            f"| {key} | {entry['name']} | {' | '.join(cells)} | {_fmt(entry.get('train_case_dice'))} | "
            f"{cfg['steps']} | {entry['runs']} | {entry['train_s_mean']:.0f} |"
        )
    paired = report.get("paired", {})
    if paired:
        lines += [
            "",
            "Paired per-seed differences against the baseline (a) on the held-out data (same seed = same "
            "initialisation and crops; percentage points, and in how many seeds the setting is higher):",
            "",
            "| setting | dDice | dRecall | dPrecision | dLesion recall | dLesion precision |",
            "|---|---|---|---|---|---|",
        ]
        for key, entry in paired.items():
            cells = []
            for m in METRICS:
                d = entry.get(m)
                if d is None:  # a report written before the lesion-wise metrics
                    cells.append("n/a")
                    continue
                text = "n/a" if d["mean_diff"] is None else f"{100 * d['mean_diff']:+.1f} ({d['higher_in']}/{d['n']})"
                cells.append(text)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    blocks = cfg.get("plan", {}).get("block_types", list(BLOCK_TYPES))
    lines += [
        "",
        f"- Network: MambaClinix, features {cfg['features']}, strides {cfg['strides']}, kernels {cfg['kernels']}, "
        f"blocks {blocks}, deep supervision; region grid {cfg['num_regions']}; RS pooling: `sum` unless the "
        "setting says `mean` (the bundle's default, the authors').",
    ]
    if cfg.get("pipeline"):
        lines.append(f"- Pipeline: {cfg['pipeline']}")
    lines += [
        f"- Machine: {_machine_text(report['machine'])}.",
        f"- Total wall time: {report['wall_s'] / 60:.1f} min.",
        f"- Command: `{report['command']}`",
        "",
    ]
    if report.get("interpretation"):
        lines += ["## What it shows", "", report["interpretation"], ""]
    atomic_write_text("\n".join(lines), path)


def _pipeline_text(plan: Mapping) -> str:
    return (
        "configs/train.yaml through `monai.bundle.ConfigWorkflow` (its loading, RAS orientation, resampling to "
        f"{plan['pixdim']} mm, foreground crop, {'/'.join(plan['intensity_schemes'])} normalisation, "
        "RandCropByPosNegLabel and nnU-Net augmentation, Adam with the poly schedule, gradient clipping) with the "
        "ablation's plan and loss overrides; the held-out case segmented with configs/inference.yaml (sliding "
        "window, Gaussian, no mirroring), the prediction inverted to the image's own grid."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.experiments.ablation_loss",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="brain")
    parser.add_argument("--steps", type=int, default=300, help="training iterations per run (all epochs)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs the steps are split into (divides --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["a", "b", "c"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=list(PATCH),
                        help="training patch and sliding-window ROI, divisible by (8, 8, 4)")
    parser.add_argument("--data-dir", default=None,
                        help="the cases' folder (default data/pyradiomics; data/lesions_ablation for --case synthetic)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the plan, datalist, checkpoints and segmentations here (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--output", default="docs/ablation_loss.json")
    parser.add_argument("--no-train-eval", action="store_true", help="skip the training-case (fit) evaluation")
    parser.add_argument(
        "--note", default=None, help="a text file whose content is added to the markdown as 'What it shows'"
    )
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the markdown from an existing --output JSON and exit"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.epochs < 1 or args.steps % args.epochs:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --epochs ({args.epochs}).")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    output = Path(args.output)
    note = Path(args.note).read_text().strip() if args.note else None
    if args.markdown_only:
        if not output.is_file():
            parser.error(f"{output} does not exist; run the ablation first (without --markdown-only).")
        report = json.loads(output.read_text())
        if note:
            report["interpretation"] = note
            atomic_write_json(report, output)
        write_markdown(report, output.with_suffix(".md"))
        return 0

    from scripts.benchmark.machine import describe_machine

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    setup = CASES[args.case]
    data_dir = Path(args.data_dir or ("data/lesions_ablation" if setup.get("generated") else "data/pyradiomics"))
    data_dir = data_dir.absolute()
    try:
        train_cases, test_cases = case_lists(setup, data_dir)
    except ValueError as e:
        parser.error(str(e))
    output.parent.mkdir(parents=True, exist_ok=True)
    cli_args = argv if argv is not None else sys.argv[1:]
    command = "python -m scripts.experiments.ablation_loss " + " ".join(shlex.quote(a) for a in cli_args)
    iterations = args.steps // args.epochs
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # train.yaml's and inference.yaml's default

    with tempfile.TemporaryDirectory(prefix="ablation_loss_") as tmp:
        work = Path(args.work_dir).absolute() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        datalist = write_datalist(train_cases, test_cases, setup["modality"], work / "datalist.json")
        plan = ablation_plan(setup, datalist, data_dir, args.patch).to_config(include_info=False)
        plan_file = work / "plan.yaml"
        atomic_write_text(yaml.safe_dump(plan, sort_keys=False, default_flow_style=None), plan_file)
        stats = plan["intensity_stats"][0]
        report = {
            "config": {
                "case": args.case, "train_case": _names(train_cases), "test_case": _names(test_cases),
                "pixdim": plan["pixdim"], "scheme": plan["intensity_schemes"][0], "ct_stats": stats,
                "steps": args.steps, "epochs": args.epochs, "iterations_per_epoch": iterations, "seeds": args.seeds,
                "settings": {s: SETTINGS[s] for s in args.settings}, "lr": args.lr, "patch": plan["patch_size"],
                "batch_size": plan["batch_size"], "features": plan["features"], "strides": plan["strides"],
                "kernels": plan["kernel_sizes"], "num_regions": plan["num_regions"], "threads": args.threads,
                "drop_path_rate": DROP_PATH_RATE, "workflows": ["configs/train.yaml", "configs/inference.yaml"],
                "plan": plan, "pipeline": _pipeline_text(plan),
            },
            "command": command,
            "runs": [],
        }
        if note:
            report["interpretation"] = note
        for seed in args.seeds:  # seed-major round robin
            for setting in args.settings:
                result = train_and_evaluate(
                    setting, seed, args.epochs, iterations, work, plan_file, datalist, data_dir, test_cases,
                    None if args.no_train_eval else train_cases, lr=args.lr,
                )
                logger.info("setting %s seed %d: %s", setting, seed, result["test"])
                report["runs"].append(result)
                report["summary"] = summarise(report["runs"], args.settings)
                report["paired"] = paired_differences(report["runs"], args.settings)
                report["wall_s"] = round(time.perf_counter() - wall, 1)
                report["machine"] = describe_machine(device, args.threads)
                atomic_write_json(report, output)
    write_markdown(report, output.with_suffix(".md"))
    for key, entry in report["summary"].items():
        logger.info(
            "%s %-55s Dice %s recall %s precision %s lesion recall %s lesion precision %s", key, entry["name"],
            *(_fmt(entry.get(f"test_{m}")) for m in METRICS),
        )
    logger.info("total wall time %.1f min", report["wall_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
