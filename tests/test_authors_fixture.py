# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The bundle's MambaClinix computes the authors' network: a check against outputs of the authors' own code.

How ``tests/data/authors_mambaclinix_fixture.pt`` was made (once, outside this repository, so that none of the
authors' code is in it):

1. A scratch virtual environment with torch 2.13.0 (CPU), numpy and dynamic-network-architectures 0.3.1 from PyPI
   (the building blocks the authors import, ``BasicBlockD``, ``ConvDropoutNormReLU``, ``StackedConvBlocks``,
   ``DropPath``, are identical in 0.2, 0.3.1 and 0.4.4). On its path: the authors' file
   ``mambaclinix/nnunetv2/nets/MambaClinix_3d.py`` and ``nnunetv2/utilities/network_initialization.py`` of
   github.com/CYB08/MambaClinix-PyTorch at commit ba1af654b644a9c7be78cc9cff048c48164056e6, a stub of nnU-Net's
   plans-handler module (only imported for type hints), and a stand-in ``mamba_ssm`` package written for the
   purpose: ``Mamba`` with mamba-ssm's parameter names, shapes and initialisation (``in_proj``, ``conv1d``,
   ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) whose forward is the reference path of
   ``mamba_simple.Mamba`` with a sequential selective scan, all in float64.
2. For three 3D plans the network was built as the authors' ``get_mambaclinix_3d_from_plans`` builds it
   (``conv_bias=True``, ``InstanceNorm3d(eps=1e-5, affine=True)``, ``LeakyReLU(inplace=True)``, two convs per
   stage in the plan, deep supervision on) and initialised with their ``InitWeights_He(1e-2)``:

   - ``stages4`` (the required 4-stage plan): 2 inputs, 3 classes, features 4, 8, 8, 16, kernels (1,3,3) then
     (3,3,3), strides (1,1,1), (1,2,2), (2,2,2), (2,2,2); input (2, 2, 8, 16, 24);
   - ``stages5``: 1 input, 2 classes, features 4, 8, 16, 8, 8, kernel (1,3,3) in stage 1, strides 1, (1,2,2), 2,
     (2,2,1), 2; input (1, 1, 8, 16, 16);
   - ``stages6``: 1 input, 2 classes, features 4, 8, 16, 8, 8, 8, kernel (1,3,3) in stage 0, strides 1, (1,2,2),
     2, 2, (1,2,2), (2,1,1); input (1, 1, 16, 16, 16).

3. Every parameter (there are no buffers) was moved away from its initial value in place:
   ``p += 0.5 * max(std(p), 0.2) * N(0, 1)`` (seeded generator), so that e.g. the layer scale ``gamma1`` (1e-6 at
   init, which would hide the hgConv path) is of order 0.1, and the check covers every weight. The fixture keeps
   ``network.state_dict()`` as nnU-Net saves it, float32, aliased keys included (``decoder.encoder.*``,
   ``*.all_modules.*``).
4. A fixed float32 input (seeded normal) was run through the network converted to float64, in eval mode; the
   outputs of all deep-supervision levels (full resolution first) are stored in float64.
5. ``mamba``: a stand-in Mamba (d_model 40, so dt_rank 3) with perturbed weights, an input (2, 200, 40), and its
   float64 output, to check the scan maths alone. ``init_stats``: for a freshly built and He-initialised authors'
   network of the ``stages4`` plan, the mean, std, numel, min and max of every tensor (before step 3).

