# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Weight initialisation of the networks: nnU-Net's He initialisation.

He et al., "Delving Deep into Rectifiers", https://arxiv.org/abs/1502.01852. nnU-Net (and the MambaClinix authors'
network, built from its plans) applies ``InitWeights_He(1e-2)`` to the whole network after construction.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["HE_INIT_MODULES", "he_init_"]

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
