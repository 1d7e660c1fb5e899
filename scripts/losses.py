# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Losses of MambaClinix: the region-specific adaptive Tversky loss and the compound training loss.

MambaClinix (Bian et al., 2024, https://arxiv.org/abs/2409.12533, section 2.5) trains with
``CE + Dice + 0.8 * RS``, where RS is a Tversky loss evaluated separately on a fixed grid of sub-regions
(Eq. 16) with region-wise adaptive FP/FN penalties, under nnU-Net style deep supervision.

- :class:`RegionTverskyLoss`: the region-specific (adaptive) Tversky loss alone.
- :class:`DiceCERegionTverskyLoss`: ``lambda_ce * CE + lambda_dice * Dice + lambda_rs * RS`` on one output.
- :class:`MambaClinixLoss`: the compound loss on one output or on a list of deep-supervision outputs.
- :func:`deep_supervision_weights` and :data:`AUTHORS_REGION_GRID` (defined in :mod:`scripts.architecture`): the
  authors' deep-supervision weights and RS region grid.

All losses compute in (at least) float32 whatever the input dtype, so float16/bfloat16 network outputs under
AMP do not overflow the region sums.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss
from monai.networks import one_hot
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from scripts.architecture import AUTHORS_REGION_GRID, deep_supervision_weights

# deep_supervision_weights / AUTHORS_REGION_GRID: re-exported from scripts.architecture (the one definition)
__all__ = [
    "RegionTverskyLoss", "DiceCERegionTverskyLoss", "MambaClinixLoss", "deep_supervision_weights", "AUTHORS_REGION_GRID",
]

_POOLING_MODES = ("sum", "mean")


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def _as_region_grid(num_regions: int | Sequence[int]) -> int | tuple[int, ...]:
    """Validate ``num_regions`` at construction time: a positive int (broadcast later) or a tuple of them."""
    if isinstance(num_regions, int) and not isinstance(num_regions, bool):
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}.")
        return num_regions
    if not isinstance(num_regions, Sequence) or len(num_regions) == 0:
        raise ValueError(f"num_regions must be a positive int or a non-empty sequence of them, got {num_regions!r}.")
    grid = tuple(num_regions)
    if any(isinstance(r, bool) or int(r) != r or r < 1 for r in grid):
        raise ValueError(f"num_regions entries must be positive integers, got {num_regions!r}.")
    return tuple(int(r) for r in grid)


def _resolve_region_grid(
    num_regions: int | tuple[int, ...], spatial_shape: Sequence[int], clip: bool = False
) -> tuple[int, ...]:
    """The region grid for an input of ``spatial_shape``; raise if it does not fit (or clip it when ``clip``)."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    grid = (num_regions,) * len(spatial_shape) if isinstance(num_regions, int) else num_regions
    if len(grid) != len(spatial_shape):
        raise ValueError(
            f"num_regions {tuple(grid)} has {len(grid)} entries but the input has {len(spatial_shape)} spatial "
            f"dims {spatial_shape}; pass one region count per spatial axis (or a single int)."
        )
    if clip:
        return tuple(min(r, s) for r, s in zip(grid, spatial_shape))
    if any(r > s for r, s in zip(grid, spatial_shape)):
        raise ValueError(
            f"num_regions {tuple(grid)} is larger than the input spatial shape {spatial_shape} along some axis; "
            "use at most one region per voxel along each axis."
        )
    return tuple(grid)


def _region_bounds(length: int, regions: int) -> list[tuple[int, int]]:
    """Half-open bounds of the ``regions`` cells along an axis of ``length``, by the adaptive pooling rule
    ``[floor(i * L / R), ceil((i + 1) * L / R))`` (cells overlap by one voxel when L is not divisible by R)."""
    return [((i * length) // regions, -((-(i + 1) * length) // regions)) for i in range(regions)]


def _region_matrix(length: int, regions: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(regions, length) 0/1 membership matrix of the adaptive-pooling cells along one axis."""
    mat = torch.zeros(regions, length, device=device, dtype=dtype)
    for i, (start, stop) in enumerate(_region_bounds(length, regions)):
        mat[i, start:stop] = 1
    return mat