Tolerances. ``float64``: our network in float64 against their float64 outputs, max error <= 1e-9 * max|ref| per
level (measured <= 1e-12; what is left is float64 rounding amplified by the LayerNorms over 2 channels of the tiny
plans). ``float32``: our network in float32 (the default options, i.e. channels-last convolutions and group-norm
kernels on CPU, and channels-first) against the float64 outputs, max error <= 1e-2 * max|ref| per level. That is
float32 rounding amplified by ill-conditioned norms: a LayerNorm over 2 channels (stage 0 of these plans has 4
features, halved in the HGCN block) and instance norms over 4 voxels. Measured: up to 4e-3 with the default
channels-last layout (PyTorch's CPU channels-last group-norm and layer-norm kernels accumulate the variance in one
pass), up to 5e-4 channels-first; the authors' own float32 network differs from its float64 outputs by up to
4.5e-4 on the same fixture. Any design difference changes the outputs by O(1) of max|ref|.
"""

from __future__ import annotations

import math
import unittest
from pathlib import Path

import torch
from parameterized import parameterized

from scripts.networks import Mamba, MambaClinix, authors_network_kwargs, authors_state_dict_to_bundle

FIXTURE = Path(__file__).parent / "data" / "authors_mambaclinix_fixture.pt"
CASES = ["stages4", "stages5", "stages6"]
FLOAT64_TOLERANCE = 1e-9
FLOAT32_TOLERANCE = 1e-2


def _load_fixture() -> dict:
    if not FIXTURE.is_file():
        raise FileNotFoundError(
            f"{FIXTURE} is missing; it is part of the repository (note: a .gitignore rule 'data/' also matches "
            "tests/data/, so it must be added with `git add -f` or the rule anchored as '/data/')."
        )
    return torch.load(FIXTURE, weights_only=True)


def _network(case: dict, dtype: torch.dtype = torch.float32, **options) -> MambaClinix:
    """Our network for a fixture case: plan read off the weights, strides from the plan, converted weights."""
    kwargs = authors_network_kwargs(case["state_dict"])
    net = MambaClinix(strides=case["plan"]["strides"], **kwargs, **options)
    net.load_state_dict(authors_state_dict_to_bundle(case["state_dict"]), strict=True)
    return net.eval().to(dtype)


class TestAuthorsFixture(unittest.TestCase):
    fixture: dict

    @classmethod
    def setUpClass(cls) -> None:
        cls.fixture = _load_fixture()

    def _compare(self, case_name: str, dtype: torch.dtype, tolerance: float, **options) -> None:
        case = self.fixture["cases"][case_name]
        net = _network(case, dtype, **options)
        with torch.no_grad():
            outputs = net.deep_supervision_outputs(case["input"].to(dtype))
        self.assertEqual(len(outputs), len(case["outputs"]))
        for level, (out, ref) in enumerate(zip(outputs, case["outputs"])):
            self.assertEqual(out.shape, ref.shape, f"level {level}")
            scale = ref.abs().max().item()
            torch.testing.assert_close(
                out.double(), ref, atol=tolerance * scale, rtol=0.0, msg=lambda m: f"{case_name} level {level}: {m}"
            )

    def test_fixture_is_small_and_complete(self):
        self.assertLess(FIXTURE.stat().st_size, 5 * 2**20)
        self.assertEqual(sorted(self.fixture["cases"]), CASES)
        case = self.fixture["cases"]["stages4"]
        self.assertEqual(len(case["plan"]["features"]), 4)
        self.assertTrue(any(k.startswith("decoder.encoder.") for k in case["state_dict"]))  # nnU-Net's aliases

    @parameterized.expand([(name,) for name in CASES])
    def test_float64_same_function(self, case_name):
        self._compare(case_name, torch.float64, FLOAT64_TOLERANCE)

    @parameterized.expand([(name, cl) for name in CASES for cl in (None, False)])
    def test_float32_same_function(self, case_name, channels_last):
        self._compare(case_name, torch.float32, FLOAT32_TOLERANCE, channels_last=channels_last)

    @parameterized.expand([("chunked",), ("naive",)])
    def test_mamba_scan_matches_reference(self, backend):
        """Our Mamba (pure-PyTorch path) against the float64 sequential-scan stand-in, in float64 and float32."""
        ref = self.fixture["mamba"]
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            m = Mamba(ref["d_model"], ref["d_state"], ref["d_conv"], ref["expand"], scan_backend=backend).to(dtype)
            m.load_state_dict(ref["state_dict"], strict=True)
            with torch.no_grad():
                y = m(ref["input"].to(dtype))
            scale = ref["output"].abs().max().item()
            torch.testing.assert_close(y.double(), ref["output"], atol=tolerance * scale, rtol=0.0)

    def test_he_initialisation_matches_authors(self):
        """A fresh network has the authors' initialisation, tensor by tensor: the same constants where theirs
        are constant (zero conv biases, LayerNorm ones, layer scale 1e-6, Mamba's A_log and D), the same spread
        elsewhere (He-normal conv weights; PyTorch's defaults for the linear layers and Mamba's conv1d, which
        nnU-Net's InitWeights_He does not touch)."""
        stats = self.fixture["init_stats"]["stats"]
        case = self.fixture["cases"][self.fixture["init_stats"]["plan"]]
        converted = authors_state_dict_to_bundle(case["state_dict"])
        ours_name = {id(v): k for k, v in converted.items()}  # the converter keeps the tensors (no copies)
        torch.manual_seed(0)
        fresh = MambaClinix(strides=case["plan"]["strides"], **authors_network_kwargs(case["state_dict"])).state_dict()
        checked = 0
        for key, (mean, std, numel, low, high) in stats.items():
            if key not in case["state_dict"] or id(case["state_dict"][key]) not in ours_name:
                self.assertTrue(key.endswith("skip_scale"), key)  # the authors' unused parameter
                continue
            ours = fresh[ours_name[id(case["state_dict"][key])]].double()
            self.assertEqual(ours.numel(), numel, key)
            if std == 0.0 or key.endswith("A_log"):  # deterministic initialisation: the same values
                torch.testing.assert_close(
                    torch.tensor([ours.mean(), ours.min(), ours.max()]).double(),
                    torch.tensor([mean, low, high]).double(), rtol=1e-6, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}",
                )
            else:  # random initialisation: the same spread (the estimate's relative error is ~1/sqrt(2 numel))
                self.assertGreater(ours.std().item(), 0.0, key)
                log_ratio = abs(math.log(ours.std().item() / std))
                message = f"{key}: std {ours.std():.4g} vs {std:.4g}"
                self.assertLess(log_ratio, max(0.1, 5.0 / math.sqrt(numel)), message)
            checked += 1
        self.assertEqual(checked, len(converted))


class TestConverterErrors(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.state_dict = _load_fixture()["cases"]["stages4"]["state_dict"]

    def test_prefixes_and_no_aliases(self):
        wrapped = {f"module.{k}": v for k, v in self.state_dict.items()}
        expected = authors_state_dict_to_bundle(self.state_dict)
        self.assertEqual(authors_state_dict_to_bundle(wrapped).keys(), expected.keys())
        aliased = [k for k in self.state_dict if k.startswith("decoder.encoder.") or ".all_modules." in k]
        plain = {k: v for k, v in self.state_dict.items() if k not in aliased}
        self.assertLess(len(plain), len(self.state_dict))
        self.assertEqual(authors_state_dict_to_bundle(plain).keys(), expected.keys())

    def test_other_architecture(self):
        ours = MambaClinix(3, 1, 2, features=(8, 16, 16, 32), strides=(1, 2, 2, 2)).state_dict()
        with self.assertRaisesRegex(ValueError, "not a state dict of the authors' MambaClinix"):
            authors_state_dict_to_bundle(ours)
        with self.assertRaisesRegex(ValueError, "state dict"):
            authors_state_dict_to_bundle([1, 2])  # type: ignore[arg-type]
        extra = dict(self.state_dict, **{"decoder.extra_head.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, "another architecture"):
            authors_state_dict_to_bundle(extra)

    def test_mismatching_shapes(self):
        key = "encoder_layers.0.hgConvs.proj_out.weight"  # and its alias under decoder.encoder
        broken = {k: (v[:, :1] if k.endswith(key) else v) for k, v in self.state_dict.items()}
        with self.assertRaisesRegex(ValueError, "shape mismatches.*hgconv.proj_out"):
            authors_state_dict_to_bundle(broken)
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * 3
        net = MambaClinix(3, 2, 4, features=(4, 8, 8, 16), kernel_size=kernels, strides=(1, 2, 2, 2))
        with self.assertRaisesRegex(ValueError, "the given network.*heads"):
            authors_state_dict_to_bundle(self.state_dict, network=net)

    @parameterized.expand([("decoder.encoder.stem.convs.0.all_modules.0.weight",),
                           ("decoder.Init_Residual.conv1.all_modules.1.bias",)])
    def test_differing_aliases(self, key):
        corrupt = dict(self.state_dict, **{key: self.state_dict[key] + 1.0})
        with self.assertRaisesRegex(ValueError, "differ"):
            authors_state_dict_to_bundle(corrupt)


if __name__ == "__main__":
    unittest.main()
