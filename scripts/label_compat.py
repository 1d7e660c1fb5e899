# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms and handlers that keep the bundle's pipelines usable from MONAI Label 0.8.5 (the ``monaibundle`` app).

MONAI Label hands the inference pre-transforms a data dictionary that carries, beside ``image``, the string
``image_path`` (and ``image_meta_dict``). monai 1.6's :class:`monai.transforms.Spacingd` updates every entry
named ``<key>_*`` with the resampled image's meta data when the image is NIfTI, which fails on a string
(``'str' object has no attribute 'update'``). :class:`SafeSpacingd` is a drop-in ``Spacingd`` that steps such
entries aside for the call and puts them back unchanged.

MONAI Label's training reads ``train#handlers`` as a list of dictionaries (it looks for a ``CheckpointLoader``
entry and prepends one that loads ``models/model.pt`` into ``@network``), so every entry must be a dictionary:
:class:`SharedHandler` lists a handler object built elsewhere in the config. When that loader is present the run
is a fine-tuning run from ``model.pt``: :class:`scripts.handlers.LatestCheckpoint` then starts it at epoch 0
instead of resuming the previous run's state (which would undo the loaded weights and skip the requested epochs).

MONAI Label's endpoints turn any other exception into a bare ``500 Internal Server Error``.
:class:`LoadImageCheckedd` (a ``LoadImaged``, which MONAI Label keeps and wraps) reports a file that is not a
readable image, or one with the wrong channel count, as :class:`InputError`: a ``ValueError`` that, inside the
server, is also an HTTP exception, so the client gets ``422`` with the message as ``detail``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import LoadImaged, Spacingd

from scripts.data import DataError

__all__ = [
    "InputError",
    "LoadImageCheckedd",
    "SafeSpacingd",
    "SharedHandler",
    "non_mapping_companions",
]

logger = logging.getLogger(__name__)

try:  # present where a web server (MONAI Label's FastAPI) is installed
    from starlette.exceptions import HTTPException as _HTTPException
except ImportError:  # pragma: no cover - the bundle's own environment
    _HTTPException = None

#: HTTP status of :class:`InputError` inside a web server: the request's input can't be processed.
INPUT_ERROR_STATUS = 422

if _HTTPException is not None:

    class InputError(DataError, _HTTPException):
        """An input image that can't be used; a ``ValueError`` and, inside MONAI Label, an HTTP 422 error."""

        def __init__(self, message: str) -> None:
            DataError.__init__(self, message)
            _HTTPException.__init__(self, status_code=INPUT_ERROR_STATUS, detail=message)

        def __str__(self) -> str:
            return str(self.detail)

else:

    class InputError(DataError):  # type: ignore[no-redef]
        """An input image that can't be used (a ``ValueError``)."""

        status_code = INPUT_ERROR_STATUS

        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.detail = message


def non_mapping_companions(data: Mapping[Hashable, object], keys: tuple) -> list[str]:
    """Entries ``<key>_*`` of ``data`` (for any of ``keys``) whose values are not mappings.

    Such entries (e.g. MONAI Label's ``image_path``) are not meta-data dictionaries, so a transform that updates
    ``<key>_*`` dictionaries in place must not touch them.
    """
    prefixes = tuple(f"{k}_" for k in keys if isinstance(k, str))
    return [k for k, v in data.items() if isinstance(k, str) and k.startswith(prefixes) and not isinstance(v, Mapping)]


class SafeSpacingd(Spacingd):
    """:class:`monai.transforms.Spacingd` that leaves non-dictionary ``<key>_*`` entries (strings such as MONAI
    Label's ``image_path``) untouched.

    Same arguments, output and inverse as ``Spacingd``; use it in any pipeline MONAI Label may run.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        aside = {k: d.pop(k) for k in non_mapping_companions(d, tuple(self.keys))}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


class SharedHandler:
    """Attach a handler object that the config builds elsewhere (e.g. ``@validate#best_model_saver``, shared by
    the evaluator and the trainer) from a dictionary entry of a handler list::

        - _target_: scripts.label_compat.SharedHandler
          handler: '@validate#best_model_saver'

    Args:
        handler: any object with ``attach(engine)``.
    """

    def __init__(self, handler) -> None:
        if not callable(getattr(handler, "attach", None)):
            raise ValueError(f"SharedHandler needs an object with attach(engine), got {type(handler).__name__}.")
        self.handler = handler

    def attach(self, engine: Engine) -> None:
        self.handler.attach(engine)


class LoadImageCheckedd(LoadImaged):
    """:class:`monai.transforms.LoadImaged` that reports unusable inputs as :class:`InputError`.

    A file that no reader can read, and (with ``in_channels``) an image whose channel count differs from the
    network's, raise :class:`InputError` naming the file and the fix. Use ``ensure_channel_first=True`` so the
    channel count is the first dimension.

    Args:
        keys: keys of the images to load.
        in_channels: channels the network expects; ``None`` skips the check.
        kwargs: the other arguments of ``LoadImaged``.
    """

    def __init__(self, keys: KeysCollection, in_channels: int | None = None, **kwargs) -> None:
        super().__init__(keys, **kwargs)
        if in_channels is not None and int(in_channels) < 1:
            raise ValueError(f"in_channels must be a positive channel count or None, got {in_channels}.")
        self.in_channels = None if in_channels is None else int(in_channels)

    def __call__(self, data, reader=None):
        names = {k: data.get(k) for k in self.keys if k in data}
        try:
            d = super().__call__(data, reader)
        except Exception as e:  # readers raise many types for unreadable files
            raise InputError(
                f"{', '.join(str(n) for n in names.values())} could not be read as an image ({type(e).__name__}: {e}); "
                "send a NIfTI, NRRD or DICOM image."
            ) from e
        if self.in_channels is not None:
            for key in self.key_iterator(d):
                img = d[key]
                if getattr(img, "ndim", 0) < 2 or img.shape[0] != self.in_channels:
                    shape = tuple(getattr(img, "shape", ()))
                    raise InputError(
                        f"{names.get(key)}: the image has {shape[0] if shape else 0} channel(s) (shape {shape}) but the "
                        f"model expects {self.in_channels}; send a {self.in_channels}-channel image "
                        "(or re-plan and retrain the model for this channel count)."
                    )
        return d
