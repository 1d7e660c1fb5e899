# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""mamba-ssm's and causal-conv1d's own reference functions in place of their CUDA kernels, on CPU tensors.

In ``.venv-cuda-ref`` (``scripts/checks/setup_cuda_ref_env.sh``, ``make test-cuda-paths``) both packages are built
from their sources without their compiled extensions (``selective_scan_cuda``, ``causal_conv1d_cuda``).
:func:`load_references` imports the packages' Python modules with those two extensions replaced by stand-ins whose
every function raises when called (so a test cannot reach a compiled kernel by accident), and returns the packages'
reference functions ``selective_scan_ref``, ``mamba_inner_ref`` and ``causal_conv1d_ref``.

:func:`references_as_kernels` then, for the duration of a ``with`` block:

- makes the fused entry points our code calls (``selective_scan_fn`` and ``mamba_inner_fn`` of
  ``mamba_ssm.ops.selective_scan_interface``, and the ``causal_conv1d_fn`` that ``mamba_inner_ref`` calls) the
  packages' references, each behind a check of the kernel's contract: the argument dtypes, shapes and limits that
  the compiled kernels enforce (``TORCH_CHECK`` in mamba-ssm's ``csrc/selective_scan/selective_scan.cpp`` and
  causal-conv1d's ``csrc/causal_conv1d.cpp``, after the autograd wrappers' own fix-ups such as ``contiguous()``);
- lets CPU tensors take our kernel paths (:data:`scripts.networks.selective_scan.KERNEL_DEVICE_TYPES`);
- counts the calls of each substituted op, so a test can prove that the kernel path ran.

Every contract violation raises :class:`KernelContractError` naming the argument.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

COMPILED_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
"""The compiled modules of mamba-ssm and causal-conv1d that a CPU build lacks."""

KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the selective-scan and causal-conv1d kernels accept."""


class KernelContractError(AssertionError):
    """An argument that the compiled kernel would refuse."""


@dataclass(frozen=True)
class References:
    """The imported interface modules of mamba-ssm and causal-conv1d and their versions."""

    scan_interface: types.ModuleType
    conv_interface: types.ModuleType
    versions: tuple[str, str]


def _kernel_stand_in(name: str) -> types.ModuleType:
    """A module named ``name`` whose attributes are functions that fail when called."""
    module = types.ModuleType(name)
    module.__doc__ = f"stand-in for the compiled extension {name} (not built on this machine)"

    def __getattr__(attr: str):  # noqa: N807 (module-level __getattr__, PEP 562)
        if attr.startswith("__"):
            raise AttributeError(attr)

        def kernel(*args, **kwargs):
            raise KernelContractError(f"the compiled kernel {name}.{attr} was called; it is not built here")

        return kernel

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def load_references() -> References:
    """Import mamba-ssm's and causal-conv1d's interface modules on a machine without their compiled kernels.

    Raises:
        ImportError: when mamba-ssm or causal-conv1d is not installed (any environment but ``.venv-cuda-ref``).
    """
    for package in ("mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"{package} is not installed; `make test-cuda-paths` builds .venv-cuda-ref with it")
    for name in COMPILED_EXTENSIONS:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _kernel_stand_in(name)
    scan_interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    conv_interface = importlib.import_module("causal_conv1d.causal_conv1d_interface")
    versions = (importlib.metadata.version("mamba_ssm"), importlib.metadata.version("causal_conv1d"))
    return References(scan_interface, conv_interface, versions)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelContractError(f"kernel contract: {message}")


def _shape(t: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    _require(tuple(t.shape) == tuple(expected), f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_selective_scan_args(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
) -> None:
    """What ``selective_scan_fn`` and its kernel accept (``selective_scan.cpp``: ``selective_scan_fwd``)."""
    _require(u.dim() == 3, f"u must be (batch, dim, length), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    _require(u.dtype in KERNEL_INPUT_DTYPES, f"u must be float32, float16 or bfloat16, got {u.dtype}")
    _require(delta.dtype == u.dtype, f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    _shape(delta, (batch, dim, length), "delta")
    _require(A.dtype == torch.float32, f"A must be float32, got {A.dtype}")
    _require(A.dim() == 2 and A.shape[0] == dim, f"A must be (dim={dim}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    _require(d_state <= 256, f"d_state must be <= 256, got {d_state}")
    for name, t in (("B", B), ("C", C)):
        _require(t.dtype == u.dtype, f"a variable {name} must have u's dtype {u.dtype}, got {t.dtype}")
        _require(t.dim() in (3, 4), f"{name} must be (batch, d_state, length) or (batch, groups, d_state, length)")
        groups = 1 if t.dim() == 3 else t.shape[1]
        _require(groups >= 1 and dim % groups == 0, f"{name}'s {groups} groups must divide dim {dim}")
        _shape(t, (batch, d_state, length) if t.dim() == 3 else (batch, groups, d_state, length), name)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
            _shape(t, (dim,), name)
    if z is not None:
        _require(z.dtype == u.dtype, f"z must have u's dtype {u.dtype}, got {z.dtype}")
        _shape(z, (batch, dim, length), "z")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    _require(len(devices) == 1, f"all tensors must be on one device, got {devices}")


def check_causal_conv1d_args(
    x, weight, bias=None, initial_states=None, return_final_states=False, final_states_out=None, activation=None,
    seq_idx=None,
) -> None:
    """What ``causal_conv1d_fn`` and its kernel accept (``causal_conv1d.cpp``: ``causal_conv1d_fwd``)."""
    _require(x.dim() == 3, f"x must be (batch, dim, length), got {tuple(x.shape)}")
    _require(x.dtype in KERNEL_INPUT_DTYPES, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _require(weight.dtype in KERNEL_INPUT_DTYPES, f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    _require(weight.dim() == 2 and weight.shape[0] == x.shape[1], f"weight must be (dim, width), got {tuple(weight.shape)}")
    _require(2 <= weight.shape[1] <= 4, f"the kernel supports widths 2 to 4, got {weight.shape[1]}")
    if bias is not None:
        _require(bias.dtype == weight.dtype, f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        _shape(bias, (x.shape[1],), "bias")
    _require(activation in (None, "silu", "swish"), f"activation must be None, silu or swish, got {activation!r}")


def check_mamba_inner_args(
    xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A,
    B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
    checkpoint_lvl=1,
) -> None:
    """What ``mamba_inner_fn`` (``MambaInnerFn.forward``) accepts before it calls the two kernels."""
    _require(xz.dim() == 3 and xz.shape[1] % 2 == 0, f"xz must be (batch, 2 * d_inner, length), got {tuple(xz.shape)}")
    _require(xz.dtype in KERNEL_INPUT_DTYPES, f"xz must be float32, float16 or bfloat16, got {xz.dtype}")
    d_inner = xz.shape[1] // 2
    _require(
        conv1d_weight.dim() == 3 and conv1d_weight.shape[:2] == (d_inner, 1),
        f"conv1d_weight must be (d_inner={d_inner}, 1, width) as nn.Conv1d's depthwise weight, got {tuple(conv1d_weight.shape)}",
    )
    _require(checkpoint_lvl in (0, 1), f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl}")
    _require(A.dtype == torch.float32 and A.dim() == 2, f"A must be float32 (d_inner, d_state), got {A.dtype} {tuple(A.shape)}")
    d_state = A.shape[1]
    dt_rank = delta_proj_weight.shape[1]
    _shape(x_proj_weight, (dt_rank + 2 * d_state, d_inner), "x_proj_weight")
    _shape(delta_proj_weight, (d_inner, dt_rank), "delta_proj_weight")
    _require(out_proj_weight.dim() == 2 and out_proj_weight.shape[1] == d_inner, "out_proj_weight must be (d_model, d_inner)")
    if out_proj_bias is not None:
        _shape(out_proj_bias, (out_proj_weight.shape[0],), "out_proj_bias")
    _require(B is None and C is None, "this bundle uses input-dependent B and C (B = C = None)")
    _require(B_proj_bias is None and C_proj_bias is None, "B_proj_bias / C_proj_bias are not used by this bundle")
    _require(delta_softplus is True, "mamba_inner_fn applies softplus to delta; pass delta_softplus=True")
    if not torch.is_autocast_enabled(xz.device.type):
        for name, w in (("x_proj_weight", x_proj_weight), ("delta_proj_weight", delta_proj_weight),
                        ("out_proj_weight", out_proj_weight)):
            _require(w.dtype == xz.dtype, f"{name} must have xz's dtype {xz.dtype} outside autocast, got {w.dtype}")
    check_causal_conv1d_args(xz[:, :d_inner], conv1d_weight[:, 0], conv1d_bias, activation="silu")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
            _shape(t, (d_inner,), name)


def _checked(check: Callable, reference: Callable, calls: Counter, name: str) -> Callable:
    def op(*args, **kwargs):
        calls[name] += 1
        check(*args, **kwargs)
        return reference(*args, **kwargs)

    op.__name__ = f"{name}_as_reference"
    return op


@contextlib.contextmanager
def references_as_kernels(refs: References) -> Iterator[Counter]:
    """Within the block, our fused-op calls on CPU tensors run the packages' references behind contract checks.

    Yields:
        a :class:`collections.Counter` of calls per substituted op (``selective_scan_fn``, ``mamba_inner_fn``,
        ``causal_conv1d_fn``).
    """
    scan_module = importlib.import_module("scripts.networks.selective_scan")  # the package re-exports the function
    calls: Counter = Counter()
    scan_if, conv_if = refs.scan_interface, refs.conv_interface
    substitutes = {
        "selective_scan_fn": _checked(check_selective_scan_args, scan_if.selective_scan_ref, calls, "selective_scan_fn"),
        "mamba_inner_fn": _checked(check_mamba_inner_args, scan_if.mamba_inner_ref, calls, "mamba_inner_fn"),
        # mamba_inner_ref calls the module's causal_conv1d_fn (and selective_scan_fn, substituted above)
        "causal_conv1d_fn": _checked(check_causal_conv1d_args, conv_if.causal_conv1d_ref, calls, "causal_conv1d_fn"),
    }
    saved = {name: getattr(scan_if, name) for name in substitutes}
    saved_types = scan_module.KERNEL_DEVICE_TYPES
    try:
        for name, op in substitutes.items():
            setattr(scan_if, name, op)
        scan_module.KERNEL_DEVICE_TYPES = (*saved_types, "cpu")
        scan_module.mamba_ssm_op.cache_clear()
        yield calls
    finally:
        for name, op in saved.items():
            setattr(scan_if, name, op)
        scan_module.KERNEL_DEVICE_TYPES = saved_types
        scan_module.mamba_ssm_op.cache_clear()
