# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Seeded synthetic FLAIR lesion datasets: one volume (:func:`synthesize_volume`), a dataset with its datalist
(:func:`generate_dataset`) and the command line.

Each volume draws everything from its own generator, seeded by ``(seed, split, index)`` (:func:`volume_rng`), so the
same arguments give the same arrays, a volume does not depend on how many others are made, and the test volumes
(other seeds, and by default the lesion loads the training volumes do not use) differ from the training ones. The
steps: a voxel grid and a deformation (:mod:`~scripts.lesions.acquisition`), the deformed tissue maps and their
location zones (:mod:`~scripts.lesions.anatomy`, :mod:`scripts.hunet.locations`), the lesions
(:mod:`~scripts.lesions.lesions`) and the image (:mod:`~scripts.lesions.appearance`).

Output under ``--output``: ``images/<case>.nii.gz`` (float32), ``labels/<case>.nii.gz`` (uint8, 1 on lesions),
``tissue/<case>_tissue.nii.gz`` (uint8, :data:`scripts.lesions.anatomy.TISSUE_LABELS`), ``lesions/<case>_lesions.json``
(the drawn parameters and one record per lesion) and ``datalist.json`` (``training``, ``validation`` and ``test``
lists of ``image`` / ``label`` / ``tissue`` / ``lesions`` / ``lesion_load``, paths relative to ``--output``).

Usage::

    python -m scripts.lesions.generate --mni_dir data/mni/raw --output data/lesions --train 8 --test 4 --seed 0 \\
        [--val 1] [--lesion_load low|mixed|high|many_small] [--test_lesion_load ...] [--shape X Y Z | --downsample F]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.cli import CommandLineError, OneLineArgumentParser
from scripts.io_utils import atomic_write_json, save_nifti_atomic
from scripts.lesions.acquisition import (
    brain_region, check_grid_options, sample_deformation, sample_grid, warp_anatomy,
)
from scripts.lesions.anatomy import TISSUE_LABELS, Anatomy, load_anatomy
from scripts.lesions.appearance import render_flair, sample_contrast
from scripts.lesions.lesions import LESION_LOADS, LesionLoad, place_lesions
from scripts.hunet.locations import JUXTACORTICAL_MM, PERIVENTRICULAR_MM, location_maps

__all__ = ["SPLIT_CODES", "CASE_PREFIX", "SyntheticVolume", "volume_rng", "synthesize_volume", "test_loads",
           "generate_dataset", "build_parser", "main"]

logger = logging.getLogger(__name__)

#: the number of each datalist list in a volume's seed
SPLIT_CODES = {"training": 0, "validation": 1, "test": 2}
#: the case names' prefix in each list
CASE_PREFIX = {"training": "train", "validation": "val", "test": "test"}
_SYNTHETIC = ("synthetic FLAIR-like volume made from the MNI152 2009a tissue maps by scripts.lesions.generate; "
              "not a patient's image")