def _region_sums(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Sum ``x`` (B, C, *spatial) over the cells of the region grid: (B, C, *grid).

    The cells are exactly those of ``AdaptiveAvgPoolNd(grid)``; the sums are taken exactly (one small matrix
    product per axis) rather than recovered from the averages, so any number of spatial dims works.
    """
    for axis, regions in enumerate(grid):
        dim = axis + 2
        mat = _region_matrix(x.shape[dim], regions, x.device, x.dtype)
        x = torch.movedim(torch.movedim(x, dim, -1) @ mat.t(), -1, dim)
    return x


def _region_counts(
    spatial_shape: Sequence[int], grid: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Number of voxels of each cell of the region grid: shape ``grid``."""
    counts = torch.ones((), device=device, dtype=dtype)
    for length, regions in zip(spatial_shape, grid):
        sizes = torch.tensor([b - a for a, b in _region_bounds(int(length), regions)], device=device, dtype=dtype)
        counts = counts.unsqueeze(-1) * sizes
    return counts


def _compute_dtype(input: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input is float64 (the documented float32 island for half inputs)."""
    return torch.promote_types(input.dtype, torch.float32) if input.is_floating_point() else torch.float32


def _check_input_target(input: torch.Tensor, target: torch.Tensor, label_encoded: bool) -> None:
    """Shape checks shared by the losses: raise ``ValueError`` with what to change."""
    if input.dim() < 3:
        raise ValueError(f"input must have shape (B, C, *spatial) with at least one spatial dim, got {input.shape}.")
    if target.dim() != input.dim():
        raise ValueError(
            f"target must have as many dims as input, got input {tuple(input.shape)} and target "
            f"{tuple(target.shape)}; class-index targets need a channel dim: (B, 1, *spatial)."
        )
    if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        raise ValueError(
            f"target batch/spatial shape must match the input: input {tuple(input.shape)}, target "
            f"{tuple(target.shape)}; resample the label to the image grid."
        )
    n_pred_ch = input.shape[1]
    if label_encoded and target.shape[1] != 1:
        raise ValueError(
            f"with to_onehot_y=True the target must hold class indices with one channel (B, 1, *spatial), got "
            f"{target.shape[1]} channels; pass to_onehot_y=False for one-hot or multi-label targets."
        )
    if not label_encoded and target.shape[1] != n_pred_ch:
        raise ValueError(
            f"target has {target.shape[1]} channels but the input has {n_pred_ch}; with to_onehot_y=False the "
            "target must be one-hot / multi-channel like the input (or set to_onehot_y=True for class indices)."
        )


def _check_class_indices(target: torch.Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Class indices must be integers in [0, num_classes), except voxels equal to ``ignore_index``."""
    values = target if ignore_index is None else target[target != ignore_index]
    if values.numel() == 0:
        return
    if values.is_floating_point() and not torch.equal(values, torch.round(values)):
        raise ValueError("class-index targets must hold integer values; use nearest-neighbour resampling of labels.")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        extra = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(
            f"target class indices must be in [0, {num_classes - 1}]{extra} for {num_classes} output channels, "
            f"found values in [{low}, {high}]; check out_channels or the label values."
        )


def _prepare_target(
    target: torch.Tensor, num_classes: int, label_encoded: bool, ignore_index: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the (B, C, *spatial) float target, zero at ignored voxels, and the (B, 1, *spatial) valid mask
    (None without ``ignore_index``). A multi-channel target voxel is ignored when any channel equals ``ignore_index``.
    Class indices must have been checked with :func:`_check_class_indices`."""
    mask = None
    if ignore_index is not None:
        ignored = target == ignore_index
        if not label_encoded:
            ignored = ignored.any(dim=1, keepdim=True)
        target = torch.where(ignored, torch.zeros_like(target), target)
        mask = (~ignored).to(dtype)
    if label_encoded:
        target = one_hot(target, num_classes=num_classes, dtype=dtype)
    else:
        target = target.to(dtype)
    return target, mask


def _is_label_encoded(to_onehot_y: bool, input: torch.Tensor) -> bool:
    """Whether the target holds class indices to one-hot encode (``to_onehot_y`` with several channels)."""
    if to_onehot_y and input.dim() >= 2 and input.shape[1] == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
    return to_onehot_y and input.dim() >= 2 and input.shape[1] > 1


def _activate(input: torch.Tensor, softmax: bool, sigmoid: bool) -> torch.Tensor:
    input = input.to(_compute_dtype(input))
    if sigmoid:
        return torch.sigmoid(input)
    if softmax:
        if input.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            return input
        return torch.softmax(input, dim=1)
    return input


class RegionTverskyLoss(_Loss):
    """Region-specific (adaptive) Tversky loss of MambaClinix (Eq. 16 of the paper).

    Soft ``TP = p * g``, ``FP = p * (1 - g)`` and ``FN = (1 - p) * g`` of every class are summed inside the cells
    of a fixed ``num_regions`` grid (the cells of adaptive average pooling, so the image need not be divisible by
    the region counts; neighbouring cells then share one voxel), and over the batch when ``batch=True``.
    For every cell and class, with ``s = smooth``::

        adaptive:     alpha_r = alpha + beta * (FP + s) / (FP + FN + s)
                      beta_r  = alpha + beta * (FN + s) / (FP + FN + s)
        not adaptive: alpha_r, beta_r = alpha, beta
        T = (TP + s) / (TP + alpha_r * FP + beta_r * FN + s)

    and the loss of the cell is ``1 - T``. ``alpha`` weights false positives and ``beta`` false negatives
    (Eq. 15); the adaptive coefficients put the heavier penalty on the dominant error of each cell and are not
    detached from the graph (as in the authors' code).

    Normalisation: with ``pooling="mean"`` (default) the cell statistics are cell averages, as the authors'
    ``AdaptiveAvgPool`` computes them; ``pooling="sum"`` uses cell sums instead, so ``num_regions=1`` with
    ``adaptive=False`` equals ``monai.losses.TverskyLoss(alpha=alpha, beta=beta, smooth_nr=smooth,
    smooth_dr=smooth, batch=batch)`` with the same flags. ``"mean"`` is ``"sum"`` with ``smooth`` multiplied by
    the voxel count of each cell, i.e. a much weaker smoothing term (which matters in cells where a class is
    absent). The default grid is the authors' ``(8, 8, 14)`` (:data:`AUTHORS_REGION_GRID`), per array axis.

    Reference: Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for Enhanced
    3D Medical Image Segmentation", 2024, https://arxiv.org/abs/2409.12533.

    Args:
        num_regions: cells per spatial axis (an int is used for every axis); at most the image size per axis.
        alpha: base weight of false positives (>= 0).
        beta: base weight of false negatives (>= 0); ``alpha + beta`` must be > 0.
        include_background: if False, channel 0 (background) is excluded.
        to_onehot_y: convert a (B, 1, *spatial) class-index target to one-hot with ``input.shape[1]`` classes.
        softmax: apply a softmax over channels to the input (logits).
        sigmoid: apply a sigmoid to the input, for multi-label targets (pass the target already
            multi-channel with ``to_onehot_y=False``, and usually ``include_background=True``).
        batch: sum the statistics over the batch before computing the ratios (batch dice).
        smooth: smoothing term ``s`` (> 0) of the ratios above.
        adaptive: use the region-wise adaptive coefficients; if False, the fixed ``alpha`` and ``beta``.
        reduction: ``"mean"``: ``1 - mean(T)`` over cells, classes (and batch items); ``"sum"``: the sum of
            ``1 - T``; ``"none"``: the ``1 - T`` tensor, of shape (C', *grid) when ``batch=True`` and
            (B, C', *grid) otherwise (C' = classes after dropping the background).
        ignore_index: voxels whose target equals this value (for multi-channel targets: in any channel) are
            removed by zeroing prediction and target there.
        pooling: ``"mean"`` (default, the authors') or ``"sum"`` cell statistics, see above.
    """

    def __init__(
        self,
        num_regions: int | Sequence[int] = AUTHORS_REGION_GRID,
        alpha: float = 0.3,
        beta: float = 0.4,
        include_background: bool = False,
        to_onehot_y: bool = True,
        softmax: bool = True,
        sigmoid: bool = False,
        batch: bool = True,
        smooth: float = 1e-5,
        adaptive: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
        ignore_index: int | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if softmax and sigmoid:
            raise ValueError("softmax and sigmoid are mutually exclusive; set one of them to False.")
        self.num_regions = _as_region_grid(num_regions)
        self.alpha = _check_non_negative("alpha", alpha)
        self.beta = _check_non_negative("beta", beta)
        if self.alpha + self.beta <= 0:
            raise ValueError("alpha + beta must be > 0 (both zero make the loss constant).")
        smooth = float(smooth)
        if not math.isfinite(smooth) or smooth <= 0:
            raise ValueError(f"smooth must be a finite number > 0 (it keeps empty regions finite), got {smooth}.")
        self.smooth = smooth
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}.")
        if ignore_index is not None and int(ignore_index) != ignore_index:
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
        self.pooling = pooling
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.softmax = softmax
        self.sigmoid = sigmoid
        self.batch = batch
        self.adaptive = adaptive
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities without softmax/sigmoid) of shape (B, C, *spatial).
            target: (B, 1, *spatial) class indices with ``to_onehot_y=True``, else (B, C, *spatial).

        Returns:
            the loss in float32 (float64 for float64 inputs), reduced as ``reduction`` says.
        """
        label_encoded = _is_label_encoded(self.to_onehot_y, input)
        _check_input_target(input, target, label_encoded)
        grid = _resolve_region_grid(self.num_regions, input.shape[2:])
        if label_encoded:
            _check_class_indices(target, input.shape[1], self.ignore_index)
        probs = _activate(input, self.softmax, self.sigmoid)
        onehot, mask = _prepare_target(target, input.shape[1], label_encoded, self.ignore_index, probs.dtype)
        if mask is not None:
            probs = probs * mask
        return self.loss_from_probabilities(probs, onehot, grid)

    def loss_from_probabilities(
        self, probs: torch.Tensor, target: torch.Tensor, grid: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The loss from probabilities and a same-shape (one-hot) target, both already masked; no checks, no
        activation. ``grid`` defaults to ``num_regions`` resolved for the input (it must fit the input)."""
        if grid is None:
            grid = _resolve_region_grid(self.num_regions, probs.shape[2:])
        if not self.include_background:
            if probs.shape[1] == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                probs, target = probs[:, 1:], target[:, 1:]
        stats = torch.cat([probs * target, probs * (1 - target), (1 - probs) * target], dim=1)  # TP, FP, FN
        stats = _region_sums(stats, grid)
        if self.batch:
            stats = stats.sum(dim=0)
        if self.pooling == "mean":
            stats = stats / _region_counts(probs.shape[2:], grid, stats.device, stats.dtype)
        tp, fp, fn = stats.chunk(3, dim=-len(grid) - 1)
        s = self.smooth
        if self.adaptive:
            denom = fp + fn + s
            alpha = self.alpha + self.beta * (fp + s) / denom
            beta = self.alpha + self.beta * (fn + s) / denom
        else:
            alpha, beta = self.alpha, self.beta
        score = 1.0 - (tp + s) / (tp + alpha * fp + beta * fn + s)
        if self.reduction == LossReduction.MEAN.value:
            return score.mean()
        if self.reduction == LossReduction.SUM.value:
            return score.sum()
        if self.reduction == LossReduction.NONE.value:
            return score
        raise ValueError(f'Unsupported reduction: {self.reduction}, available options are ["mean", "sum", "none"].')


class DiceCERegionTverskyLoss(_Loss):
    """``lambda_ce * CE + lambda_dice * Dice + lambda_rs * RegionTversky`` on one network output.

    CE is the cross entropy of the softmax (``softmax=True``) or the binary cross entropy with logits
    (``sigmoid=True``, averaged over voxels and channels), Dice is ``monai.losses.DiceLoss`` (``batch`` dice,
    background excluded unless ``include_background``) and RS is :class:`RegionTverskyLoss`. With
    ``lambda_rs=0`` this is the CE + Dice baseline of the paper's Table 5; ``alpha=beta=0.5, adaptive=False``
    gives its region-specific Dice variant.

    Args:
        lambda_ce: weight of the cross entropy (>= 0).
        lambda_dice: weight of the Dice loss (>= 0).
        lambda_rs: weight of the region-specific Tversky loss (>= 0; 0 skips it).
        num_regions: region grid of the RS term, see :class:`RegionTverskyLoss`.
        alpha: FP weight of the RS term.
        beta: FN weight of the RS term.
        adaptive: region-wise adaptive RS coefficients.
        include_background: include channel 0 in Dice and RS (CE always uses all channels).
        softmax: multi-class outputs (CE); needs at least two output channels.
        sigmoid: multi-label outputs (BCE with logits); exclusive with ``softmax``.
        to_onehot_y: the target holds class indices (B, 1, *spatial).
        batch: batch dice for Dice and RS.
        smooth: smoothing term of Dice (``smooth_nr = smooth_dr``) and RS.
        ignore_index: voxels whose target equals this value are masked out of all three terms: CE/BCE is
            averaged over the remaining voxels only, Dice and RS see zero prediction and target there.
        pooling: ``"mean"`` (default, the authors') or ``"sum"`` region statistics of the RS term.
    """

    def __init__(
        self,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_rs: float = 0.8,
        num_regions: int | Sequence[int] = AUTHORS_REGION_GRID,
        alpha: float = 0.3,
        beta: float = 0.4,
        adaptive: bool = True,
        include_background: bool = False,
        softmax: bool = True,
        sigmoid: bool = False,
        to_onehot_y: bool = True,
        batch: bool = True,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if int(softmax) + int(sigmoid) != 1:
            raise ValueError(
                "set exactly one of softmax=True (multi-class, cross entropy) or sigmoid=True (multi-label, BCE)."
            )
        self.lambda_ce = _check_non_negative("lambda_ce", lambda_ce)
        self.lambda_dice = _check_non_negative("lambda_dice", lambda_dice)
        self.lambda_rs = _check_non_negative("lambda_rs", lambda_rs)
        self.softmax = softmax
        self.sigmoid = sigmoid
        self.to_onehot_y = to_onehot_y
        self.include_background = include_background
        self.region_tversky = RegionTverskyLoss(
            num_regions=num_regions,
            alpha=alpha,
            beta=beta,
            include_background=include_background,
            to_onehot_y=False,
            softmax=False,
            sigmoid=False,
            batch=batch,
            smooth=smooth,
            adaptive=adaptive,
            ignore_index=None,
            pooling=pooling,
        )
        if ignore_index is not None and int(ignore_index) != ignore_index:
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=False,
            softmax=False,
            sigmoid=False,
            batch=batch,
            smooth_nr=smooth,
            smooth_dr=smooth,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (B, C, *spatial).
            target: (B, 1, *spatial) class indices with ``to_onehot_y=True``, else (B, C, *spatial).

        Returns:
            the scalar loss (float32, float64 for float64 inputs).
        """
        return self.level_loss(input, target, clip_regions=False)

    def level_loss(self, input: torch.Tensor, target: torch.Tensor, clip_regions: bool = False) -> torch.Tensor:
        """The loss of one output; ``clip_regions`` clips the RS grid to the input size (deep-supervision
        levels smaller than the grid) instead of raising."""
        if self.softmax and input.dim() >= 2 and input.shape[1] < 2:
            raise ValueError(
                "softmax=True needs at least 2 output channels (background + classes); "
                "use sigmoid=True for a single-channel binary output."
            )
        label_encoded = _is_label_encoded(self.to_onehot_y, input)
        _check_input_target(input, target, label_encoded)
        grid = None
        if self.lambda_rs > 0:
            grid = _resolve_region_grid(self.region_tversky.num_regions, input.shape[2:], clip=clip_regions)
        if label_encoded:
            _check_class_indices(target, input.shape[1], self.ignore_index)
        logits = input.to(_compute_dtype(input))
        onehot, mask = _prepare_target(target, input.shape[1], label_encoded, self.ignore_index, logits.dtype)
        n_valid = onehot[:, :1].numel() if mask is None else mask.sum()

        if self.sigmoid:
            probs = torch.sigmoid(logits)
            ce_map = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            norm = n_valid * logits.shape[1]
        else:
            probs = torch.softmax(logits, dim=1)
            ce_map = -(onehot * torch.log_softmax(logits, dim=1))  # onehot is 0 at ignored voxels
            norm = n_valid
        if mask is not None:
            ce_map = ce_map * mask
            probs = probs * mask
            norm = norm.clamp_min(1)
        loss = self.lambda_ce * ce_map.sum() / norm
        loss = loss + self.lambda_dice * self.dice(probs, onehot)
        if self.lambda_rs > 0:
            loss = loss + self.lambda_rs * self.region_tversky.loss_from_probabilities(probs, onehot, grid)
        return loss


class MambaClinixLoss(DeepSupervisionLoss):
    """The MambaClinix training loss: ``lambda_ce * CE + lambda_dice * Dice + lambda_rs * RegionTversky``
    (:class:`DiceCERegionTverskyLoss`) on one output or on a list of deep-supervision outputs.

    With a list (full resolution first) the target is resized to each level by ``interp_mode`` ("nearest")
    interpolation (``monai.losses.DeepSupervisionLoss``) and the level losses are weighted by
    :func:`deep_supervision_weights` (``1/2**i``, lowest level 0, normalised; a list of one output gets weight 1)
    unless ``ds_weights`` are given. Levels smaller than the region grid along an axis use one region per voxel
    on that axis; the full-resolution output must fit the grid.

    Args:
        lambda_ce: weight of the cross entropy (>= 0).
        lambda_dice: weight of the Dice loss (>= 0).
        lambda_rs: weight of the region-specific Tversky loss (>= 0).
        num_regions: region grid of the RS term per spatial axis (an int for every axis).
        alpha: FP weight of the RS term.
        beta: FN weight of the RS term.
        adaptive: region-wise adaptive RS coefficients.
        include_background: include channel 0 in Dice and RS.
        softmax: multi-class outputs with cross entropy.
        sigmoid: multi-label outputs with BCE; exclusive with ``softmax``.
        to_onehot_y: the target holds class indices (B, 1, *spatial).
        batch: batch dice for Dice and RS.
        smooth: smoothing term of Dice and RS.
        ignore_index: target value whose voxels are masked out of all terms.
        ds_weights: explicit weights, one per deep-supervision output (full resolution first), used as given.
        pooling: ``"mean"`` (default, the authors') or ``"sum"`` region statistics of the RS term (see
            :class:`RegionTverskyLoss`).
    """

    def __init__(
        self,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_rs: float = 0.8,
        num_regions: int | Sequence[int] = AUTHORS_REGION_GRID,
        alpha: float = 0.3,
        beta: float = 0.4,
        adaptive: bool = True,
        include_background: bool = False,
        softmax: bool = True,
        sigmoid: bool = False,
        to_onehot_y: bool = True,
        batch: bool = True,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        ds_weights: Sequence[float] | None = None,
        pooling: str = "mean",
    ) -> None:
        level_loss = DiceCERegionTverskyLoss(
            lambda_ce=lambda_ce,
            lambda_dice=lambda_dice,
            lambda_rs=lambda_rs,
            num_regions=num_regions,
            alpha=alpha,
            beta=beta,
            adaptive=adaptive,
            include_background=include_background,
            softmax=softmax,
            sigmoid=sigmoid,
            to_onehot_y=to_onehot_y,
            batch=batch,
            smooth=smooth,
            ignore_index=ignore_index,
            pooling=pooling,
        )
        if ds_weights is not None:
            ds_weights = [_check_non_negative("ds_weights entries", w) for w in ds_weights]
            if len(ds_weights) == 0 or sum(ds_weights) <= 0:
                raise ValueError("ds_weights must be a non-empty list of weights >= 0 with a positive sum.")
        super().__init__(loss=level_loss, weights=ds_weights)
        self.interp_mode = "nearest"

    def get_weights(self, levels: int = 1) -> list[float]:
        """Weights of ``levels`` deep-supervision outputs: ``ds_weights`` when given, else the authors' scheme."""
        if self.weights is None:
            return deep_supervision_weights(levels)
        if len(self.weights) != levels:
            raise ValueError(
                f"ds_weights has {len(self.weights)} entries but the network returned {levels} outputs; "
                "pass one weight per deep-supervision output (full resolution first)."
            )
        return list(self.weights)

    def get_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one level: the target is resized to the level, the region grid clipped to its size."""
        if input.shape[2:] != target.shape[2:]:
            target = F.interpolate(target, size=input.shape[2:], mode=self.interp_mode)
        return self.loss.level_loss(input, target, clip_regions=True)

    def forward(self, input: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (B, C, *spatial), or a list/tuple of them from a deeply supervised network, full
                resolution first (the first must match the target's spatial shape).
            target: full-resolution target, (B, 1, *spatial) class indices with ``to_onehot_y=True``.

        Returns:
            the scalar loss (float32).
        """
        if isinstance(input, (list, tuple)):
            if len(input) == 0:
                raise ValueError("input is an empty list; pass the network output(s).")
            first = input[0]
        elif isinstance(input, torch.Tensor):
            first = input
        else:
            raise ValueError(f"input must be a tensor or a list/tuple of tensors, got {type(input).__name__}.")
        if target.shape[2:] != first.shape[2:]:
            raise ValueError(
                f"the target spatial shape {tuple(target.shape[2:])} must match the first (full-resolution) "
                f"output {tuple(first.shape[2:])}; order deep-supervision outputs full resolution first."
            )
        if self.loss.lambda_rs > 0:
            _resolve_region_grid(self.loss.region_tversky.num_regions, first.shape[2:])
        # float target: nearest interpolation of class indices is exact and works for every dtype
        return super().forward(input if isinstance(input, torch.Tensor) else list(input), target.float())
