# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The description of the machine a benchmark or an experiment ran on, recorded beside its results."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from scripts.runtime import load_average, openmp_wait_policy

__all__ = ["CPU_FLAGS_OF_INTEREST", "describe_machine", "summarize_machine"]

CPU_FLAGS_OF_INTEREST = ("avx512_bf16", "amx", "avx512f", "avx2")
"""Prefixes of the ``/proc/cpuinfo`` flags recorded: the vector and matrix units PyTorch's CPU kernels use."""


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and the flags of interest from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    cpu, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("unknown", "", platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = [fl for fl in line.split(":", 1)[1].split() if fl.startswith(CPU_FLAGS_OF_INTEREST)]
                    break
    except OSError:
        pass
    return cpu, sorted(flags)


def describe_machine(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Describe this machine and software for a results file.

    Args:
        device: the device the run uses (``"cpu"``, ``"cuda"``, ``"cuda:N"``); on CUDA the GPU name and whether
            mamba-ssm's CUDA selective scan is available are added.
        threads: the ``torch.set_num_threads`` setting of the run (default: the current one).

    Returns:
        A JSON-serialisable dict with ``cpu`` (model name), ``cpu_flags`` (the flags of
        :data:`CPU_FLAGS_OF_INTEREST` the CPU has), ``arch`` (``platform.machine()``), ``cores``
        (``os.cpu_count()``), ``threads``, ``device``, ``torch``, ``monai`` and ``python`` versions, ``date``
        (local ISO time), ``load_average`` (1, 5 and 15 minutes at the call, empty where unavailable),
        ``openmp_wait_policy`` (:func:`scripts.runtime.openmp_wait_policy` of this process's environment) and, on
        CUDA, ``gpu`` and ``mamba_ssm_cuda_scan``.
    """
    import monai

    cpu, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": load_average(),
        "openmp_wait_policy": openmp_wait_policy(),
    }
    if torch.device(device).type == "cuda":
        from scripts.networks.selective_scan import cuda_scan_available

        info["gpu"] = torch.cuda.get_device_name(device)
        info["mamba_ssm_cuda_scan"] = cuda_scan_available()
    return info


def summarize_machine(info: dict[str, Any]) -> str:
    """One line for a report from a :func:`describe_machine` dict: CPU, cores, threads (and how OpenMP threads
    wait, where recorded), device (GPU) and flags.

    A key missing from ``info`` reads ``?`` (or ``n/a`` for the flags).
    """
    text = f"{info.get('cpu', 'unknown CPU')}, {info.get('cores', '?')} cores, torch threads {info.get('threads', '?')}"
    if "openmp_wait_policy" in info:
        text += f" (OMP_WAIT_POLICY {info['openmp_wait_policy']})"
    text += f", device {info.get('device', 'cpu')}" + (f" ({info['gpu']})" if "gpu" in info else "")
    return text + f"; CPU flags: {' '.join(info.get('cpu_flags', [])) or 'n/a'}"