@dataclass(frozen=True)
class SyntheticVolume:
    """One synthetic volume.

    Attributes:
        image: float32 FLAIR-like image.
        label: uint8 lesion mask.
        tissue: uint8 tissue map (:data:`scripts.lesions.anatomy.TISSUE_LABELS`).
        affine: their voxel-to-world matrix.
        record: the sidecar's content (grid, deformation, appearance, lesions).
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    record: dict


def volume_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of volume ``index`` of list ``split`` (a key of :data:`SPLIT_CODES`) for ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(index)]))


def synthesize_volume(
    anatomy: Anatomy,
    rng: np.random.Generator,
    load: LesionLoad,
    downsample: float = 1.0,
    shape: Sequence[int] | None = None,
) -> SyntheticVolume:
    """One synthetic FLAIR-like volume with lesions (steps in the module's docs).

    Args:
        anatomy: the template's anatomy (:func:`scripts.lesions.anatomy.load_anatomy`).
        rng: the volume's generator (:func:`volume_rng`).
        load: its lesion load.
        downsample: factor on the drawn in-plane voxel size (slices at least as thick).
        shape: a fixed grid shape instead.

    Returns:
        the :class:`SyntheticVolume`.
    """
    grid = sample_grid(rng, anatomy.shape, anatomy.affine, downsample, shape)
    deformation = sample_deformation(rng, grid)
    region = brain_region(anatomy, grid, deformation)
    warped = warp_anatomy(anatomy, grid.crop(region), deformation)
    tissue = warped.tissue()
    maps = location_maps(tissue, grid.spacing)
    lesions = place_lesions(rng, warped, tissue, maps, load)
    image, appearance = render_flair(rng, warped, lesions.fraction, lesions.contrast, sample_contrast(rng))
    start = np.array([r.start for r in region])
    records = [{**lesion, "centre_voxel": (np.asarray(lesion["centre_voxel"]) + start).tolist()}  # on the whole grid
               for lesion in lesions.lesions]
    record = {
        "synthetic": True,
        "description": _SYNTHETIC,
        "lesion_load": load.name,
        "grid": {"shape": list(grid.shape), "spacing_mm": [round(s, 4) for s in grid.spacing],
                 "slice_thickness_mm": round(grid.spacing[2], 4)},
        "deformation": deformation.description,
        "appearance": appearance,
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "location_rule": {"periventricular_mm": PERIVENTRICULAR_MM, "juxtacortical_mm": JUXTACORTICAL_MM},
        "lesions_requested": lesions.requested,
        "lesion_count": len(lesions.lesions),
        "lesion_volume_ml": round(float(lesions.label.sum()) * grid.voxel_ml, 5),
        "brain_region": [[r.start, r.stop] for r in region],
        "lesions": records,
    }
    return SyntheticVolume(image=_pad(image, grid.shape, region), label=_pad(lesions.label, grid.shape, region),
                           tissue=_pad(tissue, grid.shape, region), affine=grid.affine, record=record)


def _pad(array: np.ndarray, shape: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
    """``array`` placed at ``region`` of a zero array of ``shape``."""
    out = np.zeros(shape, dtype=array.dtype)
    out[region] = array
    return out


def test_loads(training_load: str, test_load: str | None, n_test: int) -> list[str]:
    """The lesion load of each test volume: ``test_load`` for all, or (``None``) the other loads in turn."""
    if test_load is not None:
        return [test_load] * n_test
    others = [name for name in LESION_LOADS if name != training_load]
    return [others[i % len(others)] for i in range(n_test)]


def _check_arguments(train: int, val: int, test: int, loads: Sequence[str | None]) -> None:
    for option, value, low in (("--train", train, 1), ("--val", val, 0), ("--test", test, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{option} must be a whole number of at least {low}, got {value!r}.")
    for load in loads:
        if load is not None and load not in LESION_LOADS:
            raise ValueError(f"unknown lesion load {load!r}; use one of {', '.join(LESION_LOADS)}.")


def generate_dataset(
    anatomy: Anatomy,
    output: str | os.PathLike,
    train: int,
    test: int,
    seed: int = 0,
    val: int = 1,
    lesion_load: str = "mixed",
    test_lesion_load: str | None = None,
    downsample: float = 1.0,
    shape: Sequence[int] | None = None,
) -> Path:
    """Write a seeded synthetic dataset and its ``datalist.json`` (layout in the module's docs).

    Args:
        anatomy: the template's anatomy.
        output: the dataset folder.
        train: training volumes (at least 1).
        test: test volumes.
        seed: the dataset's seed.
        val: validation volumes (the training load, their own seeds).
        lesion_load: the load of the training and validation volumes (a key of
            :data:`scripts.lesions.lesions.LESION_LOADS`).
        test_lesion_load: the load of the test volumes; ``None``: the other loads in turn.
        downsample: factor on the drawn in-plane voxel size (2: about 2 mm; slices at least as thick).
        shape: a fixed grid shape instead.

    Returns:
        the datalist's path.

    Raises:
        ValueError: negative or non-integer counts, no training volume, an unknown load, or a bad grid option.
    """
    _check_arguments(train, val, test, (lesion_load, test_lesion_load))
    check_grid_options(downsample, shape)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; name a folder.")
    loads = {"training": [lesion_load] * train, "validation": [lesion_load] * val,
             "test": test_loads(lesion_load, test_lesion_load, test)}
    datalist: dict = {
        "description": "Synthetic FLAIR-like volumes with MS-like lesions (not patients' images), made from the "
                       "MNI152 2009a T1 and tissue maps by scripts.lesions.generate; see docs/lesion_workflow.md",
        "synthetic": True,
        "labels": {"0": "background", "1": "lesion"},
        "modality": {"0": "FLAIR (synthetic)"},
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "generator": {"seed": int(seed), "lesion_load": lesion_load, "test_lesion_load": test_lesion_load,
                      "downsample": float(downsample), "shape": None if shape is None else [int(s) for s in shape]},
        "training": [], "validation": [], "test": [],
    }
    for split, split_loads in loads.items():
        for index, load_name in enumerate(split_loads):
            started = time.perf_counter()
            case = f"{CASE_PREFIX[split]}_{index:03d}"
            volume = synthesize_volume(anatomy, volume_rng(seed, split, index), LESION_LOADS[load_name], downsample,
                                       shape)
            entry = {"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz",
                     "tissue": f"tissue/{case}_tissue.nii.gz", "lesions": f"lesions/{case}_lesions.json",
                     "lesion_load": load_name}
            save_nifti_atomic(volume.image, volume.affine, out / entry["image"])
            save_nifti_atomic(volume.label, volume.affine, out / entry["label"])
            save_nifti_atomic(volume.tissue, volume.affine, out / entry["tissue"])
            record = {"case": case, "split": split, "seed": [int(seed), SPLIT_CODES[split], index], **volume.record}
            atomic_write_json(record, out / entry["lesions"])
            datalist[split].append(entry)
            logger.info("%s: %s load, grid %s at %s mm, %d lesions (%.2f ml) in %.1f s", case, load_name,
                        record["grid"]["shape"], record["grid"]["spacing_mm"], record["lesion_count"],
                        record["lesion_volume_ml"], time.perf_counter() - started)
    return atomic_write_json(datalist, out / "datalist.json")



def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.lesions.generate``."""
    p = OneLineArgumentParser(prog="python -m scripts.lesions.generate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mni_dir", default="data/mni/raw",
                   help="folder of the MNI152 T1 and grey/white matter maps (python -m scripts.demo.data --which mni)")
    p.add_argument("--output", default="data/lesions", help="the dataset folder")
    p.add_argument("--train", type=int, default=8, help="training volumes (default 8)")
    p.add_argument("--val", type=int, default=1, help="validation volumes, training load (default 1)")
    p.add_argument("--test", type=int, default=4, help="test volumes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the dataset's seed (default 0)")
    p.add_argument("--lesion_load", default="mixed", choices=sorted(LESION_LOADS),
                   help="lesion load of the training and validation volumes (default mixed)")
    p.add_argument("--test_lesion_load", default=None, choices=sorted(LESION_LOADS),
                   help="lesion load of the test volumes (default: the other loads in turn)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--downsample", type=float, default=1.0,
                      help="factor on the drawn in-plane voxel size (slices at least as thick), e.g. 2 for a CPU demo "
                      "(default 1)")
    grid.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="a fixed grid shape instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Generate a dataset; print one line naming the datalist (or ``ERROR: ...`` and return 2 for bad input).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        _check_arguments(args.train, args.val, args.test, (args.lesion_load, args.test_lesion_load))
        check_grid_options(args.downsample, args.shape)
        anatomy = load_anatomy(args.mni_dir)
        datalist = generate_dataset(anatomy, args.output, args.train, args.test, args.seed, args.val,
                                    args.lesion_load, args.test_lesion_load, args.downsample, args.shape)
    except (CommandLineError, ValueError, OSError) as e:
        sys.stderr.write(f"ERROR: {' '.join(str(e).split())} (python -m scripts.lesions.generate --help)\n")
        return 2
    print(f"lesions: wrote {args.train} training, {args.val} validation and {args.test} test synthetic volumes; "
          f"datalist {datalist} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
