# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends.

The semantics are those of ``selective_scan_ref`` in mamba-ssm (Gu & Dao, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", https://arxiv.org/abs/2312.00752)::

    delta = softplus(delta + delta_bias)          # when delta_softplus (delta_bias optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D * u_t
    y     = y * silu(z)                           # when z is given

Backends:

- ``"cuda"``: mamba-ssm's fused kernel ``selective_scan_fn`` (optional CUDA extra; only for CUDA tensors).
- ``"chunked"``: pure PyTorch, the default wherever the CUDA kernel is not usable. The sequence is split into
  ``K`` chunks of ``T`` steps (``T = ceil(sqrt(L))`` unless ``chunk_size`` is given). (1) the recurrence runs from a
  zero state inside all chunks at once (``T`` steps of one ``addcmul`` each); (2) a scan of ``K`` steps carries the
  states across chunk boundaries with the chunk decay ``exp(A * sum(delta))``; (3) the true states are the local
  ones plus the chunk's initial state decayed by ``exp(A * cumsum(delta))``, for all steps at once, and so is
  ``y``. Every exponent is ``delta * A`` times a within-chunk sum of ``delta``, so it is ``<= 0`` whenever
  ``A <= 0`` and ``delta >= 0`` (the Mamba case): there is no ``exp(-cumsum)`` that overflows for strong decay.
  Only the two recurrences loop, so a call costs about ``2 * sqrt(L)`` small operations plus a few large ones,
  which keeps it fast on a machine whose cores are shared. A custom autograd function keeps only the
  chunk-boundary states and recomputes the rest in its analytic backward (adjoint recurrence, same scheme in
  reverse), processing the chunks in groups so that the per-step tensors stay within
  :data:`BACKWARD_STATE_BUDGET` elements each.
- ``"naive"``: a per-step Python loop under autograd (benchmark baseline and fallback).

The choice is the ``backend`` argument, else the environment variable ``MAMBACLINIX_SCAN_BACKEND``, else
``"auto"`` (``"cuda"`` for CUDA tensors when mamba-ssm imports, ``"chunked"`` otherwise).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "BACKWARD_STATE_BUDGET",
    "DEFAULT_CHUNK_SIZE",
    "ENV_VAR",
    "KERNEL_DEVICE_TYPES",
    "SCAN_BACKENDS",
    "auto_chunk_size",
    "cuda_scan_available",
    "mamba_ssm_op",
    "on_kernel_device",
    "resolve_backend",
    "selective_scan",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MAMBACLINIX_SCAN_BACKEND"
"""Environment variable that overrides the automatic backend choice."""

SCAN_BACKENDS = ("auto", "cuda", "chunked", "naive")
"""Accepted backend names (``None`` means ``"auto"`` unless :data:`ENV_VAR` is set)."""

DEFAULT_CHUNK_SIZE: int | None = None
"""Steps per chunk of the ``"chunked"`` backend; ``None`` chooses :func:`auto_chunk_size` of the sequence length."""

BACKWARD_STATE_BUDGET = 1 << 22
"""Most elements of one per-step tensor (steps x states) the ``"chunked"`` scan builds at once, forward and backward
(4M float32 = 16 MiB; a group of chunks holds a few such tensors)."""

KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
"""Device types whose tensors go to mamba-ssm's and causal-conv1d's fused ops. The compiled kernels take CUDA tensors
only; ``tests/cuda_reference.py`` adds ``"cpu"`` while it substitutes the packages' reference functions for them."""

_LOGGED_BACKENDS: set[str] = set()


def on_kernel_device(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` may be handed to the fused ops (:data:`KERNEL_DEVICE_TYPES`)."""
    return torch.device(device).type in KERNEL_DEVICE_TYPES


@functools.lru_cache(maxsize=None)
def mamba_ssm_op(name: str, requires: tuple[str, ...] = ()) -> Callable | None:
    """A fused op of mamba-ssm, ``mamba_ssm.ops.selective_scan_interface.<name>`` (e.g. ``selective_scan_fn``,
    ``mamba_inner_fn``), or ``None`` when it or one of the modules ``requires`` cannot be imported (CPU builds,
    ABI mismatch, an op's missing companion such as ``causal_conv1d``). Imported on first use, then cached."""
    try:
        for module in requires:
            importlib.import_module(module)
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except (ImportError, OSError, RuntimeError):
        return None
    return getattr(interface, name, None)


def _mamba_selective_scan_fn() -> Callable | None:
    """mamba-ssm's CUDA ``selective_scan_fn``, or ``None`` (:func:`mamba_ssm_op`)."""
    return mamba_ssm_op("selective_scan_fn")


def cuda_scan_available() -> bool:
    """Whether mamba-ssm's fused CUDA selective scan imports and a CUDA device is present."""
    return torch.cuda.is_available() and _mamba_selective_scan_fn() is not None


def resolve_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """Resolve a backend request to ``"cuda"``, ``"chunked"`` or ``"naive"``.

    Args:
        backend: one of :data:`SCAN_BACKENDS` or ``None`` (then :data:`ENV_VAR`, else ``"auto"``).
        device: device of the tensors to scan; the ``"cuda"`` backend needs a CUDA device.

    Raises:
        ValueError: for an unknown name, or ``"cuda"`` requested where the CUDA kernel cannot run.
    """
    source = "argument"
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = f"environment variable {ENV_VAR}"
    name = backend.lower() if isinstance(backend, str) else backend
    if name not in SCAN_BACKENDS:
        raise ValueError(f"Unknown selective-scan backend {backend!r} (from the {source}); use one of {SCAN_BACKENDS}.")
    on_cuda = on_kernel_device(device)
    if name == "auto":
        name = "cuda" if on_cuda and _mamba_selective_scan_fn() is not None else "chunked"
    elif name == "cuda" and not (on_cuda and _mamba_selective_scan_fn() is not None):
        raise ValueError(
            "Selective-scan backend 'cuda' needs CUDA tensors and an importable mamba-ssm "
            f"(tensors on {device}, mamba-ssm importable: {_mamba_selective_scan_fn() is not None}); "
            "use 'chunked' or 'auto' instead."
        )
    if name not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add(name)
        logger.info("Selective scan uses the %r backend.", name)
    return name


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` with a hint when shapes or dtypes do not follow the selective-scan contract."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            kind = f"{type(t).__name__} {getattr(t, 'dtype', '')}"
            raise ValueError(f"{name} must be a real floating-point tensor, got {kind}.")
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}.")
    b, d, length = u.shape
    if length < 1 or d < 1 or b < 1:
        raise ValueError(f"u must have non-empty batch, channel and length dimensions, got shape {tuple(u.shape)}.")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}.")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (channels={d}, d_state), got shape {tuple(A.shape)}.")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            expected = (b, n, length)
        elif t.dim() == 4:
            expected = (b, t.shape[1], n, length)
            if t.shape[1] < 1 or d % t.shape[1] != 0:
                raise ValueError(f"{name} has {t.shape[1]} groups; the channel count {d} must be a multiple of it.")
        else:
            raise ValueError(
                f"{name} must be (batch, d_state, length) or (batch, groups, d_state, length), got {tuple(t.shape)}."
            )
        if tuple(t.shape) != expected:
            got = tuple(t.shape)
            raise ValueError(f"{name} must have shape {expected} = (batch, [groups,] d_state, length), got {got}.")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}.")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name} must be a vector of the {d} channels, got shape {tuple(t.shape)}.")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}.")


