# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""``python -m scripts.gpu_check --out DIR``: what runs on a GPU machine, and how well (a script, not a test).

Made for GPUs lent for a few minutes: by default it stays within 8 minutes on one GPU (150 s on a CPU, where it runs
with the CPU fall-backs and small sizes), each section runs behind its own ``try`` (an error is recorded and the
next section runs), and ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten atomically after every
section, so an interrupted run still leaves its results. Sections, in order:

- ``environment`` (:mod:`~scripts.gpu_check.environment`): GPUs, driver, torch / CUDA / cuDNN, whether mamba-ssm's
  and causal-conv1d's kernels import, the scan backend and Mamba path the bundle picks here.
- ``parity`` (:mod:`~scripts.gpu_check.parity`): the selective-scan backends (chunked, naive on CPU, mamba-ssm's
  CUDA kernel) and Mamba's pure and fused paths, values and gradients in float32 and under AMP, against float64,
  with mamba-ssm's tolerances.
- ``amp_training`` (:mod:`~scripts.gpu_check.training`): training steps of the bundle's network, loss and optimizer
  under autocast on a fixed batch (default 6-stage plan at 128^3 on CUDA): finite losses that fall.
- ``timing`` (:mod:`~scripts.gpu_check.timing`): forward and training-step time and peak CUDA memory of MambaClinix
  per backend against SwinUNETR and DynUNet, interleaved.
- ``sliding_window`` (:mod:`~scripts.gpu_check.sliding`): sliding-window inference of a 1x1x256^3 volume.
- ``distributed`` (:mod:`~scripts.gpu_check.distributed`): a 2-process NCCL ``torchrun`` of the bundle's training
  with ``configs/multi_gpu_train.yaml`` when 2 GPUs are present.

Other modules: :mod:`~scripts.gpu_check.plans` (the networks, built from ``configs/train.yaml``),
:mod:`~scripts.gpu_check.budget` (the time budget), :mod:`~scripts.gpu_check.runner` (the run, statuses and exit
status), :mod:`~scripts.gpu_check.report` (the files) and :mod:`~scripts.gpu_check.cli` (the command line).
Exit status: 1 when a parity, AMP-training or distributed check failed or raised, 2 for bad arguments, else 0.
Importing the package imports none of its modules.
"""
