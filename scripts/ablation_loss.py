# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Loss ablation of MambaClinix (the direction of Table 5 of the paper) on one real lesion case.

The same small 3D MambaClinix is trained for a fixed number of steps on one pyradiomics lesion case and
evaluated on another (sliding-window inference, lesion Dice / recall / precision on the held-out image's own
grid) with the loss settings of Table 5:

* ``a``: CE + Dice (the baseline, ``lambda_rs = 0``);
* ``b``: CE + Dice + 0.8 RS with fixed ``alpha = 0.3, beta = 0.7`` (``adaptive=False``);
* ``c``: CE + Dice + 0.8 RS adaptive (the MambaClinix loss, ``alpha = 0.3, beta = 0.4``), ``pooling="sum"``;
* ``d``: as ``c`` with the authors' ``pooling="mean"`` region statistics.

Everything but the loss is shared: data pipeline, network, optimiser, steps, seeds. The runs are interleaved
seed-major (seed 0: a, b, c; seed 1: a, b, c; ...) so that machine load drifts hit every setting alike. The
JSON result is rewritten (atomically) after every run; a markdown table goes next to it.

Usage::

    python -m scripts.ablation_loss [--case brain|lung] [--steps N] [--seeds 0 1 2] [--settings a b c]
        [--output docs/ablation_loss.json]

The images are fetched with ``python -m scripts.demo_data --output data --which pyradiomics``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism

from .io_utils import atomic_write_json
from .losses import MambaClinixLoss
from .networks import MambaClinix
from .transforms import NormalizeChannelsd

__all__ = ["SETTINGS", "CASES", "CaseSetup", "build_network", "build_loss", "train_and_evaluate", "main"]

logger = logging.getLogger(__name__)

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


class CaseSetup(dict):
    """Per-case settings (a dict): train/test case names, target spacing and intensity scheme."""


CASES: dict[str, CaseSetup] = {
    # MRI 256x256x25 at 0.78x0.78x6.5 mm: resampled in-plane to 2 mm, z kept (100x100x25)
    "brain": CaseSetup(train="brain1", test="brain2", pixdim=(2.0, 2.0, 6.5), scheme="zscore"),
    # CT 512x512x(48|61) at ~0.6x0.6x5 mm: resampled in-plane to 2 mm. lung2 (48 ml tumour) is the training
    # case, lung1 (1.4 ml nodule) the held-out one: the 3-slice nodule alone gives too few foreground patches.
    "lung": CaseSetup(train="lung2", test="lung1", pixdim=(2.0, 2.0, 5.0), scheme="ct"),
}

