# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Our CUDA code paths on CPU, through mamba-ssm's and causal-conv1d's own reference functions.

The ``"cuda"`` selective-scan backend (``selective_scan_fn``) and the fused Mamba path (``mamba_inner_fn``, which
calls ``causal_conv1d_fn`` and ``selective_scan_fn``) are run with the packages' ``selective_scan_ref``,
``mamba_inner_ref`` and ``causal_conv1d_ref`` substituted for the kernels, behind checks of the kernels' argument
contract (``tests/cuda_reference.py``), and compared in values and gradients with our chunked scan and our unfused
path. They need ``.venv-cuda-ref`` (``make test-cuda-paths``) and are skipped in any other environment.
"""

from __future__ import annotations

import unittest

import torch
from parameterized import parameterized

from scripts.networks import MambaClinix
from scripts.networks.mamba import Mamba
from scripts.networks.mamba_hunet import MambaHUNet
from scripts.networks.selective_scan import selective_scan
from tests.cuda_reference import (
    KernelContractError,
    check_causal_conv1d_args,
    check_mamba_inner_args,
    check_selective_scan_args,
    load_references,
    references_as_kernels,
)
from tests.test_selective_scan import make_inputs, rel_err

try:
    REFS = load_references()
    SKIP_REASON = ""
except ImportError as err:  # every environment but .venv-cuda-ref
    REFS, SKIP_REASON = None, f"{err}"

needs_refs = unittest.skipIf(REFS is None, SKIP_REASON)

# relative error (norm-wise) allowed between the reference and our path: both compute the scan in float32, so
# float32 differs only by summation order; half-precision inputs differ by the rounding of outputs and gradients
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}

# batch, d, d_state, length, groups (None: B/C as (batch, d_state, length)), D, z, delta_bias, softplus, dtype
SCAN_CASES = [
    (2, 8, 4, 37, None, True, True, True, True, torch.float32),
    (1, 6, 3, 1, None, True, False, False, False, torch.float32),  # length 1
    (2, 8, 4, 129, 1, True, True, True, True, torch.float32),  # odd length over several of our chunks, 4-d B/C
    (1, 8, 4, 61, 2, False, True, True, True, torch.float32),  # grouped B/C
    (2, 12, 16, 45, 4, True, True, True, True, torch.float32),  # 4 groups (SS2D's four directions)
    (1, 8, 4, 37, None, True, True, True, True, torch.bfloat16),
    (2, 8, 4, 53, 2, True, True, True, True, torch.float16),
    (2, 6, 3, 33, None, True, False, True, False, torch.bfloat16),  # delta_bias without softplus
]


def _scan_inputs(batch, d, n, length, groups, with_d, with_z, with_bias, dtype):
    """Inputs as our Mamba layers pass them: sequences in ``dtype``, A / D / delta_bias in float32."""
    inputs = make_inputs(batch, d, n, length, groups, with_d, with_z, with_bias, seed=3)
    return {
        k: None if v is None else (v if k in ("A", "D", "delta_bias") else v.to(dtype)).requires_grad_(True)
        for k, v in inputs.items()
    }


def _run_scan(inputs, softplus, backend):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=softplus, backend=backend)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    (y * weight).float().sum().backward()
    return y, {k: v.grad for k, v in leaves.items() if v is not None}


@needs_refs
class TestScanBackendThroughReference(unittest.TestCase):
    @parameterized.expand(SCAN_CASES)
    def test_values_and_gradients(self, batch, d, n, length, groups, with_d, with_z, with_bias, softplus, dtype):
        inputs = _scan_inputs(batch, d, n, length, groups, with_d, with_z, with_bias, dtype)
        with references_as_kernels(REFS) as calls:
            y_kernel, g_kernel = _run_scan(inputs, softplus, "cuda")
        self.assertEqual(calls["selective_scan_fn"], 1, "the 'cuda' backend did not reach selective_scan_fn")
        y_ours, g_ours = _run_scan(inputs, softplus, "chunked")
        self.assertEqual(y_kernel.dtype, dtype)
        self.assertEqual(y_ours.dtype, dtype)
        tol = TOLERANCE[dtype]
        self.assertLess(rel_err(y_kernel, y_ours), tol)
        for name, grad in g_ours.items():
            self.assertIsNotNone(g_kernel[name], name)
            self.assertEqual(g_kernel[name].dtype, grad.dtype, name)
            self.assertLess(rel_err(g_kernel[name], grad), tol, f"gradient of {name}")

    def test_auto_picks_the_kernel_on_a_kernel_device(self):
        inputs = _scan_inputs(1, 4, 2, 9, None, True, True, True, torch.float32)
        with references_as_kernels(REFS) as calls:
            _run_scan(inputs, True, None)
        self.assertEqual(calls["selective_scan_fn"], 1)
        with references_as_kernels(REFS) as calls:
            _run_scan(inputs, True, "chunked")
        self.assertEqual(calls["selective_scan_fn"], 0)


@needs_refs
class TestKernelContract(unittest.TestCase):
    """The contract checks refuse what the compiled kernels refuse (so the tests above can fail on it)."""

    def test_selective_scan_contract(self):
        ok = {k: v for k, v in make_inputs(1, 4, 2, 5, None, True, True, True).items()}
        check_selective_scan_args(**ok)
        bad = [
            {"u": ok["u"].double(), "delta": ok["delta"].double()},  # float64 input
            {"delta": ok["delta"].half()},  # delta's dtype differs from u's
            {"A": ok["A"].half()},  # A not float32
            {"D": ok["D"].bfloat16()},
            {"delta_bias": ok["delta_bias"][:3]},
            {"B": ok["B"][..., :4]},  # wrong length
            {"B": ok["B"].unsqueeze(1).expand(1, 3, 2, 5)},  # 3 groups do not divide 4 channels
            {"A": torch.zeros(4, 300)},  # d_state > 256
        ]
        for override in bad:
            with self.subTest(args=list(override)), self.assertRaises(KernelContractError):
                check_selective_scan_args(**{**ok, **override})

    def test_causal_conv1d_and_mamba_inner_contract(self):
        with self.assertRaises(KernelContractError):
            check_causal_conv1d_args(torch.zeros(1, 4, 6), torch.zeros(4, 5))  # width 5
        with self.assertRaises(KernelContractError):
            check_causal_conv1d_args(torch.zeros(1, 4, 6), torch.zeros(4, 3), torch.zeros(4, dtype=torch.half))
        m = Mamba(8, d_state=4)
        xz = torch.zeros(1, 2 * m.d_inner, 5)
        args = [xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight, None,
                -torch.exp(m.A_log)]
        check_mamba_inner_args(*args, D=m.D, delta_bias=m.dt_proj.bias)
        for mutate in (
            lambda a: a.__setitem__(1, m.conv1d.weight[:, 0]),  # (d, w) instead of nn.Conv1d's (d, 1, w)
            lambda a: a.__setitem__(3, m.dt_proj.weight),  # projections swapped
            lambda a: a.__setitem__(7, -torch.exp(m.A_log).double()),
        ):
            bad = list(args)
            mutate(bad)
            with self.subTest(), self.assertRaises(KernelContractError):
                check_mamba_inner_args(*bad, D=m.D, delta_bias=m.dt_proj.bias)
        with self.assertRaises(KernelContractError):
            check_mamba_inner_args(*args, D=m.D, delta_bias=m.dt_proj.bias, delta_softplus=False)

    def test_compiled_stand_in_refuses_to_run(self):
        import selective_scan_cuda  # the stand-in on a machine without the kernels

        if getattr(selective_scan_cuda, "__file__", None):
            self.skipTest("the real compiled kernels are installed here")
        with self.assertRaises(KernelContractError):
            selective_scan_cuda.fwd()


def _assert_grads_close(test: unittest.TestCase, got: dict, expected: dict, tol: float) -> None:
    """Per tensor, the difference's norm against the larger of the tensor's norm and 1% of the largest gradient
    norm of the network: a bias before a normalisation has a gradient that is zero up to float32 cancellation."""
    test.assertEqual(set(got), set(expected))
    floor = 1e-2 * max(g.double().norm().item() for g in expected.values())
    for name, grad in expected.items():
        err = (got[name].double() - grad.double()).norm().item() / max(grad.double().norm().item(), floor)
        test.assertLess(err, tol, f"gradient of {name}")


def _grads(module: torch.nn.Module, x: torch.Tensor, forward) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    outputs = forward(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    gen = torch.Generator().manual_seed(11)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() / (i + 1) for i, o in enumerate(outputs))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return [o.detach() for o in outputs], grads


# d_model, d_state, d_conv, expand, batch, length
MAMBA_CASES = [
    (16, 8, 4, 2, 2, 37),
    (24, 16, 3, 2, 1, 1),
    (8, 4, 2, 1, 2, 50),
    (32, 16, 4, 2, 1, 130),
]


@needs_refs
class TestFusedMambaThroughReference(unittest.TestCase):
    @parameterized.expand(MAMBA_CASES)
    def test_fused_matches_unfused(self, d_model, d_state, d_conv, expand, batch, length):
        torch.manual_seed(0)
        m = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, bias=True)
        x = torch.randn(batch, length, d_model)
        y_pure, g_pure = _grads(m, x, m)
        with references_as_kernels(REFS) as calls:
            y_fused, g_fused = _grads(m, x, m)
        self.assertEqual(dict(calls), {"mamba_inner_fn": 1, "causal_conv1d_fn": 1, "selective_scan_fn": 1})
        self.assertLess(rel_err(y_fused[0], y_pure[0]), 1e-5)
        self.assertEqual(set(g_fused), set(g_pure))
        for name, grad in g_pure.items():
            self.assertLess(rel_err(g_fused[name], grad), 1e-4, f"gradient of {name}")

    def test_bf16_autocast(self):
        torch.manual_seed(0)
        m = Mamba(16, d_state=8)
        x = torch.randn(2, 29, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_pure, g_pure = _grads(m, x, m)
            with references_as_kernels(REFS) as calls:
                y_fused, g_fused = _grads(m, x, m)
        self.assertEqual(calls["mamba_inner_fn"], 1)
        self.assertEqual(y_fused[0].dtype, y_pure[0].dtype)
        self.assertLess(rel_err(y_fused[0], y_pure[0]), 3e-2)
        for name, grad in g_pure.items():
            self.assertTrue(torch.isfinite(g_fused[name]).all(), name)
            self.assertLess(rel_err(g_fused[name], grad), 5e-2, f"gradient of {name}")

    @parameterized.expand([("float64", {"dtype": torch.float64}, {}), ("width 5", {}, {"d_conv": 5}),
                           ("width 1", {}, {"d_conv": 1}), ("fast path off", {}, {"use_fast_path": False})])
    def test_pure_path_where_the_kernels_cannot_run(self, _, to, kwargs):
        torch.manual_seed(0)
        m = Mamba(8, d_state=4, **kwargs).to(**to)
        x = torch.randn(1, 11, 8, **to)
        y_pure, _ = _grads(m, x, m)
        with references_as_kernels(REFS) as calls:
            y_kernel_device, _ = _grads(m, x, m)
        self.assertEqual(calls["mamba_inner_fn"], 0)
        self.assertLess(rel_err(y_kernel_device[0], y_pure[0]), 1e-5)


@needs_refs
class TestNetworksThroughReferences(unittest.TestCase):
    def test_mambaclinix_deep_supervision(self):
        torch.manual_seed(0)
        net = MambaClinix(
            3, 1, 3, features=(8, 16, 16, 32), strides=(1, 2, 2, 2), block_types=("hgcn", "hgcn", "mamba", "mamba"),
            hgcn_orders=(2, 3), deep_supervision=True, drop_path_rate=0.0,
        ).train()
        x = torch.randn(2, 1, 16, 16, 16)
        y_pure, g_pure = _grads(net, x, net)
        with references_as_kernels(REFS) as calls:
            y_fused, g_fused = _grads(net, x, net)
        layers = sum(isinstance(m, Mamba) for m in net.modules())
        self.assertGreater(layers, 0)
        self.assertEqual(calls["mamba_inner_fn"], layers)
        self.assertEqual(len(y_fused), len(y_pure))
        self.assertGreater(len(y_pure), 1)
        for level, (a, b) in enumerate(zip(y_fused, y_pure)):
            self.assertLess(rel_err(a, b), 1e-4, f"deep-supervision output {level}")
        _assert_grads_close(self, g_fused, g_pure, 1e-4)

    def test_mambaclinix_bf16_autocast(self):
        torch.manual_seed(0)
        net = MambaClinix(3, 1, 2, features=(8, 16, 32), strides=(1, 2, 2), block_types=("hgcn", "mamba", "mamba"),
                          hgcn_orders=(2,), deep_supervision=True, drop_path_rate=0.0).train()
        x = torch.randn(1, 1, 16, 16, 16)
        y_fp32, _ = _grads(net, x, net)
        with references_as_kernels(REFS) as calls, torch.autocast("cpu", dtype=torch.bfloat16):
            y_amp, g_amp = _grads(net, x, net)
        self.assertGreater(calls["mamba_inner_fn"], 0)
        for a, b in zip(y_amp, y_fp32):
            self.assertTrue(torch.isfinite(a).all())
            self.assertLess(rel_err(a, b), 5e-2)
        self.assertTrue(all(torch.isfinite(g).all() for g in g_amp.values()))

    def test_mamba_hunet_scan_backend(self):
        torch.manual_seed(0)
        net = MambaHUNet(img_size=32, embed_dims=(8, 16), depths=(1, 1), drop_path_rate=0.0).train()
        x = torch.randn(2, 1, 32, 32)
        y_ours, g_ours = _grads(net, x, net)
        with references_as_kernels(REFS) as calls:
            y_kernel, g_kernel = _grads(net, x, net)
        self.assertGreater(calls["selective_scan_fn"], 0)
        for a, b in zip(y_kernel, y_ours):
            self.assertLess(rel_err(a, b), 1e-4)
        _assert_grads_close(self, g_kernel, g_ours, 1e-4)


if __name__ == "__main__":
    unittest.main()
