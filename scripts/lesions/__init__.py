# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Synthetic FLAIR-like volumes with MS-like lesions, made from a real brain's tissue maps (data tooling, not served
by MONAI Label): ``python -m scripts.lesions.generate`` (see docs/lesion_workflow.md, "Synthetic FLAIR lesions").

Modules, one job each: :mod:`~scripts.lesions.anatomy` (tissue classes, ventricles and the infratentorial region
from the maps), :mod:`scripts.hunet.locations` (tissue-map values and location classes, served with the lesion reports),
:mod:`~scripts.lesions.acquisition` (voxel grid, slice thickness, random deformation), :mod:`~scripts.lesions.lesions`
(lesion shapes, sizes and placement), :mod:`~scripts.lesions.appearance` (FLAIR-like contrast, bias field, blur,
noise) and :mod:`~scripts.lesions.generate` (one volume, a seeded dataset, the command line).
"""
