# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Mamba (S6) token mixer, state-dict compatible with ``mamba_ssm.modules.mamba_simple.Mamba``.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", https://arxiv.org/abs/2312.00752.
Parameter names, shapes and initialisation follow mamba-ssm so that weights move both ways. On CUDA, when
``causal_conv1d`` and mamba-ssm's ``mamba_inner_fn`` import, the fused kernel is used (``use_fast_path``);
everywhere else a pure PyTorch path runs with :func:`scripts.networks.selective_scan.selective_scan`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .initialization import init_dt_projection_, resolve_dt_rank, ssm_state_parameters
from .selective_scan import mamba_ssm_op, on_kernel_device, selective_scan

__all__ = ["Mamba", "fused_mamba_available"]

logger = logging.getLogger(__name__)

_LOGGED_PATHS: set[str] = set()
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes mamba-ssm's kernels take
_FUSED_CONV_WIDTHS = (2, 4)  # the kernel widths causal-conv1d supports


def _fused_mamba_inner_fn() -> Callable | None:
    """mamba-ssm's fused ``mamba_inner_fn`` when it and ``causal_conv1d`` (which it calls) import, else ``None``."""
    return mamba_ssm_op("mamba_inner_fn", requires=("causal_conv1d",))


def fused_mamba_available() -> bool:
    """Whether the fused CUDA path (causal-conv1d + mamba-ssm) can be used on this machine."""
    return torch.cuda.is_available() and _fused_mamba_inner_fn() is not None


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in float64 when it is float64: the scan parameters are kept in at least single
    precision (mamba-ssm casts them with ``.float()``, which would round a float64 model's parameters)."""
    return t if t.dtype == torch.float64 else t.float()


def _log_path_once(path: str) -> None:
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info("Mamba forward uses the %s path.", path)


class Mamba(nn.Module):
    """Selective state-space block mapping (batch, length, d_model) to (batch, length, d_model).

    Args:
        d_model: token features.
        d_state: state size ``N`` per channel.
        d_conv: kernel size of the causal depthwise convolution.
        expand: inner width ``d_inner = expand * d_model``.
        dt_rank: rank of the time-step projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min: smallest initial time step.
        dt_max: largest initial time step.
        dt_init: ``"random"`` (uniform) or ``"constant"`` initialisation of ``dt_proj.weight``.
        dt_scale: scale of the ``dt_proj.weight`` initialisation.
        dt_init_floor: lower clamp of the initial time steps.
        conv_bias: bias of the depthwise convolution.
        bias: bias of the input and output projections.
        use_fast_path: use the fused CUDA kernel when available (CUDA tensors in float32, float16 or bfloat16, and
            ``d_conv`` from 2 to 4, as causal-conv1d requires; otherwise the pure path runs).
        layer_idx: layer index (kept for mamba-ssm compatibility; inference caches are not supported).
        device: device of the parameters.
        dtype: dtype of the parameters.
        scan_backend: backend of the pure path's selective scan (``None``: automatic).

    Raises:
        ValueError: for non-positive sizes or an unknown ``dt_init``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1,
            bias=conv_bias, **factory_kwargs,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        init_dt_projection_(self.dt_proj.weight, self.dt_proj.bias, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.A_log, self.D = ssm_state_parameters(self.d_inner, d_state, device)

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def _fused_path_fits(self, xz: torch.Tensor) -> bool:
        """Whether ``mamba_inner_fn`` can take this call: kernel-device tensors, a dtype its kernels accept
        (float32, float16, bfloat16; float64 runs the pure path) and a convolution width causal-conv1d supports
        (2 to 4)."""
        return (
            self.use_fast_path
            and on_kernel_device(xz.device)
            and xz.dtype in _FUSED_DTYPES
            and _FUSED_CONV_WIDTHS[0] <= self.d_conv <= _FUSED_CONV_WIDTHS[1]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of ``hidden_states`` (batch, length, d_model)."""
        if not torch.jit.is_tracing() and (hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model):
            raise ValueError(f"Mamba expects (batch, length, {self.d_model}), got {tuple(hidden_states.shape)}.")
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, length)
        A = -torch.exp(_at_least_float32(self.A_log))
        fused = _fused_mamba_inner_fn() if self._fused_path_fits(xz) else None
        if fused is not None and not torch.jit.is_tracing():
            _log_path_once("fused CUDA")
            return fused(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, _at_least_float32(self.D),
                delta_bias=_at_least_float32(self.dt_proj.bias), delta_softplus=True,
            )
        _log_path_once("pure PyTorch")
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :length])  # causal: keep the first `length` outputs
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, length, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias goes into the scan as delta_bias
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), _at_least_float32(self.D), z=z,
            delta_bias=_at_least_float32(self.dt_proj.bias), delta_softplus=True, backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))
