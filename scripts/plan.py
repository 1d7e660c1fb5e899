# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Command line: fingerprint a dataset and write the MambaClinix experiment plan (``configs/plan.yaml``).

Example::

    python -m scripts.plan --datalist data/datalist.json --dataset_dir data --output configs/plan.yaml --gpu_memory_gb 24
    python -m scripts.plan --datalist data/datalist.json --dataset_dir data --output configs/plan.yaml --cpu --max_features 64

The YAML holds the top-level keys of :class:`scripts.planning.Plan` that override ``configs/train.yaml`` and
``configs/inference.yaml``, plus ``plan_info`` (fingerprint summary and the reasons behind every choice, read by no
config), e.g. ``python -m monai.bundle run --config_file "['configs/train.yaml','configs/plan.yaml']"``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import yaml

from scripts.io_utils import atomic_write_text
from scripts.planning import DEFAULT_GPU_MEMORY_GB, Plan, extract_fingerprint, plan_experiment

__all__ = ["main", "write_plan"]

logger = logging.getLogger("scripts.plan")


class _PlanDumper(yaml.SafeDumper):
    """Short lists of numbers in flow style (``[1, 2, 2]``), lists of sentences in block style."""

    def represent_list(self, data):  # noqa: D102
        flow = all(isinstance(v, (int, float, type(None))) or (isinstance(v, str) and len(v) < 40) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PlanDumper.add_representer(list, _PlanDumper.represent_list)


def write_plan(plan: Plan, output: str | os.PathLike, writer: str = "python -m scripts.plan") -> None:
    """Write ``plan.to_config()`` as YAML atomically (a temporary file in the same folder, then ``os.replace``).

    Args:
        plan: the plan, e.g. from :func:`scripts.planning.plan_experiment`.
        output: YAML path; its folder is created if needed.
        writer: the command named in the file's header comment.
    """
    header = (f"# Written by `{writer}`: overrides the top-level keys of configs/train.yaml and "
              "configs/inference.yaml.\n")
    atomic_write_text(header + yaml.dump(plan.to_config(), Dumper=_PlanDumper, sort_keys=False, width=120), output)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.plan", description=__doc__.split("\n")[0])
    p.add_argument("--datalist", required=True, help="MSD-style datalist JSON with a 'training' list")
    p.add_argument("--dataset_dir", required=True, help="root of the relative paths in the datalist")
    p.add_argument("--output", default="configs/plan.yaml", help="plan YAML to write")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpu_memory_gb", type=float, default=None, help=f"GPU budget (default {DEFAULT_GPU_MEMORY_GB:g})")
    budget.add_argument("--cpu", action="store_true", help="plan the CPU demo (about 1.5 GB, patch <= 64^3, batch 2)")
    p.add_argument("--modality", default=None, help="CT, MR, ... for all channels, or comma-separated per channel")
    p.add_argument("--max_features", type=int, default=None, help="cap of the channels per stage (e.g. 64 on CPU)")
    p.add_argument("--base_features", type=int, default=32, help="channels of the first stage")
    p.add_argument("--spatial_dims", type=int, default=None, choices=(2, 3),
                   help="the data's dimensionality (default); another value is an error")
    p.add_argument("--max_cases", type=int, default=None, help="fingerprint only this many evenly spaced cases")
    p.add_argument("--target_spacing", type=float, nargs="+", default=None,
                   help="resample to this spacing instead of the median spacing (e.g. 2 2 2 for a CPU demo)")
    p.add_argument("--work_dir", default=None, help="keep DataAnalyzer's datastats.yaml here (default: temporary)")
    p.add_argument("--image_limits", type=_limits, default=None,
                   help="image size limits of the datalist check, e.g. \"{max_voxels: 1000000000}\" (fields of "
                        "scripts.image_guard.ImageLimits; default: its defaults)")
    return p


def _limits(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as {{max_voxels: 1000000000}}, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> Plan:
    """Run the planner; returns the plan that was written.

    Args:
        argv: command line arguments (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    fingerprint = extract_fingerprint(
        args.datalist, args.dataset_dir, modality=args.modality, work_dir=args.work_dir, max_cases=args.max_cases,
        limits=args.image_limits,
    )
    logger.info(
        "fingerprint: %d cases (%d analysed), %d channel(s) %s, median spacing %s, median shape %s, labels %s",
        fingerprint["n_cases"], fingerprint["n_cases_analyzed"], fingerprint["channels"], fingerprint["modalities"], fingerprint["median_spacing"],
        fingerprint["median_shape"], fingerprint["labels"],
    )
    for label, ratio in fingerprint["target_ratio"].items():
        logger.info("label %s: target/image voxel ratio mean %.4g, min %.4g", label, ratio["mean"], ratio["min"])
    plan = plan_experiment(
        fingerprint,
        gpu_memory_gb=args.gpu_memory_gb,
        cpu=args.cpu,
        max_features=args.max_features,
        base_features=args.base_features,
        spatial_dims=args.spatial_dims,
        target_spacing=args.target_spacing,
    )
    for reason in plan.plan_info["reasons"]:
        logger.info("%s", reason)
    logger.info("plan: %s", plan.to_config(include_info=False))
    write_plan(plan, args.output)
    logger.info("wrote %s", args.output)
    return plan


if __name__ == "__main__":
    from scripts.cli import install_error_handler

    install_error_handler((ValueError, FileNotFoundError))  # the planner raises these for bad data only
    main()
