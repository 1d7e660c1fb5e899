# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Weight initialisation of the networks: nnU-Net's He initialisation, and the selective state-space parameters
(time-step projection, ``A``, ``D``) that every Mamba layer of the bundle (:class:`scripts.networks.mamba.Mamba`,
:class:`scripts.networks.mamba_hunet.SS2D`) initialises as mamba-ssm does.

He et al., "Delving Deep into Rectifiers", https://arxiv.org/abs/1502.01852. nnU-Net (and the MambaClinix authors'
network, built from its plans) applies ``InitWeights_He(1e-2)`` to the whole network after construction.
Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", https://arxiv.org/abs/2312.00752.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["HE_INIT_MODULES", "he_init_", "resolve_dt_rank", "init_dt_projection_", "ssm_state_parameters"]

HE_INIT_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""The module types :func:`he_init_` re-initialises (subclasses included). ``nn.Conv1d`` is not among them, as in
nnU-Net: a Mamba layer's causal ``conv1d`` keeps PyTorch's default initialisation, and so do linear layers, norms,
layer scales and the Mamba parameters (``A_log``, ``D``, ``dt_proj``)."""


def he_init_(module: nn.Module, neg_slope: float = 1e-2) -> nn.Module:
    """Re-initialise every 2D/3D (transposed) convolution in ``module`` as nnU-Net's ``InitWeights_He`` does.

    Each weight is drawn from ``kaiming_normal_(a=neg_slope)`` (fan-in mode, leaky-ReLU gain
    ``sqrt(2 / (1 + neg_slope^2))``, i.e. standard deviation ``gain / sqrt(fan_in)``) and each bias is set to
    zero. All other parameters are left as they are (see :data:`HE_INIT_MODULES`).

    Args:
        module: the network (or any module); changed in place.
        neg_slope: negative slope ``a`` of the leaky ReLU the gain is computed for.

    Returns:
        ``module``, for chaining.
    """
    for m in module.modules():
        if isinstance(m, HE_INIT_MODULES):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """The rank of a Mamba time-step projection: ``"auto"`` is ``ceil(d_model / 16)`` (mamba-ssm's rule).

    Raises:
        ValueError: when ``dt_rank`` is neither ``"auto"`` nor a positive integer.
    """
    rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
    if rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {dt_rank!r}.")
    return rank


def init_dt_projection_(
    weight: torch.Tensor,
    bias: torch.Tensor,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    dt_init: str = "random",
    dt_scale: float = 1.0,
    dt_init_floor: float = 1e-4,
) -> None:
    """Initialise a time-step projection in place, as mamba-ssm does.

    ``weight`` (``(..., d_inner, dt_rank)``) is drawn from ``U(-std, std)`` (``dt_init="random"``) or set to
    ``std`` (``"constant"``), with ``std = dt_scale / sqrt(dt_rank)``; then ``bias`` (``(..., d_inner)``) is set to
    ``softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` and at least ``dt_init_floor``, so the
    initial time steps ``softplus(bias)`` are those ``dt``. The weight is drawn first, then the bias, from
    PyTorch's global generator. ``bias`` is tagged ``_no_reinit`` (mamba-ssm's mark for a parameter an outer
    initialisation must keep).

    Raises:
        ValueError: for ``dt_init`` other than ``"random"`` / ``"constant"`` or not ``0 < dt_min <= dt_max``.
    """
    if dt_init not in ("random", "constant"):
        raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}.")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}.")
    std = weight.shape[-1] ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            weight.fill_(std)
        else:
            weight.uniform_(-std, std)
        log_dt = torch.rand(bias.shape, device=bias.device, dtype=bias.dtype) * (math.log(dt_max) - math.log(dt_min))
        dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    bias._no_reinit = True  # type: ignore[attr-defined]


def ssm_state_parameters(
    channels: int, d_state: int, device: torch.device | str | None = None
) -> tuple[nn.Parameter, nn.Parameter]:
    """The state matrix and skip parameters of ``channels`` selective scans: S4D-real ``A = -(1, ..., d_state)``
    per channel, stored as ``A_log = log(-A)`` (``(channels, d_state)``), and ``D = 1`` (``(channels,)``), both
    float32 and tagged ``_no_weight_decay`` (:func:`scripts.optim.param_groups` gives them none)."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(channels, 1)
    a_log = nn.Parameter(torch.log(a))
    d = nn.Parameter(torch.ones(channels, device=device))
    for p in (a_log, d):
        p._no_weight_decay = True  # type: ignore[attr-defined]
    return a_log, d