# ---------------------------------------------------------------------------------------------------------------
# "chunked" backend. Layouts: per-step tensors (T, K, b, g, m) with T steps per chunk and K chunks; states
# (K, b, g, n, dg) where the d channels are split into g groups of dg (channels innermost, so that every
# elementwise op runs over long contiguous rows); B and C per step (T, K, b, g, n, 1); A as (g, n, dg).
# Only the recurrences themselves loop (one addcmul per step within the chunks, one per chunk across them); the
# rest is done for all steps of a group of chunks at once, with decays exp(A * cumulative delta) whose exponents
# are <= 0.
# ---------------------------------------------------------------------------------------------------------------


def _steps_view(x: torch.Tensor, num_chunks: int, chunk: int) -> torch.Tensor:
    """View (b, g, m, K*T) as (T, K, b, g, m) without copying."""
    b, g, m, _ = x.shape
    return x.reshape(b, g, m, num_chunks, chunk).permute(4, 3, 0, 1, 2)


def _split_chunks(x: torch.Tensor, num_chunks: int, chunk: int) -> torch.Tensor:
    """(b, g, m, L) -> (T, K, b, g, m) zero-padded to K*T steps, contiguous so that each step is one slice."""
    pad = num_chunks * chunk - x.shape[-1]
    if pad:  # delta = 0 on the padding: no decay, no input, the state passes through unchanged
        x = F.pad(x, (0, pad))
    return _steps_view(x, num_chunks, chunk).contiguous()


def auto_chunk_size(length: int) -> int:
    """Steps per chunk when none is given: ``ceil(sqrt(length))``, which makes the sequential steps (``T`` within
    the chunks plus ``K = length / T`` across them) fewest."""
    return max(1, math.isqrt(max(0, length - 1)) + 1)


