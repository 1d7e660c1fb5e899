# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The ``authors`` peer: the authors' own MambaClinix (github CYB08/MambaClinix-PyTorch), built from their code when
the user has installed it. Nothing of theirs is shipped with the bundle.

Their network lives in ``mambaclinix/nnunetv2/nets/MambaClinix_3d.py`` of their repository, inside their fork of
nnU-Net v2; it imports ``dynamic_network_architectures``, ``nnunetv2`` and ``mamba_ssm`` (whose selective scan needs
CUDA). To make it available:

1. clone github.com/CYB08/MambaClinix-PyTorch and ``pip install -e mambaclinix`` in it (their ``nnunetv2``), with
   ``dynamic-network-architectures`` and ``mamba-ssm`` (and ``causal-conv1d``) for the installed torch and CUDA;
2. check ``python -c "import nnunetv2.nets.MambaClinix_3d"``;
3. if the module sits under another name, give it with ``--authors-module NAME`` or the environment variable
   :data:`AUTHORS_MODULE_ENV`.

:func:`build_authors_network` builds it with the plan of the bundle's ``mambaclinix`` benchmark model (features
:data:`~scripts.benchmark.models.DEFAULT_FEATURES`, strides :data:`~scripts.benchmark.models.DEFAULT_STRIDES`,
kernel 3, HGCN stages then Mamba stages as their constructor lays them out) and the options of their
``get_mambaclinix_3d_from_plans`` (convolution bias, affine instance norm with eps 1e-5, in-place LeakyReLU), without
deep supervision.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch.nn as nn

__all__ = [
    "AUTHORS_CLASS",
    "AUTHORS_DEFAULT_MODULE",
    "AUTHORS_INSTALL",
    "AUTHORS_MODULE_ENV",
    "authors_module_name",
    "authors_unavailable",
    "build_authors_network",
]

AUTHORS_MODULE_ENV = "MAMBACLINIX_AUTHORS_MODULE"
"""Environment variable naming the module of the authors' network (default :data:`AUTHORS_DEFAULT_MODULE`)."""
AUTHORS_DEFAULT_MODULE = "nnunetv2.nets.MambaClinix_3d"
"""Where ``pip install -e mambaclinix`` in a clone of the authors' repository puts their network."""
AUTHORS_CLASS = "MambaClinix"
"""The network class of that module."""
AUTHORS_INSTALL = (
    "clone github.com/CYB08/MambaClinix-PyTorch, `pip install -e mambaclinix` there (their nnU-Net v2 fork) with "
    "dynamic-network-architectures and mamba-ssm, or name the module with --authors-module / "
    f"{AUTHORS_MODULE_ENV}"
)
"""What to install to make the ``authors`` peer available (one line, for messages)."""


def authors_module_name() -> str:
    """The module that holds the authors' network: :data:`AUTHORS_MODULE_ENV` if set, else the default."""
    return os.environ.get(AUTHORS_MODULE_ENV) or AUTHORS_DEFAULT_MODULE


def _import_authors() -> ModuleType:
    """Import :func:`authors_module_name`.

    Raises:
        ImportError: the module or one of its dependencies is missing, or it has no :data:`AUTHORS_CLASS`.
    """
    name = authors_module_name()
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"the authors' network is not installed ({name}: {type(e).__name__}: {e}): {AUTHORS_INSTALL}"
        ) from e
    if not hasattr(module, AUTHORS_CLASS):
        raise ImportError(f"the module {name} has no {AUTHORS_CLASS} class; is it the authors' MambaClinix_3d?")
    return module


def authors_unavailable() -> str | None:
    """Why the ``authors`` peer cannot be built here, in one line ending in ``; skipped``; ``None`` when it can."""
    try:
        _import_authors()
    except ImportError as e:
        return f"{e}; skipped"
    return None


def build_authors_network(in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    """The authors' MambaClinix with the default plan of the bundle's ``mambaclinix`` benchmark model (3D).

    Args:
        in_channels: input channels.
        out_channels: output classes.

    Raises:
        ImportError: their code or one of its dependencies is not installed (the message says what to install).
    """
    from scripts.benchmark.models import DEFAULT_FEATURES, DEFAULT_STRIDES

    network = getattr(_import_authors(), AUTHORS_CLASS)
    n = len(DEFAULT_FEATURES)
    # their constructor turns the second half of the encoder into Mamba stages by writing into these lists: fresh ones
    return network(
        input_channels=in_channels,
        n_stages=n,
        features_per_stage=list(DEFAULT_FEATURES),
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3] for _ in range(n)],
        strides=[[s, s, s] for s in DEFAULT_STRIDES],
        n_conv_per_stage=[2] * n,
        num_classes=out_channels,
        n_conv_per_stage_decoder=[2] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
