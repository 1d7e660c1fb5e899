# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Transforms and handlers that keep the bundle's pipelines usable from MONAI Label 0.8.5 (the ``monaibundle`` app).

MONAI Label hands the inference pre-transforms a data dictionary that carries, beside ``image``, the string
``image_path`` (and ``image_meta_dict``). monai 1.6's :class:`monai.transforms.Spacingd` updates every entry
named ``<key>_*`` with the resampled image's meta data when the image is NIfTI, which fails on a string
(``'str' object has no attribute 'update'``). :class:`SafeSpacingd` is a drop-in ``Spacingd`` that steps such
entries aside for the call and puts them back unchanged.

MONAI Label's training reads ``train#handlers`` as a list of dictionaries (it looks for a ``CheckpointLoader``
entry and prepends one that loads ``models/model.pt`` into ``@network``), so every entry must be a dictionary:
:class:`scripts.handlers.MainProcessOnly` lists a handler object built elsewhere in the config. When that loader
is present the run is a fine-tuning run from ``model.pt``: :class:`scripts.handlers.LatestCheckpoint` then starts
it at epoch 0 instead of resuming the previous run's state (which would undo the loaded weights and skip the
requested epochs).

MONAI Label's endpoints turn any other exception into a bare ``500 Internal Server Error``.
:class:`LoadImageCheckedd` (a ``LoadImaged``, which MONAI Label keeps and wraps) checks the file's header before
reading it (:func:`scripts.image_guard.check_image`: size limits, data type, truncation, decompression bombs) and
reports a file that is too large (413), not a readable image, 2D where the model is 3D, or with the wrong channel
count (422) as :class:`InputError`: a ``ValueError`` that, inside the server, is also an HTTP exception, so the
client gets the status with the message as ``detail``. ``InputError`` lives in the torch-free
:mod:`scripts.image_guard` (re-exported here) so that transforms can raise it too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, Spacingd

from scripts.image_guard import INPUT_ERROR_STATUS, ImageLimits, InputError, check_image, check_spatial_dims

__all__ = [
    "INPUT_ERROR_STATUS",
    "InputError",
    "LoadImageCheckedd",
    "SafeSpacingd",
    "non_mapping_companions",
]

logger = logging.getLogger(__name__)


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


class LoadImageCheckedd(LoadImaged):
    """:class:`monai.transforms.LoadImaged` that checks each file's header first, reads DICOM with
    :class:`scripts.dicom_io.DicomVolumeReader` and reports unusable inputs as :class:`InputError`.

    Before any reader runs, :func:`scripts.image_guard.check_image` refuses an image beyond ``limits`` (413) and a
    missing, empty, truncated, malformed, complex-valued, colour DICOM or (with ``spatial_dims``) 2D-for-3D file
    (422); after reading, a file that no reader can read, the wrong number of spatial axes and (with
    ``in_channels``) the wrong channel count raise :class:`InputError` naming the file and the fix. DICOM inputs
    (series folders, ``.dcm`` files) are read by :class:`scripts.dicom_io.DicomVolumeReader`, registered when the
    first DICOM input comes (NIfTI-only runs never import :mod:`scripts.dicom_io`): a folder's series
    ``series_uid``, else its largest series; classic series and enhanced multi-frame images alike; the meta data
    records the source of every slice for :class:`scripts.dicom_io.SaveDicomSegd`. Use
    ``ensure_channel_first=True`` so the channel count is the first dimension.

    Args:
        keys: keys of the images to load.
        in_channels: channels the network expects; ``None`` skips the check.
        spatial_dims: 3 refuses 2D images (``(X, Y)`` or ``(X, Y, 1)``), 2 refuses 3D volumes; ``None`` skips.
        limits: :class:`scripts.image_guard.ImageLimits`, or a mapping of its fields (a config's ``image_limits``);
            ``None``: the defaults.
        series_uid: SeriesInstanceUID to read from DICOM folders holding several series; ``None``: the largest.
        kwargs: the other arguments of ``LoadImaged``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        in_channels: int | None = None,
        spatial_dims: int | None = None,
        limits: ImageLimits | Mapping | None = None,
        series_uid: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(keys, **kwargs)
        if in_channels is not None and int(in_channels) < 1:
            raise ValueError(f"in_channels must be a positive channel count or None, got {in_channels}.")
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
        self.in_channels = None if in_channels is None else int(in_channels)
        self.spatial_dims = spatial_dims
        self.limits = ImageLimits.coerce(limits)
        self.series_uid = str(series_uid) if series_uid else None
        self._dicom_reader = None

    def _register_dicom_reader(self) -> None:
        if self._dicom_reader is None:
            from scripts.dicom_io import DicomVolumeReader

            self._dicom_reader = DicomVolumeReader(self.series_uid, self.limits)
            self.register(self._dicom_reader)  # tried before MONAI's own readers, for DICOM inputs only

    def __call__(self, data, reader=None):
        names = {k: data.get(k) for k in self.keys if k in data}
        for name in names.values():
            if isinstance(name, (str, os.PathLike, list, tuple)):
                headers = check_image(name, self.limits, self.spatial_dims, series_uid=self.series_uid)
                if any(h.format == "dicom" for h in headers):
                    self._register_dicom_reader()
        try:
            d = super().__call__(data, reader)
        except InputError:  # the DICOM reader's own message, naming the file
            raise
        except Exception as e:  # readers raise many types for unreadable files
            raise InputError(
                f"{', '.join(str(n) for n in names.values())} could not be read as an image ({type(e).__name__}: {e}); "
                "send a NIfTI, NRRD or DICOM image."
            ) from e
        for key in self.key_iterator(d):
            img = d[key]
            shape = tuple(getattr(img, "shape", ()))
            check_spatial_dims(shape[1:], self.spatial_dims, str(names.get(key)))
            if self.in_channels is not None and (len(shape) < 2 or shape[0] != self.in_channels):
                raise InputError(
                    f"{names.get(key)}: the image has {shape[0] if shape else 0} channel(s) (shape {shape}) but the "
                    f"model expects {self.in_channels}; send a {self.in_channels}-channel image "
                    "(or re-plan and retrain the model for this channel count)."
                )
        return d
