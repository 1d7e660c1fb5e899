# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The distributed section: a 2-process ``torchrun`` of the bundle's training with ``configs/multi_gpu_train.yaml``
(NCCL on GPUs, gloo on CPU processes) on a tiny synthetic dataset, one epoch of two iterations and a validation.

The data: three BraTS-like cases of 48^3 voxels (:func:`scripts.demo.data.make_brats_like`: 4 channels, classes 0-3),
two for training and one for validation (so that one rank validates a stand-in, the path
:class:`scripts.handlers.ValidationShardSampler` takes when there are fewer cases than ranks). The run passes when
``torchrun`` exits with 0 and rank 0 wrote ``checkpoint_latest.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scripts.gpu_check.errors import SectionSkipped
from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = [
    "BUNDLE_ROOT", "MIN_SECONDS", "distributed_command", "make_dataset", "run_distributed", "run_distributed_training",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
"""The bundle root: the working directory of the run (``--bundle_root .``)."""

MIN_SECONDS = 90.0
"""The least time the run is started with (two processes start, cache the data, train, validate and save)."""

_CHANNELS = 4
_TAIL_LINES = 25


def make_dataset(folder: Path) -> Path:
    """Three 48^3 BraTS-like cases in ``folder``, two for training and one for validation; returns the datalist."""
    from scripts.demo.data import make_brats_like

    datalist = make_brats_like(folder, n_cases=3, shape=(48, 48, 48))
    with open(datalist) as f:
        data = json.load(f)
    data["validation"] = data["training"][2:]
    data["training"] = data["training"][:2]
    return atomic_write_json(data, datalist)


def distributed_command(workdir: Path, datalist: Path, nproc: int = 2) -> list[str]:
    """The ``torchrun`` command line: the bundle's training with the multi-process override, the tiny dataset,
    one epoch of two iterations, checkpoints and logs under ``workdir``."""
    overrides: dict[str, Any] = {
        "dataset_dir": str(datalist.parent), "datalist": str(datalist), "ckpt_dir": str(workdir / "models"),
        "output_dir": str(workdir / "runs"), "in_channels": _CHANNELS, "out_channels": 4,
        "intensity_schemes": ["zscore"] * _CHANNELS, "intensity_stats": [None] * _CHANNELS,
        "pixdim": [1.0, 1.0, 1.0], "patch_size": [32, 32, 32], "num_regions": [8, 8, 8], "batch_size": 2,
        "epochs": 1, "iterations_per_epoch": 2, "val_interval": 1, "num_workers": 0,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
        "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--bundle_root", ".",
    ]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]  # Python literals, as fire reads them
    return command


def run_distributed_training(workdir: Path, timeout_s: float, nproc: int = 2, log: Path | None = None
                             ) -> dict[str, Any]:
    """Make the dataset in ``workdir`` and run :func:`distributed_command` (its process group killed at
    ``timeout_s``); the full output goes to ``log`` when given.

    Returns:
        ``command``, ``nproc``, ``rc`` (``None`` after a timeout), ``elapsed_s``, ``checkpoint`` (rank 0 wrote
        ``checkpoint_latest.pt``), ``tail`` (the last lines of the output) and ``passed``.
    """
    datalist = make_dataset(workdir / "data")
    command = distributed_command(workdir, datalist, nproc)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session this call started
        output, _ = proc.communicate()
        rc = None
        output += f"\n[gpu_check] killed after the timeout of {timeout_s:.0f} s\n"
    if log is not None:
        atomic_write_text(output, log)
    checkpoint = (workdir / "models" / "checkpoint_latest.pt").is_file()
    return {
        "command": " ".join(command), "nproc": nproc, "rc": rc, "elapsed_s": time.perf_counter() - start,
        "checkpoint": checkpoint, "tail": output.strip().splitlines()[-_TAIL_LINES:], "passed": rc == 0 and checkpoint,
    }


def run_distributed(device: torch.device, timeout_s: float, log: Path | None = None) -> dict[str, Any]:
    """The section: :func:`run_distributed_training` with 2 NCCL processes when ``device`` is CUDA with 2 GPUs.

    Args:
        device: the run's device.
        timeout_s: the time left; below :data:`MIN_SECONDS` the run is not started.
        log: where the full output goes.

    Raises:
        SectionSkipped: not on CUDA, fewer than 2 GPUs, too little time, or killed at ``timeout_s`` (inconclusive;
            the output is in ``log``).
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type != "cuda" or gpus < 2:
        raise SectionSkipped(f"{gpus} GPU(s) on device {device}; the 2-process NCCL run needs 2 GPUs")
    if timeout_s < MIN_SECONDS:
        raise SectionSkipped(f"{timeout_s:.0f} s of the time budget left, the run needs about {MIN_SECONDS:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gpu_check_nccl_") as tmp:
        result = run_distributed_training(Path(tmp), timeout_s, 2, log)
    if result["rc"] is None:
        raise SectionSkipped(f"killed at the end of the time budget after {result['elapsed_s']:.0f} s; output in {log}")
    return result