# Sized for a 2-core CPU shared with other jobs (~3 s per step there): 48x48x8 crops (96x96x52 mm), in-plane
# kernels and strides first (the slices are 6.5 mm thick), 3D in the two Mamba stages.
PATCH = (48, 48, 8)
FEATURES = (8, 16, 32, 32)
KERNELS = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3))
STRIDES = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))  # total (8, 8, 4): the patch is divisible by it
NUM_REGIONS = tuple(max(1, min(8, p // 4)) for p in PATCH)  # the planner's rule: (8, 8, 2)


def build_network() -> MambaClinix:
    """The small 3D MambaClinix of the ablation: 4 stages (2 HGCN, 2 Mamba), deep supervision."""
    return MambaClinix(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        features=FEATURES,
        kernel_size=KERNELS,
        strides=STRIDES,
        drop_path_rate=0.1,
        deep_supervision=True,
    )


def build_loss(setting: str) -> MambaClinixLoss:
    """The compound loss of one ablation setting (see :data:`SETTINGS`)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}.")
    s = SETTINGS[setting]
    return MambaClinixLoss(
        lambda_ce=1.0,
        lambda_dice=1.0,
        lambda_rs=s["lambda_rs"],
        num_regions=NUM_REGIONS,
        alpha=s["alpha"],
        beta=s["beta"],
        adaptive=s["adaptive"],
        pooling=s["pooling"],
    )


def _ct_stats(image: torch.Tensor, label: torch.Tensor) -> list[float]:
    """nnU-Net's CT statistics from the training case's foreground: [p0.5, p99.5, mean, std]."""
    values = image[label > 0].double().numpy()
    lower, upper = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, lower, upper)
    return [float(lower), float(upper), float(clipped.mean()), float(max(clipped.std(), 1e-8))]


def _deterministic(setup: CaseSetup, stats: list[float] | None, keys: Sequence[str]) -> Compose:
    """Loading, in-plane resampling and intensity normalisation (``keys`` are resampled)."""
    scheme = setup["scheme"]
    return Compose(
        [
            LoadImaged(keys=["image", "label"], reader="NrrdReader"),
            EnsureChannelFirstd(keys=["image", "label"]),
            EnsureTyped(keys="image", dtype=torch.float32),
            Spacingd(keys=list(keys), pixdim=setup["pixdim"], mode=["bilinear", "nearest"][: len(keys)]),
            NormalizeChannelsd(keys="image", schemes=scheme, stats=[stats] if scheme == "ct" else None),
        ]
    )


def _random_transforms() -> Compose:
    """Foreground-oversampled crops (2 positive : 1 negative) and light augmentation."""
    return Compose(
        [
            SpatialPadd(keys=["image", "label"], spatial_size=PATCH),
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=PATCH, pos=2, neg=1, num_samples=2
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", std=0.05, prob=0.2),
        ]
    )


def _case_files(data_dir: Path, name: str) -> dict[str, str]:
    files = {"image": str(data_dir / f"{name}_image.nrrd"), "label": str(data_dir / f"{name}_label.nrrd")}
    for f in files.values():
        if not os.path.isfile(f):
            raise ValueError(
                f"{f} is missing; fetch the images with "
                "`python -m scripts.demo_data --output data --which pyradiomics`."
            )
    return files


def _counts(pred: np.ndarray, gt: np.ndarray) -> dict[str, float | None]:
    tp = int(np.logical_and(pred, gt).sum())
    fp = int(np.logical_and(pred, ~gt).sum())
    fn = int(np.logical_and(~pred, gt).sum())
    dice = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
    recall = tp / (tp + fn) if (tp + fn) > 0 else None
    precision = tp / (tp + fp) if (tp + fp) > 0 else None  # undefined when nothing is predicted
    return {"dice": dice, "recall": recall, "precision": precision, "tp": tp, "fp": fp, "fn": fn}


@torch.no_grad()
def _evaluate(net: torch.nn.Module, item: dict, transform: Compose) -> dict[str, float | None]:
    """Sliding-window prediction on the resampled image, logits resampled back to the original grid
    (``Invertd``), argmax, and lesion Dice / recall / precision against the original label."""
    net.eval()
    inferer = SlidingWindowInferer(roi_size=PATCH, sw_batch_size=4, overlap=0.25, mode="gaussian")
    image = item["image"]
    logits = torch.as_tensor(inferer(torch.as_tensor(image).unsqueeze(0), net))[0]
    pred = MetaTensor(logits, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    d = {"image": image, "label": item["label"], "pred": pred}
    d = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(d)
    pred = torch.as_tensor(d["pred"]).argmax(0).numpy() > 0
    gt = torch.as_tensor(item["label"])[0].numpy() > 0
    if pred.shape != gt.shape:
        raise RuntimeError(f"inverted prediction {pred.shape} does not match the label {gt.shape}.")
    net.train()
    return _counts(pred, gt)


def train_and_evaluate(
    setting: str,
    seed: int,
    steps: int,
    train_item: dict,
    test_item: dict,
    test_transform: Compose,
    lr: float = 1e-3,
    log_every: int = 50,
    train_eval_item: dict | None = None,
    train_eval_transform: Compose | None = None,
) -> dict:
    """Train a fresh network with the loss of ``setting`` for ``steps`` steps and evaluate it.

    Args:
        setting: a key of :data:`SETTINGS`.
        seed: seeds network init, crops and augmentation (``monai.utils.set_determinism``).
        steps: optimiser steps (batch: 2 crops of the training case).
        train_item: the preprocessed training case (dict of image and label, resampled).
        test_item: the held-out case, image resampled and label on its original grid.
        test_transform: the deterministic transform of ``test_item`` (to invert the prediction).
        lr: Adam learning rate.
        log_every: log the mean training loss every this many steps.
        train_eval_item: optionally, the training case prepared like ``test_item`` (fit sanity check).
        train_eval_transform: its deterministic transform.
    """
    set_determinism(seed=seed)
    net = build_network()
    loss_fn = build_loss(setting)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    rand = _random_transforms()
    rand.set_random_state(seed=seed)
    net.train()
    start = time.perf_counter()
    running, losses = [], []
    for step in range(1, steps + 1):
        crops = rand(train_item)
        image = torch.stack([torch.as_tensor(c["image"]) for c in crops])
        label = torch.stack([torch.as_tensor(c["label"]) for c in crops])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            losses.append(float(np.mean(running)))
            logger.info("setting %s seed %d step %d/%d loss %.4f", setting, seed, step, steps, losses[-1])
            running = []
    train_s = time.perf_counter() - start
    result = {"setting": setting, "seed": seed, "steps": steps, "train_loss": losses, "train_s": round(train_s, 1)}
    start = time.perf_counter()
    result["test"] = _evaluate(net, test_item, test_transform)
    if train_eval_item is not None and train_eval_transform is not None:
        result["train_case"] = _evaluate(net, train_eval_item, train_eval_transform)
    result["eval_s"] = round(time.perf_counter() - start, 1)
    set_determinism(seed=None)
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
                for m in ("dice", "recall", "precision"):
                    mean, std, n = _mean_std([r[part][m] for r in rs])
                    entry[f"{part}_{m}"] = {"mean": mean, "std": std, "n": n}
        out[s] = entry
    return out


def paired_differences(runs: list[dict], settings: Sequence[str], reference: str = "a") -> dict[str, dict]:
    """Per-seed differences of the held-out Dice and recall of every setting against ``reference``.

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
        for m in ("dice", "recall", "precision"):
            diffs = [
                r["test"][m] - q["test"][m]
                for r, q in pairs
                if r["test"][m] is not None and q["test"][m] is not None
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


def write_markdown(report: dict, path: Path) -> None:
    """The markdown table of the ablation (atomically)."""
    cfg = report["config"]
    lines = [
        "# Loss ablation (direction of Table 5)",
        "",
        f"Train on `{cfg['train_case']}`, evaluate on `{cfg['test_case']}` (pyradiomics, real lesion masks); "
        f"{cfg['steps']} Adam steps (lr {cfg['lr']}, batch 2 crops of {cfg['patch']}), seeds {cfg['seeds']}, "
        f"runs interleaved seed-major. Lesion metrics in % on the held-out image's own grid, mean +- sample std "
        "over seeds (precision over the runs that predicted any lesion).",
        "",
        "| setting | loss | held-out Dice | held-out recall | held-out precision | training-case Dice | steps "
        "| seeds | train s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in report["summary"].items():
        prec = entry.get("test_precision")
        prec_txt = _fmt(prec) + (f" (n={prec['n']})" if prec and prec["n"] != entry["runs"] else "")
        lines.append(
            f"| {key} | {entry['name']} | {_fmt(entry.get('test_dice'))} | {_fmt(entry.get('test_recall'))} | "
            f"{prec_txt} | {_fmt(entry.get('train_case_dice'))} | {cfg['steps']} | {entry['runs']} | "
            f"{entry['train_s_mean']:.0f} |"
        )
    paired = report.get("paired", {})
    if paired:
        lines += [
            "",
            "Paired per-seed differences against the baseline (a) on the held-out case (same seed = same "
            "initialisation and crops; percentage points, and in how many seeds the setting is higher):",
            "",
            "| setting | dDice | dRecall | dPrecision |",
            "|---|---|---|---|",
        ]
        for key, entry in paired.items():
            cells = []
            for m in ("dice", "recall", "precision"):
                d = entry[m]
                text = "n/a" if d["mean_diff"] is None else f"{100 * d['mean_diff']:+.1f} ({d['higher_in']}/{d['n']})"
                cells.append(text)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- Network: MambaClinix, features {list(FEATURES)}, strides {[list(s) for s in STRIDES]}, kernels "
        f"{[list(k) for k in KERNELS]}, blocks {build_network().block_types}, deep supervision; region grid "
        f"{list(NUM_REGIONS)}; RS pooling: `sum` unless the setting says `mean` (the bundle's default is now `mean`, the authors').",
        f"- Pipeline: in-plane resampling to {cfg['pixdim']} mm, {cfg['scheme']} normalisation, "
        "RandCropByPosNegLabel (pos 2 : neg 1), flips, intensity scale/shift, noise; sliding-window inference "
        "(Gaussian, overlap 0.25), logits inverted to the original grid.",
        f"- Machine: {report['machine']}.",
        f"- Total wall time: {report['wall_s'] / 60:.1f} min.",
        f"- Command: `{report['command']}`",
        "",
    ]
    if report.get("interpretation"):
        lines += ["## What it shows", "", report["interpretation"], ""]
    text = "\n".join(lines)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _machine() -> str:
    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at the end {load}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="brain")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["a", "b", "c"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="data/pyradiomics")
    parser.add_argument("--output", default="docs/ablation_loss.json")
    parser.add_argument("--no-train-eval", action="store_true", help="skip the training-case (fit) evaluation")
    parser.add_argument(
        "--note", default=None, help="a text file whose content is added to the markdown as 'What it shows'"
    )
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the markdown from an existing --output JSON and exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    output = Path(args.output)
    note = Path(args.note).read_text().strip() if args.note else None
    if args.markdown_only:
        if not output.is_file():
            raise ValueError(f"{output} does not exist; run the ablation first (without --markdown-only).")
        report = json.loads(output.read_text())
        if note:
            report["interpretation"] = note
            atomic_write_json(report, output)
        write_markdown(report, output.with_suffix(".md"))
        return 0
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    setup = CASES[args.case]
    data_dir = Path(args.data_dir)
    train_files, test_files = _case_files(data_dir, setup["train"]), _case_files(data_dir, setup["test"])

    stats = None
    if setup["scheme"] == "ct":
        raw = LoadImaged(keys=["image", "label"], reader="NrrdReader")(train_files)
        stats = _ct_stats(torch.as_tensor(raw["image"]), torch.as_tensor(raw["label"]))
    train_item = _deterministic(setup, stats, ("image", "label"))(train_files)
    eval_transform = _deterministic(setup, stats, ("image",))
    test_item = eval_transform(test_files)
    train_eval_item = None if args.no_train_eval else eval_transform(train_files)
    logger.info(
        "train %s %s (lesion %d voxels), test %s %s", setup["train"], tuple(train_item["image"].shape[1:]),
        int((train_item["label"] > 0).sum()), setup["test"], tuple(test_item["image"].shape[1:]),
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    cli_args = argv if argv is not None else sys.argv[1:]
    command = "python -m scripts.ablation_loss " + " ".join(shlex.quote(a) for a in cli_args)
    report = {
        "config": {
            "case": args.case,
            "train_case": setup["train"],
            "test_case": setup["test"],
            "pixdim": list(setup["pixdim"]),
            "scheme": setup["scheme"], "ct_stats": stats, "steps": args.steps, "seeds": args.seeds,
            "settings": {s: SETTINGS[s] for s in args.settings}, "lr": args.lr, "patch": list(PATCH),
            "features": list(FEATURES), "strides": [list(s) for s in STRIDES], "kernels": [list(k) for k in KERNELS],
            "num_regions": list(NUM_REGIONS), "threads": args.threads,
        },
        "command": command,
        "runs": [],
    }
    if note:
        report["interpretation"] = note
    for seed in args.seeds:  # seed-major round robin
        for setting in args.settings:
            result = train_and_evaluate(
                setting, seed, args.steps, train_item, test_item, eval_transform, lr=args.lr,
                train_eval_item=train_eval_item, train_eval_transform=eval_transform,
            )
            logger.info("setting %s seed %d: %s", setting, seed, result["test"])
            report["runs"].append(result)
            report["summary"] = summarise(report["runs"], args.settings)
            report["paired"] = paired_differences(report["runs"], args.settings)
            report["wall_s"] = round(time.perf_counter() - wall, 1)
            report["machine"] = _machine()
            atomic_write_json(report, output)
    write_markdown(report, output.with_suffix(".md"))
    for key, entry in report["summary"].items():
        logger.info(
            "%s %-55s Dice %s recall %s precision %s", key, entry["name"], _fmt(entry.get("test_dice")),
            _fmt(entry.get("test_recall")), _fmt(entry.get("test_precision")),
        )
    logger.info("total wall time %.1f min", report["wall_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
