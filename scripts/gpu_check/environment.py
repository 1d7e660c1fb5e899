# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The environment section: GPUs, driver, torch / CUDA / cuDNN, whether mamba-ssm's kernels import, and the
selective-scan backend and Mamba path the bundle would pick here."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
from typing import Any

import torch

from scripts.gpu_check.errors import error_text
from scripts.networks.mamba import fused_mamba_available
from scripts.networks.selective_scan import ENV_VAR, resolve_backend

__all__ = ["KERNEL_MODULES", "describe_environment", "driver_version", "import_status"]

KERNEL_MODULES = ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d")
"""The optional CUDA extensions whose import is recorded (mamba-ssm's scan and fused ops; causal-conv1d)."""


def import_status(module: str) -> str:
    """``"ok"`` when ``module`` imports, else the exception's type and first line."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure (ImportError, OSError for an ABI mismatch, ...) is the answer
        return error_text(e)
    return "ok"


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, else the CUDA driver API version torch reports, else ``None``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            lines = out.stdout.strip().splitlines()
            if out.returncode == 0 and lines:
                return lines[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if torch.cuda.is_available() and get is not None:
        version = int(get())
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10} (torch; nvidia-smi not available)"
    return None


def _bf16_supported(device: torch.device) -> bool | None:
    """Whether bfloat16 runs natively on ``device`` (on CPU: oneDNN's bf16 kernels, AVX512-BF16 / AMX)."""
    try:
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def describe_environment(device: torch.device) -> dict[str, Any]:
    """Versions, GPUs and kernel availability, JSON-serialisable.

    Returns:
        ``python``, ``torch``, ``torch_cuda``, ``cudnn``, ``monai``, ``gpu_count``, ``gpus`` (name, memory in GiB,
        compute capability), ``driver``, ``imports`` (module -> ``"ok"`` or the error), ``scan_backend`` (what
        ``resolve_backend(None, device)`` picks), ``fused_mamba_available``, ``bf16_native`` and
        ``MAMBACLINIX_SCAN_BACKEND``.
    """
    import monai

    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    try:
        backend = resolve_backend(None, device)
    except ValueError as e:  # e.g. MAMBACLINIX_SCAN_BACKEND=cuda on a machine without the kernel
        backend = f"error: {e}"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "monai": monai.__version__,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "driver": driver_version(),
        "imports": {module: import_status(module) for module in KERNEL_MODULES},
        "scan_backend": backend,
        "fused_mamba_available": fused_mamba_available(),
        "bf16_native": _bf16_supported(device),
        ENV_VAR: os.environ.get(ENV_VAR),
    }
