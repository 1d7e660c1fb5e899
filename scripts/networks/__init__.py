# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Networks of the bundle and the selective-scan backends they share."""

from .authors import authors_network_kwargs, authors_state_dict_to_bundle
from .initialization import he_init_
from .mamba import Mamba
from .mamba_hunet import MambaHUNet
from .mambaclinix import MambaClinix, default_block_types, default_hgcn_orders
from .selective_scan import selective_scan

__all__ = [
    "Mamba",
    "MambaClinix",
    "MambaHUNet",
    "authors_network_kwargs",
    "authors_state_dict_to_bundle",
    "default_block_types",
    "default_hgcn_orders",
    "he_init_",
    "selective_scan",
]