def _chunk_geometry(length: int, chunk_size: int | None) -> tuple[int, int]:
    """Steps per chunk and number of chunks for a sequence of ``length``."""
    chunk = auto_chunk_size(length) if chunk_size is None else max(1, min(int(chunk_size), length))
    return chunk, -(-length // chunk)


def _chunk_groups(num_chunks: int, chunk: int, state_numel: int) -> list[tuple[int, int]]:
    """Consecutive ranges of chunks whose per-step states stay within :data:`BACKWARD_STATE_BUDGET` elements."""
    per_group = max(1, BACKWARD_STATE_BUDGET // max(1, chunk * state_numel))
    return [(k0, min(num_chunks, k0 + per_group)) for k0 in range(0, num_chunks, per_group)]


def _step_views(x: torch.Tensor) -> tuple[torch.Tensor, ...] | list[torch.Tensor]:
    """The slices ``x[0], x[1], ...`` as views that the loops update in place: taken at once with ``unbind`` (one op)
    where autograd is off (inside the custom autograd function, inference), one ``select`` each where it is on or
    while tracing (a trace must replay under either), because autograd forbids in-place updates of ``unbind``'s
    outputs."""
    if torch.is_grad_enabled() or torch.jit.is_tracing():
        return [x[t] for t in range(x.shape[0])]
    return x.unbind(0)


def _local_states(dc: torch.Tensor, duc: torch.Tensor, bc: torch.Tensor, a3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-step decays ``exp(delta_t A)`` and the states of each chunk started from zero, all (T, K, b, g, n, dg)."""
    decay_t = torch.exp(dc.unsqueeze(-2) * a3)
    states = duc.unsqueeze(-2) * bc
    steps, decays = _step_views(states), _step_views(decay_t)
    for t in range(1, len(steps)):
        steps[t].addcmul_(decays[t], steps[t - 1])
    return decay_t, states


def _chunked_forward(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked scan without D, z or bias.

    Returns:
        y (b, d, l), the chunks' initial states and the chunks' decays, both (K, b, g, n, dg).
    """
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    chunk, num_chunks = _chunk_geometry(length, chunk_size)
    a3 = A.reshape(g, dg, n).transpose(1, 2).contiguous()
    u4, delta4 = u.reshape(b, g, dg, length), delta.reshape(b, g, dg, length)
    h0 = u.new_empty((num_chunks, b, g, n, dg))
    decay = u.new_empty(h0.shape)
    y = u.new_empty((b, g, dg, num_chunks * chunk))
    y_steps = _steps_view(y, num_chunks, chunk)
    carry = u.new_zeros(h0.shape[1:])
    for k0, k1 in _chunk_groups(num_chunks, chunk, carry.numel()):
        steps = lambda x: _split_chunks(x[..., k0 * chunk : k1 * chunk], k1 - k0, chunk)  # noqa: E731
        dc, uc, bc, cc = steps(delta4), steps(u4), steps(B).unsqueeze(-1), steps(C).unsqueeze(-1)
        states = _local_states(dc, dc * uc, bc, a3)[1]
        from_start = torch.exp(torch.cumsum(dc, 0).unsqueeze(-2) * a3)  # decay from the chunk's start to step t
        decay[k0:k1] = from_start[-1]
        starts = [carry]  # (2) carry the states across the chunk boundaries
        ends, chunk_decays = _step_views(states[-1]), _step_views(from_start[-1])
        for k in range(k1 - k0):
            starts.append(torch.addcmul(ends[k], chunk_decays[k], starts[-1]))
        carry = starts.pop()
        h0[k0:k1] = group_h0 = torch.stack(starts)
        states.addcmul_(from_start, group_h0)  # (3) the true states: local part + decayed initial state
        y_steps[:, k0:k1] = (states * cc).sum(-2)
    return y[..., :length].reshape(b, d, length), h0, decay


def _chunked_backward(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the chunked scan through the adjoint recurrence ``gh_t = C_t gy_t + exp(delta_{t+1} A) gh_{t+1}``.

    The chunks are processed in groups (at most :data:`BACKWARD_STATE_BUDGET` stored state elements per group),
    each group with its own small per-step copies of the inputs, so the peak memory stays near the inputs' size.
    """
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    chunk, num_chunks = _chunk_geometry(length, chunk_size)
    a3 = A.reshape(g, dg, n).transpose(1, 2).contiguous()
    u4, delta4, gy4 = u.reshape(b, g, dg, length), delta.reshape(b, g, dg, length), grad_y.reshape(b, g, dg, length)
    groups = _chunk_groups(num_chunks, chunk, h0[0].numel())

    def steps(x: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        return _split_chunks(x[..., k0 * chunk : k1 * chunk], k1 - k0, chunk)

    def local_adjoint(k0: int, k1: int, decay_t: torch.Tensor) -> torch.Tensor:
        """The adjoint states of chunks k0..k1 when nothing arrives at their ends."""
        adjoint = steps(gy4, k0, k1).unsqueeze(-2) * steps(C, k0, k1).unsqueeze(-1)
        adjoints, decays = _step_views(adjoint), _step_views(decay_t)
        for t in range(chunk - 2, -1, -1):
            adjoints[t].addcmul_(decays[t + 1], adjoints[t + 1])
        return adjoint

    # (1) the adjoint leaving each chunk at its start when nothing arrives at its end; (2) carry across chunks
    r0 = u.new_zeros(h0.shape)
    if num_chunks > 1:
        leaving = u.new_empty(h0.shape)
        for k0, k1 in groups:
            decay_t = torch.exp(steps(delta4, k0, k1).unsqueeze(-2) * a3)
            leaving[k0:k1] = decay_t[0] * local_adjoint(k0, k1, decay_t)[0]
        leaving_k, decay_k, r0_k = _step_views(leaving), _step_views(decay), _step_views(r0)
        for k in range(num_chunks - 1, 0, -1):
            torch.addcmul(leaving_k[k], decay_k[k], r0_k[k], out=r0_k[k - 1])
    # (3) per group: the states and the adjoint with the true arrivals, then every gradient at once, written
    # straight into its final layout
    padded = num_chunks * chunk
    grad_u, grad_delta = u.new_empty((b, g, dg, padded)), u.new_empty((b, g, dg, padded))
    grad_b, grad_c = u.new_empty((b, g, n, padded)), u.new_empty((b, g, n, padded))
    gu_steps, gd_steps = _steps_view(grad_u, num_chunks, chunk), _steps_view(grad_delta, num_chunks, chunk)
    gb_steps, gc_steps = _steps_view(grad_b, num_chunks, chunk), _steps_view(grad_c, num_chunks, chunk)
    grad_a = A.new_zeros(a3.shape)
    for k0, k1 in groups:
        uc, dc, gyc = steps(u4, k0, k1), steps(delta4, k0, k1), steps(gy4, k0, k1)
        bc = steps(B, k0, k1).unsqueeze(-1)
        duc = dc * uc
        decay_t, states = _local_states(dc, duc, bc, a3)
        states.addcmul_(torch.exp(torch.cumsum(dc, 0).unsqueeze(-2) * a3), h0[k0:k1])
        gc_steps[:, k0:k1] = (states * gyc.unsqueeze(-2)).sum(-1)
        adjoint = local_adjoint(k0, k1, decay_t)
        after = torch.zeros_like(dc)  # sum of delta after step t within its chunk
        after[:-1] = dc[1:].flip(0).cumsum(0).flip(0)
        adjoint.addcmul_(torch.exp(after.unsqueeze(-2) * a3), r0[k0:k1])
        g_da = adjoint * decay_t  # gradient of delta_t * A: adjoint * decay * previous state
        del decay_t
        g_da[1:] *= states[:-1]
        g_da[0] *= h0[k0:k1]
        del states
        s = (adjoint * bc).sum(-2)  # <adjoint_t, B_t> per channel
        gd_steps[:, k0:k1] = torch.addcmul((g_da * a3).sum(-2), uc, s)
        gu_steps[:, k0:k1] = dc * s
        gb_steps[:, k0:k1] = (adjoint * duc.unsqueeze(-2)).sum(-1)
        grad_a += (g_da * dc.unsqueeze(-2)).sum((0, 1, 2))
    return (
        grad_u[..., :length].reshape(b, d, length),
        grad_delta[..., :length].reshape(b, d, length),
        grad_a.transpose(1, 2).reshape(d, n),
        grad_b[..., :length],
        grad_c[..., :length],
    )


class _ChunkedScan(torch.autograd.Function):
    """Autograd wrapper of the chunked scan that stores only chunk-boundary states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_size):  # type: ignore[override]
        y, h0, decay = _chunked_forward(u, delta, A, B, C, chunk_size)
        ctx.save_for_backward(u, delta, A, B, C, h0, decay)
        ctx.chunk_size = chunk_size
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        u, delta, A, B, C, h0, decay = ctx.saved_tensors
        grads = _chunked_backward(grad_y.contiguous(), u, delta, A, B, C, h0, decay, ctx.chunk_size)
        return (*grads, None)


def _scan_chunked(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """Chunked scan; plain tensor ops when no gradient is needed or while tracing (keeps traces serialisable)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    if torch.jit.is_tracing() or not needs_grad:
        return _chunked_forward(u, delta, A, B, C, chunk_size)[0]
    return _ChunkedScan.apply(u, delta, A, B, C, chunk_size)


def _scan_naive(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Per-step loop under autograd (the baseline): indexes every input at every step."""
    b, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    a3 = A.reshape(g, d // g, n)
    h = u.new_zeros((b, g, d // g, n))
    ys = []
    for t in range(length):
        dt = delta[:, :, t].reshape(b, g, d // g, 1)
        h = torch.exp(dt * a3) * h + dt * u[:, :, t].reshape(b, g, d // g, 1) * B[:, :, :, t].unsqueeze(2)
        ys.append((h * C[:, :, :, t].unsqueeze(2)).sum(-1).reshape(b, d))
    return torch.stack(ys, -1)


def _scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """mamba-ssm's fused kernel on float32 copies (its documented ``selective_scan_fn`` signature)."""
    scan_fn = _mamba_selective_scan_fn()
    if scan_fn is None or not on_kernel_device(u.device):  # guarded by resolve_backend
        raise ValueError("The 'cuda' selective-scan backend needs CUDA tensors and mamba-ssm; use 'chunked'.")

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().contiguous()

    return scan_fn(
        f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), z=f32(z), delta_bias=f32(delta_bias),
        delta_softplus=delta_softplus, return_last_state=False,
    )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Selective scan with mamba-ssm ``selective_scan_ref`` semantics, computed in float32 (autocast disabled).

    Args:
        u: input sequence (batch, d, length).
        delta: time steps (batch, d, length), before ``delta_bias`` and softplus.
        A: state matrix (d, d_state), usually ``-exp(A_log)``.
        B: input projection (batch, d_state, length), or grouped (batch, groups, d_state, length) where channel
            ``c`` uses group ``c // (d // groups)``.
        C: output projection, same layout as ``B``.
        D: skip connection (d,), optional.
        z: gate (batch, d, length), optional; the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` (d,), optional.
        delta_softplus: apply softplus to ``delta`` (after ``delta_bias``).
        backend: ``"auto"``, ``"cuda"``, ``"chunked"`` or ``"naive"``; ``None`` reads ``MAMBACLINIX_SCAN_BACKEND``
            and falls back to ``"auto"``.
        chunk_size: steps per chunk of the ``"chunked"`` backend (default :data:`DEFAULT_CHUNK_SIZE`: ``None``,
            :func:`auto_chunk_size` of the length).

    Returns:
        y (batch, d, length) in the dtype of ``u``. Float64 inputs are computed in float64, everything else in float32.

    Raises:
        ValueError: for ill-shaped inputs, an unknown backend, or ``"cuda"`` where it cannot run.

    Note:
        ``torch.jit.trace`` works (the chunked backend then runs as plain tensor ops), but the trace is
        specialised to the traced sequence length because the loops over chunks unroll.
    """
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    if torch.jit.is_tracing():
        # the Python loops over chunks unroll into the trace: it is specialised to this sequence length, and the
        # shape checks below would only add one TracerWarning each; say it once and skip them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            length = int(u.shape[-1])
            y = _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, chunk_size)
        warnings.warn(
            f"selective_scan traced for sequence length {length}; the trace only fits that length.",
            torch.jit.TracerWarning,
            stacklevel=2,
        )
        return y
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, chunk_size)


def _selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    backend: str | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """:func:`selective_scan` after validation."""
    name = resolve_backend(backend, u.device)
    with torch.autocast(device_type=u.device.type, enabled=False):
        if name == "cuda":
            return _scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        u_, delta_, A_ = u.to(dtype), delta.to(dtype), A.to(dtype)
        B_ = (B if B.dim() == 4 else B.unsqueeze(1)).to(dtype)
        C_ = (C if C.dim() == 4 else C.unsqueeze(1)).to(dtype)
        if delta_bias is not None:
            delta_ = delta_ + delta_bias.to(dtype).unsqueeze(-1)
        if delta_softplus:
            delta_ = F.softplus(delta_)
        if name == "naive":
            y = _scan_naive(u_, delta_, A_, B_, C_)
        else:
            y = _scan_chunked(u_, delta_, A_, B_, C_, DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size))
        if D is not None:
            y = torch.addcmul(y, u_, D.to(dtype).unsqueeze(-1))
        if z is not None:
            y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)
