# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The parity section: the selective-scan backends and the fused Mamba path against a float64 reference.

- Scan cases: :func:`scripts.networks.selective_scan.selective_scan` with each backend available on the device
  (``chunked`` and ``naive`` on CPU, ``chunked`` and ``cuda`` on CUDA when mamba-ssm imports) on seeded random
  inputs with ``D``, ``z``, ``delta_bias`` and softplus, as mamba-ssm's ``test_selective_scan`` draws them. The
  activations (``u``, ``delta``, ``B``, ``C``, ``z``) are in float32, bfloat16 (and float16 on CUDA); ``A``, ``D``
  and ``delta_bias`` stay float32, as the network keeps them. Reference: the chunked backend in float64 on the
  same (rounded) inputs. Compared: ``y`` and the gradients of all eight inputs for a fixed random output gradient.
- Mamba cases: :class:`scripts.networks.mamba.Mamba` through its pure path (the automatic scan backend) and, where
  it imports, its fused path (``mamba_inner_fn``), in float32 and under autocast (bfloat16, and float16 on CUDA),
  against the pure path of the same module in float64 (chunked scan). Compared: the output and the gradients of the
  input and every parameter.

A result passes when every compared tensor is finite and within mamba-ssm's tolerances (its ``test_selective_scan``:
float32 ``rtol 6e-4, atol 2e-3``, float16 ``3e-3, 5e-3``, bfloat16 ``3e-2, 5e-2``): elementwise
``|x - ref| <= atol + rtol |ref|`` for outputs and the gradients of activations, norm-wise
``|x - ref|_2 <= atol sqrt(n) + rtol |ref|_2`` for the gradients of weights, which sum over the batch and the
sequence (under autocast their elements near zero carry the rounding of thousands of low-precision terms and
would fail an elementwise test at any sequence length of a real network).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from scripts.gpu_check.errors import error_text
from scripts.gpu_check.plans import available_variants
from scripts.networks.mamba import Mamba
from scripts.networks.selective_scan import resolve_backend, selective_scan

__all__ = [
    "ACTIVATIONS",
    "SCAN_WEIGHT_GRADS",
    "TOLERANCES",
    "compare",
    "mamba_case",
    "run_parity",
    "scan_case",
    "scan_inputs",
]

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}
"""(rtol, atol) per dtype: mamba-ssm's ``test_selective_scan`` tolerances."""

SCAN_WEIGHT_GRADS = ("grad_A", "grad_D", "grad_delta_bias")
"""Gradients of the scan's weights, compared norm-wise (:func:`compare`)."""

ACTIVATIONS = ("u", "delta", "B", "C", "z")
"""Scan inputs that are activations (in the case's dtype); ``A``, ``D`` and ``delta_bias`` are float32 weights."""


def scan_inputs(batch: int, dim: int, state: int, length: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded selective-scan inputs drawn as in mamba-ssm's ``test_selective_scan`` (``A = -0.5 rand``,
    ``delta = 0.5 rand``, ``delta_bias = 0.5 rand``, the rest standard normal)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    values = {
        "u": normal(batch, dim, length), "delta": 0.5 * uniform(batch, dim, length), "A": -0.5 * uniform(dim, state),
        "B": normal(batch, state, length), "C": normal(batch, state, length), "D": normal(dim),
        "z": normal(batch, dim, length), "delta_bias": 0.5 * uniform(dim),
    }
    return {k: v.to(device, dtype if k in ACTIVATIONS else torch.float32) for k, v in values.items()}


