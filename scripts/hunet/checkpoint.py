# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The configuration a Mamba-HUNet checkpoint was trained with, stored beside its weights.

``configs/hunet_train.yaml`` saves ``{"model": state_dict, "config": record}`` (:class:`ConfigRecord` in the
``CheckpointSaver``'s ``save_dict``): the network and preprocessing values of :data:`RECORDED_KEYS` and the
description of the training data. Readers that build the network from a config (the lesion service) apply
:func:`recorded_config` of the checkpoint so that a model trained with other sizes (e.g. ``make lesion-model``)
is rebuilt as it was trained; MONAI's ``CheckpointLoader`` with ``load_dict: {model: ...}`` ignores the record.
Records hold plain numbers, strings and lists only, so ``torch.load(..., weights_only=True)`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RECORD_KEY", "RECORDED_KEYS", "ConfigRecord", "recorded_config"]

RECORD_KEY = "config"
"""The checkpoint entry of the record."""
RECORDED_KEYS: tuple[str, ...] = (
    "in_channels", "out_channels", "img_size", "patch_size", "embed_dims", "depths", "d_state", "train_patch",
    "intensity_percentiles", "intensity_clip", "sharpen_sigma", "sharpen_amount", "slice_axis",
)
"""Top-level config values that must match between training and inference (network, preprocessing and the
sliding window, which has the training crop's size)."""
_INFO_KEYS = ("training_data", "synthetic_training_data")


def _plain(value: Any, name: str) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    raise ValueError(f"config record value {name!r} must be a number, string or list of them, got {type(value)}.")


class ConfigRecord:
    """Config values saved in a checkpoint (ignite's ``Checkpoint`` stores ``state_dict()``).

    Args:
        values: the values of :data:`RECORDED_KEYS` (all of them) and optionally ``training_data`` (a description)
            and ``synthetic_training_data`` (bool).

    Raises:
        ValueError: a recorded key is missing, an unknown key is given, or a value is not plain data.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values: dict[str, Any] = {}
        self.load_state_dict(values)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, values: Mapping[str, Any]) -> None:
        missing = [k for k in RECORDED_KEYS if k not in values]
        unknown = [k for k in values if k not in RECORDED_KEYS + _INFO_KEYS]
        if missing or unknown:
            raise ValueError(f"config record: missing {missing}, unknown {unknown}; it holds {list(RECORDED_KEYS)} "
                             f"and optionally {list(_INFO_KEYS)}.")
        self.values = {str(k): _plain(v, k) for k, v in values.items()}


def recorded_config(checkpoint: Any) -> dict[str, Any]:
    """The record of a loaded checkpoint (``{}`` for a plain state dict or one saved without a record).

    Raises:
        ValueError: a record that is not a mapping, or whose values are not plain data.
    """
    if not isinstance(checkpoint, Mapping) or RECORD_KEY not in checkpoint or "model" not in checkpoint:
        return {}
    record = checkpoint[RECORD_KEY]
    if not isinstance(record, Mapping):
        raise ValueError(f"the checkpoint's '{RECORD_KEY}' entry must be a mapping of config values.")
    return ConfigRecord(record).state_dict()