def _output_grad(y: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A fixed random gradient for ``y``, rounded to ``dtype`` (the tested dtype, so that the reference and the
    tested run receive the same values) and given ``y``'s dtype."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(y.shape, generator=gen).to(dtype).to(y.device, y.dtype)


def _outputs_and_grads(
    fn: Callable[..., torch.Tensor], leaves: Mapping[str, torch.Tensor], grad_dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """``fn(**leaves)`` and the gradients of every leaf for a fixed random output gradient, all detached."""
    y = fn(**leaves)
    grad_y = _output_grad(y, grad_dtype, seed)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return {"y": y.detach(), **{f"grad_{k}": g for k, g in zip(leaves, grads)}}


def _leaves(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in tensors.items()}


def _errors(reference: torch.Tensor, result: torch.Tensor, rtol: float, atol: float, normwise: bool
            ) -> dict[str, Any]:
    """Errors of one tensor (see :func:`compare`); ``None`` figures when ``result`` is not finite."""
    ref, got = reference.detach().double(), result.detach().double()
    criterion = "normwise" if normwise else "elementwise"
    if not bool(torch.isfinite(got).all()):
        return {"criterion": criterion, "max_abs_err": None, "max_rel_err": None, "ratio": None}
    if ref.numel() == 0:
        return {"criterion": criterion, "max_abs_err": 0.0, "max_rel_err": 0.0, "ratio": 0.0}
    err = (got - ref).abs()
    max_abs, scale = float(err.max()), float(ref.abs().max())
    if normwise:  # |x - ref|_2 against the norm of the elementwise tolerance atol + rtol |ref|, bounded below
        ratio = float(err.norm() / (atol * ref.numel() ** 0.5 + rtol * ref.norm()))
    else:
        ratio = float((err / (atol + rtol * ref.abs())).max())
    return {"criterion": criterion, "max_abs_err": max_abs, "max_rel_err": max_abs / scale if scale > 0 else max_abs,
            "ratio": ratio}


def compare(reference: Mapping[str, torch.Tensor], result: Mapping[str, torch.Tensor], rtol: float,
            atol: float, normwise: Collection[str] = ()) -> dict[str, Any]:
    """Compare ``result`` with ``reference`` name by name (in float64).

    A tensor passes when its ``ratio`` is at most 1: elementwise, the largest ``|x - ref| / (atol + rtol |ref|)``
    (mamba-ssm's ``allclose`` criterion); for the names in ``normwise`` (gradients of weights: sums over the batch
    and the sequence, whose elements near zero carry the rounding of thousands of terms), the norm of ``x - ref``
    over ``atol * sqrt(n) + rtol * |ref|_2``, the norm-wise form of the same tolerance.

    Returns:
        ``outputs``: per name ``criterion``, ``max_abs_err``, ``max_rel_err`` (the largest error over the largest
        reference magnitude) and ``ratio``, all ``None`` where ``x`` is not finite; ``max_abs_err`` and
        ``max_rel_err`` over all names (``None`` if any is not finite), ``worst`` (the name with the largest ratio)
        and ``passed``.

    Raises:
        ValueError: nothing to compare, or the two do not hold the same names and shapes.
    """
    if not reference or set(reference) != set(result):
        raise ValueError(
            f"reference and result must hold the same tensors, got {sorted(reference)} and {sorted(result)}."
        )
    for name, ref in reference.items():
        if result[name].shape != ref.shape:
            got = tuple(result[name].shape)
            raise ValueError(f"{name}: shape {got} differs from the reference's {tuple(ref.shape)}.")
    outputs = {name: _errors(ref, result[name], rtol, atol, name in normwise) for name, ref in reference.items()}
    ratios = {name: math.inf if e["ratio"] is None else e["ratio"] for name, e in outputs.items()}
    worst = max(ratios, key=ratios.get)
    finite = all(e["ratio"] is not None for e in outputs.values())
    return {
        "max_abs_err": max(e["max_abs_err"] for e in outputs.values()) if finite else None,
        "max_rel_err": max(e["max_rel_err"] for e in outputs.values()) if finite else None,
        "worst": worst,
        "passed": ratios[worst] <= 1.0,
        "outputs": outputs,
    }


def scan_case(name: str, scan: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor],
              seed: int = 0) -> dict[str, Any]:
    """One scan case: ``scan(**inputs, delta_softplus=True)`` against the chunked backend in float64.

    Args:
        name: the case's label, e.g. ``"scan chunked"``.
        scan: a :func:`~scripts.networks.selective_scan.selective_scan` with its backend bound (tests pass others).
        inputs: :func:`scan_inputs`; the tolerance is that of the activations' dtype (:data:`TOLERANCES`).
        seed: seed of the output gradient.

    Returns:
        ``case``, ``dtype``, ``reference``, ``shape``, ``rtol``, ``atol`` and the items of :func:`compare`.
    """
    dtype = inputs["u"].dtype
    rtol, atol = TOLERANCES[dtype]
    reference_scan = functools.partial(selective_scan, backend="chunked", delta_softplus=True)
    reference = _outputs_and_grads(reference_scan, _leaves(inputs, torch.float64), dtype, seed)
    result = _outputs_and_grads(functools.partial(scan, delta_softplus=True), _leaves(inputs), dtype, seed)
    b, d, length = inputs["u"].shape
    shape = f"b{b} d{d} n{inputs['A'].shape[1]} L{length}"
    return {"case": name, "dtype": str(dtype).replace("torch.", ""), "reference": "chunked float64", "shape": shape,
            "rtol": rtol, "atol": atol, **compare(reference, result, rtol, atol, normwise=SCAN_WEIGHT_GRADS)}


def _mamba_outputs(module: Mamba, x: torch.Tensor, autocast: torch.dtype | None, grad_dtype: torch.dtype,
                   seed: int) -> dict[str, torch.Tensor]:
    """Output and gradients (input and every parameter) of ``module`` on ``x``, optionally under autocast."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        y = module(leaf)
    y.backward(_output_grad(y, grad_dtype, seed))
    out = {"y": y.detach(), "grad_x": leaf.grad}
    out.update({f"grad_{k}": p.grad for k, p in module.named_parameters()})
    return out


def mamba_case(name: str, module: Mamba, fast_path: bool, x: torch.Tensor, autocast: torch.dtype | None = None,
               seed: int = 0) -> dict[str, Any]:
    """One Mamba case: ``module`` (float32) with ``use_fast_path=fast_path`` against its float64 pure path.

    Args:
        name: the case's label.
        module: a float32 :class:`~scripts.networks.mamba.Mamba`; it is not modified.
        fast_path: run the fused path (where it can run; else the module falls back to its pure path).
        x: input (batch, length, d_model), float32.
        autocast: run under ``torch.autocast`` with this dtype (``None``: float32 throughout).
        seed: seed of the output gradient.
    """
    reference_module = copy.deepcopy(module).double()
    reference_module.use_fast_path, reference_module.scan_backend = False, "chunked"
    dtype = autocast or torch.float32
    reference = _mamba_outputs(reference_module, x.double(), None, dtype, seed)
    tested = copy.deepcopy(module)
    tested.use_fast_path = fast_path
    result = _mamba_outputs(tested, x, autocast, dtype, seed)
    rtol, atol = TOLERANCES[dtype]
    b, length, d_model = x.shape
    return {"case": name, "dtype": str(dtype).replace("torch.", ""), "reference": "pure path float64",
            "shape": f"b{b} L{length} d_model{d_model}", "rtol": rtol, "atol": atol,
            **compare(reference, result, rtol, atol, normwise=[f"grad_{k}" for k, _ in module.named_parameters()])}


def run_parity(device: torch.device, small: bool) -> dict[str, Any]:
    """All parity cases on ``device`` (``small``: CPU sizes; else sizes of the default plan's first Mamba stage at
    128^3, 16^3 tokens of 256 features).

    Returns:
        ``cases`` (one dict per case, see :func:`scan_case` / :func:`mamba_case`; a case that raised holds ``case``,
        ``dtype``, ``error`` and ``passed`` false), ``skipped`` (case and reason) and ``passed`` (every case passed).
    """
    cases, skipped = [], []

    def add(name: str, dtype: torch.dtype, run: Callable[[], dict[str, Any]]) -> None:
        try:
            cases.append(run())
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. a kernel that refuses a dtype: record, go on
            cases.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "error": error_text(e),
                          "passed": False})

    variants = available_variants(device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    batch, d_model, state, length = (2, 16, 8, 300) if small else (2, 256, 16, 4096)
    backends = ["chunked"] + (["naive"] if small else []) + (["cuda"] if "cuda" in variants else [])
    if "cuda" not in variants:
        skipped.append({"case": "scan cuda", "reason": "mamba-ssm's selective-scan kernel does not run here"})
    for dtype in dtypes:
        inputs = scan_inputs(batch, 2 * d_model, state, length, dtype, device)
        for backend in backends:
            scan = functools.partial(selective_scan, backend=backend)
            add(f"scan {backend}", dtype, functools.partial(scan_case, f"scan {backend}", scan, inputs))
    torch.manual_seed(0)
    module = Mamba(d_model, d_state=state, device=device)
    x = torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(2)).to(device)
    paths = [(f"mamba pure ({resolve_backend(None, device)} scan)", False)]
    paths += [("mamba fused", True)] if "fused" in variants else []
    if "fused" not in variants:
        skipped.append({"case": "mamba fused", "reason": "the fused path (mamba-ssm, causal-conv1d) does not run here"})
    for dtype in dtypes:
        for name, fast in paths:
            autocast = None if dtype == torch.float32 else dtype
            add(name, dtype, functools.partial(mamba_case, name, module, fast, x, autocast))
    return {"cases": cases, "skipped": skipped, "passed": all(c["passed"] for c in cases)}
