# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the bundle: resumable latest checkpoint (single-process and torchrun alike), best model,
distributed validation with fewer cases than ranks, training curves plot, metrics JSON."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.metrics import Cumulative, compute_confusion_matrix_metric
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim.lr_scheduler import PolynomialLR

from .image_guard import DataError
from .io_utils import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temp_files
from .metrics import AGGREGATION, finite_mean, summarise

__all__ = [
    "BestModelSaver", "LatestCheckpoint", "loads_checkpoint", "continue_poly_schedule", "unwrap_module",
    "ValidationShardSampler", "IgnoreStandIn", "TrainingCurves", "MetricsJSONWriter",
    "GradientClipping", "MainProcessOnly",
]

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    """Whether this process writes files: rank 0 of a torchrun group, or a single process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap_module(obj):
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper; any other object as is."""
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return obj.module
    return obj


def continue_poly_schedule(scheduler: PolynomialLR, total_iters: int, power: float) -> list[float]:
    """Put a resumed :class:`~torch.optim.lr_scheduler.PolynomialLR` on the polynomial curve of the current run.

    A restored scheduler keeps the ``total_iters`` (and ``power``) of the run that saved it, so a finished run
    extended with more epochs would stay at learning rate 0 (PyTorch steps the polynomial multiplicatively from
    the current rate). This sets ``total_iters`` and ``power`` to the current run's values and the rate of every
    parameter group to the closed form at the resumed position ``e = scheduler.last_epoch`` (epochs done)::

        lr = base_lr * (1 - min(e, total_iters) / total_iters) ** power

    so the following steps continue on the curve over the new total, as if the run had been planned that long.

    Args:
        scheduler: the restored scheduler (its optimizer's state restored too).
        total_iters: the current run's number of scheduler steps (epochs).
        power: the current run's polynomial power.

    Returns:
        the learning rate of each parameter group for the next epoch.
    """
    if total_iters < 1:
        raise ValueError(f"total_iters must be a positive number of epochs, got {total_iters}.")
    scheduler.total_iters, scheduler.power = total_iters, power
    factor = (1.0 - min(scheduler.last_epoch, total_iters) / total_iters) ** power
    lrs = [base_lr * factor for base_lr in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() and MONAI's LrScheduleHandler report
    return lrs


def loads_checkpoint(engine: Engine) -> bool:
    """Whether a :class:`monai.handlers.CheckpointLoader` runs when ``engine`` starts (a fine-tuning run)."""
    handlers = getattr(engine, "_event_handlers", {}).get(Events.STARTED, [])
    return any(isinstance(h[0], CheckpointLoader) for h in handlers)


class LatestCheckpoint:
    """Save the full training state every epoch and resume from it.

    At every ``save_interval`` epochs the state of every object of ``save_dict`` (network, optimizer, LR
    scheduler, trainer, ...) is written to ``path`` atomically (by rank 0 only under torchrun). A network is
    stored unwrapped (no ``module.`` prefix of ``DistributedDataParallel``), so a checkpoint of a torchrun run
    resumes a single-process run and the other way round; checkpoints with DDP's ``module.`` keys load too.
    With ``resume=True`` and an existing file, the state is loaded when the trainer starts
    (``weights_only=True``), so the run continues after the last completed epoch. The current run's length
    wins over the checkpoint's: the trainer's ``max_epochs`` is kept, and a ``PolynomialLR`` keeps the current
    ``total_iters`` and ``power`` and continues on that curve (:func:`continue_poly_schedule`), so a finished
    run extended with more epochs trains on at a learning rate above 0.
    A run that also loads weights with a ``CheckpointLoader`` attached before this handler (e.g. MONAI Label's
    training from ``models/model.pt``) is a fine-tuning run: it starts at epoch 0 from those weights instead.
    When the trainer starts, temporary files of an interrupted save of ``path`` are removed
    (:func:`scripts.io_utils.remove_stale_temp_files`).

    Args:
        path: checkpoint file, e.g. ``models/checkpoint_latest.pt``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler, ...); the engine
            it is attached to is added as ``"trainer"``, so the epoch count resumes too.
        resume: load ``path`` at start if it exists.
        save_interval: epochs between saves.
    """

    def __init__(self, path: str | os.PathLike, save_dict: Mapping, resume: bool = True, save_interval: int = 1) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save_interval = save_interval

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def save(self, engine: Engine) -> None:
        if not _is_main_process():
            return  # every rank holds the same state; rank 0 writes it
        atomic_torch_save({k: unwrap_module(v).state_dict() for k, v in self.save_dict.items()}, self.path)
        logger.info("epoch %d: saved the training state to %s", engine.state.epoch, self.path)

    def load(self, engine: Engine) -> None:
        if _is_main_process():
            remove_stale_temp_files(self.path)
        if not (self.resume and self.path.is_file()):
            return
        if loads_checkpoint(engine):
            logger.info("weights loaded by a CheckpointLoader: fine-tuning from epoch 0, not resuming %s", self.path)
            return
        max_epochs = engine.state.max_epochs
        schedules = {k: (v.total_iters, v.power) for k, v in self.save_dict.items() if isinstance(v, PolynomialLR)}
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks {missing}; delete it or start with resume=False.")
        for key, obj in self.save_dict.items():
            if isinstance(obj, torch.nn.Module):  # a checkpoint of a wrapped DDP network holds module. keys
                consume_prefix_in_state_dict_if_present(checkpoint[key], "module.")
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)  # unwraps a DDP network itself
        if "trainer" in self.save_dict:
            engine.state.max_epochs = max_epochs
        logger.info("resumed from %s after epoch %d of %d", self.path, engine.state.epoch, max_epochs)
        for key, (total_iters, power) in schedules.items():
            lrs = continue_poly_schedule(self.save_dict[key], total_iters, power)
            logger.info("%s continues the polynomial schedule over %d epochs at learning rate %.6g",
                        key, total_iters, lrs[0])


class MainProcessOnly:
    """Attach ``handler`` only in the process that logs and writes files: rank 0 under torchrun, or the only
    process. Handlers that every rank needs (LR schedule, gradient clipping, validation, the resumable checkpoint)
    are listed as they are; loggers, plots and the trainer's final-weights saver are wrapped, so a config selects
    handlers by what they are, not by their position in the list (MONAI Label inserts a ``CheckpointLoader`` at
    its head). A dictionary entry of a handler list, also for a handler object built elsewhere::

        - _target_: scripts.handlers.MainProcessOnly
          handler: '@validate#best_model_saver'

    Args:
        handler: any object with ``attach(engine)``.
    """

    def __init__(self, handler) -> None:
        if not callable(getattr(handler, "attach", None)):
            raise ValueError(f"MainProcessOnly needs an object with attach(engine), got {type(handler).__name__}.")
        self.handler = handler

    def attach(self, engine: Engine) -> None:
        if _is_main_process():
            self.handler.attach(engine)


class BestModelSaver:
    """Keep the weights with the best validation key metric in ``path`` (e.g. ``models/model.pt``).

    Attached to an evaluator, it compares the evaluator's key metric after every run and writes the network's
    ``state_dict`` atomically when it improves. Attached to a trainer too, it writes the final weights at the
    end of training if no validation ever ran (e.g. MONAI Label training without a validation split), so the
    served model is always refreshed. Its ``state_dict`` (best metric and epoch) is part of the resumable
    checkpoint, so a resumed run does not forget its best model. When the trainer starts, temporary files of an
    interrupted save of ``path`` are removed (:func:`scripts.io_utils.remove_stale_temp_files`).

    Args:
        path: weights file.
        network: the network (a DDP-wrapped network is unwrapped).
        metric_name: metric to compare; default the evaluator's key metric.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, metric_name: str | None = None) -> None:
        self.path = Path(path)
        self.network = network
        self.metric_name = metric_name
        self.best_metric = -math.inf
        self.best_epoch = -1
        self._trainer: Engine | None = None

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])

    def attach(self, engine: Engine) -> None:
        from monai.engines import Trainer

        if isinstance(engine, Trainer):
            self._trainer = engine
            engine.add_event_handler(Events.STARTED, self._start)
            engine.add_event_handler(Events.COMPLETED, self._final)
        else:
            engine.add_event_handler(Events.COMPLETED, self._compare)

    def _start(self, engine: Engine) -> None:
        if _is_main_process():
            remove_stale_temp_files(self.path)

    def _weights(self) -> dict:
        return unwrap_module(self.network).state_dict()

    def _compare(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(name) if name else None
        if value is None or not math.isfinite(float(value)):
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else engine.state.epoch
        if float(value) > self.best_metric:
            self.best_metric, self.best_epoch = float(value), int(epoch)
            atomic_torch_save(self._weights(), self.path)
            logger.info("new best %s %.4f at epoch %d (validation on the network's resampled grid, for model "
                        "selection; evaluation reports in each case's original geometry): saved %s", name,
                        self.best_metric, epoch, self.path)

    def _final(self, engine: Engine) -> None:
        if self.best_epoch < 0:
            atomic_torch_save(self._weights(), self.path)
            logger.info("no validation ran: saved the final weights to %s", self.path)


class ValidationShardSampler(torch.utils.data.Sampler[int]):
    """This rank's share of the validation cases under torchrun: rank ``r`` of ``R`` gets cases ``r, r + R, ...``,
    so every case is validated exactly once over all ranks (no padding with repeated cases).

    With fewer cases than ranks, a rank without a case still has to run its evaluator: MONAI's cumulative metrics
    (``MeanDice`` & co.) ``all_gather`` every rank's per-case rows when they are computed, and a rank without rows
    either skips that collective (the other ranks then wait forever) or fails to stack an empty buffer. Such a rank
    gets case 0 as a *stand-in* (``stand_in`` is True) and :class:`IgnoreStandIn` turns the stand-in's metric rows
    into NaN, which every reduction of MONAI's metrics skips, so the metric is the mean over the real cases.
    ``monai.data.DistributedSampler`` either pads with repeated cases (``even_divisible=True``: they are counted
    twice) or refuses fewer cases than ranks (``even_divisible=False``).

    Args:
        data_source: the validation dataset (only its length is used).
        num_replicas: number of ranks; default the torch.distributed world size (1 without a process group).
        rank: this rank; default the torch.distributed rank (0 without a process group).
    """

    def __init__(self, data_source: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if grouped else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if grouped else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas - 1] = [0, {self.num_replicas - 1}], got {self.rank}.")
        size = len(data_source)
        self.indices = list(range(self.rank, size, self.num_replicas))
        self.stand_in = size > 0 and not self.indices
        if self.stand_in:
            self.indices = [0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class IgnoreStandIn:
    """Evaluator handler: on a rank whose :class:`ValidationShardSampler` validates a stand-in case, replace the
    rows the stand-in added to each metric's buffer by NaN, so the metrics gathered over all ranks count every
    real case exactly once (MONAI's metric reductions skip NaN; per-case details show the stand-in as a NaN row).

    Attach it after the metrics (as one of the evaluator's ``val_handlers``: the metrics update first in every
    iteration).

    Args:
        sampler: the evaluator data loader's sampler.
        metrics: the evaluator's metric handlers (e.g. ``@validate#key_metric``), MONAI cumulative metrics.
    """

    def __init__(self, sampler: ValidationShardSampler, metrics: Mapping[str, object]) -> None:
        self.sampler = sampler
        self.metrics = dict(metrics)
        for name, metric in self.metrics.items():
            if not isinstance(getattr(metric, "metric_fn", None), Cumulative):
                raise ValueError(f"metric {name!r} ({type(metric).__name__}) is not a MONAI cumulative metric "
                                 "handler (e.g. MeanDice); IgnoreStandIn cannot exclude a stand-in case from it.")

    def attach(self, engine: Engine) -> None:
        if self.sampler.stand_in:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._blank)

    def _blank(self, engine: Engine) -> None:
        for name, metric in self.metrics.items():
            fn = metric.metric_fn
            buffers = fn._buffers or []  # Cumulative has no public way to edit its local rows
            if any(not torch.is_floating_point(x) for b in buffers for x in b):
                raise ValueError(f"metric {name!r} keeps non-float rows; a stand-in case cannot be set to NaN.")
            fn._buffers = [[torch.full_like(x, float("nan")) for x in b] for b in buffers] if buffers else None


class TrainingCurves:
    """Record the mean training loss per epoch and the validation key metric, and plot them to a PNG.

    The history is kept in ``<output_dir>/training_curves.json`` (rewritten after every epoch and validation)
    and drawn to ``<output_dir>/training_curves.png`` when training completes. The validation metric is read
    when the validator's own run completes (its metrics are computed by then), and a resumed run's history is
    picked up when its first epoch starts (the training state is restored by then), so the handler's position
    in the trainer's handler list does not matter. A resumed run keeps the recorded curves up to the epoch it
    resumes after; a run from epoch 0 starts a new history.

    Args:
        output_dir: folder for the JSON and PNG.
        validator: the evaluator whose key metric (else its first metric) is recorded after each of its runs.
        loss_key: key of the loss in the trainer's output.
    """

    def __init__(self, output_dir: str | os.PathLike, validator: Engine | None = None, loss_key: str = "loss") -> None:
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.loss_key = loss_key
        self.history: dict[str, list] = {"epoch": [], "loss": [], "val_epoch": [], "val_metric": []}
        self._losses: list[float] = []
        self._trainer: Engine | None = None
        self._synced = False

    @property
    def json_path(self) -> Path:
        return self.output_dir / "training_curves.json"

    @property
    def png_path(self) -> Path:
        return self.output_dir / "training_curves.png"

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validation)

    def _start(self, engine: Engine) -> None:
        for path in (self.json_path, self.png_path):
            remove_stale_temp_files(path)
        self._synced = False
        self._losses = []

    def _sync(self, epochs_done: int) -> None:
        """Once per run, after every handler's ``STARTED``: the history up to ``epochs_done`` epochs (the
        recorded curves of a resumed run) or an empty one (a run from epoch 0)."""
        if self._synced:
            return
        self._synced = True
        if epochs_done > 0 and self.json_path.is_file():
            with open(self.json_path) as f:
                old = json.load(f)
            self.history = {k: [v for v, e in zip(old[k], old["epoch" if k in ("epoch", "loss") else "val_epoch"])
                                if e <= epochs_done] for k in self.history}
        elif epochs_done == 0:
            self.history = {k: [] for k in self.history}

    def _epoch_started(self, engine: Engine) -> None:
        self._sync(engine.state.epoch - 1)

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            if isinstance(item, Mapping) and self.loss_key in item:
                self._losses.append(float(torch.as_tensor(item[self.loss_key]).detach()))
                break

    def _epoch(self, engine: Engine) -> None:
        if self._losses:
            self.history["epoch"].append(engine.state.epoch)
            self.history["loss"].append(sum(self._losses) / len(self._losses))
        self._losses = []
        atomic_write_json(self.history, self.json_path, indent=1)

    def _validation(self, validator: Engine) -> None:
        if self._trainer is None:
            return
        self._sync(self._trainer.state.epoch)
        metrics = validator.state.metrics
        metric = metrics.get(getattr(validator.state, "key_metric_name", None) or "")
        if metric is None and metrics:
            metric = next(iter(metrics.values()))
        if metric is not None and math.isfinite(float(metric)):
            self.history["val_epoch"].append(self._trainer.state.epoch)
            self.history["val_metric"].append(float(metric))
            atomic_write_json(self.history, self.json_path, indent=1)

    def _completed(self, engine: Engine) -> None:
        self._sync(engine.state.epoch)
        self._plot()

    def _plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(self.history["epoch"], self.history["loss"], "-o", color="tab:blue", ms=3, label="training loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("training loss", color="tab:blue")
        ax1.grid(alpha=0.3)
        if self.history["val_metric"]:
            ax2 = ax1.twinx()
            ax2.plot(self.history["val_epoch"], self.history["val_metric"], "-s", color="tab:red", ms=4,
                     label="validation mean Dice (resampled grid)")
            ax2.set_ylabel("validation mean Dice (resampled grid)", color="tab:red")
            ax2.set_ylim(0, 1)
        ax1.set_title("MambaClinix training")
        fig.tight_layout()
        path = self.png_path
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        logger.info("wrote %s", path)
        return path


class MetricsJSONWriter:
    """Write an evaluator's per-case metrics and their summary to JSON (and CSV) when its run completes.

    The per-case values come from one of two sources:

    - ``case_metrics``: a function ``(pred, label, spacing) -> dict`` of one case, applied to each case of the
      evaluator's output after post-processing (``pred`` and ``label`` on the same grid, ``spacing`` the
      label's voxel size from its affine). A value is a number (one column ``<metric>``, e.g.
      :func:`scripts.hunet.report.case_metrics`) or a mapping from class name to number (columns
      ``<metric>_<class>`` and ``<metric>_mean``, the case's mean over its classes; e.g.
      :class:`scripts.metrics.SegmentationMetrics`).
    - ``case_metrics=None``: the metric handlers' per-case details, ``engine.state.metric_details`` (filled by
      MONAI's ignite metrics with ``save_details=True``, their default), one column per class as above; raw
      confusion matrices (``ConfusionMatrix`` handlers) become the metric their name contains (sensitivity,
      specificity, precision or accuracy) per case and class.

    Every row also has ``case`` (the file name of the case's image, else of its label) and ``image`` (that
    file's path as read). The summary aggregates every metric by one rule, :data:`scripts.metrics.AGGREGATION`
    (:func:`scripts.metrics.summarise`): per class, the mean over the cases; then the mean over the classes. The
    JSON is ``{**extra, "aggregation": rule, "cases": rows, "summary": summary}`` plus ``mean_dice`` (the summary
    mean of the metric named ``dice`` or ending with ``mean_dice``, when there is one), written with
    :func:`scripts.io_utils.atomic_write_json` (NaN as ``null``); the CSV holds the same rows, the log the same
    summary, with the same class names.

    Args:
        output_path: the JSON file, e.g. ``eval/metrics.json``.
        class_names: names of the classes of the metric handlers' details, in channel order (``class_1``,
            ``class_2``, ... when ``None``); ``case_metrics`` name their classes themselves.
        summary_path: optional second JSON with ``mean_dice``, the aggregation rule and the summary (e.g.
            ``eval/summary.json``).
        case_metrics: per-case metric function (see above); ``None`` reads the metric handlers' details.
        metrics: the metrics summarised (default every one); per-case rows keep every column.
        pred_key: key of the prediction in the evaluator's output (with ``case_metrics``).
        label_key: key of the reference label in the evaluator's output (with ``case_metrics``).
        csv_path: optional CSV file of the per-case rows.
        extra: constant entries at the top of the JSON (e.g. ``{"hd95_unit": "mm"}``; a ``<metric>_unit`` entry
            is also shown in the log).

    Raises:
        ValueError: ``case_metrics`` is not callable; when writing, ``class_names`` whose count differs from the
            classes of a metric's details.
        scripts.image_guard.DataError: ``case_metrics`` refuses a case (e.g. a label on another grid than its
            prediction), naming the case's file.
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        summary_path: str | os.PathLike | None = None,
        case_metrics: Callable[..., Mapping[str, float | Mapping[str, float]]] | None = None,
        metrics: Sequence[str] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        csv_path: str | os.PathLike | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        if case_metrics is not None and not callable(case_metrics):
            raise ValueError(f"case_metrics must be a function (pred, label, spacing) -> dict, got {case_metrics!r}.")
        self.output_path = Path(output_path)
        self.summary_path = Path(summary_path) if summary_path else None
        self.csv_path = Path(csv_path) if csv_path else None
        self.class_names = [str(c) for c in class_names] if class_names else None
        self.case_metrics = case_metrics
        self.metrics = list(metrics) if metrics is not None else None
        self.pred_key, self.label_key = pred_key, label_key
        self.extra = dict(extra or {})
        self._files: list[str] = []
        self._values: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._files, self._values = [], []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            if not isinstance(item, Mapping):
                continue
            name = _case_file(item, ("image", self.label_key), f"case_{len(self._files)}")
            self._files.append(name)
            if self.case_metrics is not None:
                label = item[self.label_key]
                try:
                    values = dict(self.case_metrics(item[self.pred_key], label, _spacing_of(label)))
                except ValueError as e:  # e.g. a label file on another grid than its image: bad data, one line
                    raise DataError(f"{name}: {e}") from e
                self._values.append(values)
                logger.info("%s: %s", Path(name).name, {k: _rounded_value(values[k]) for k in self._summarised(values)})

    def _summarised(self, names) -> list[str]:
        return [m for m in names if self.metrics is None or m in self.metrics]

    def _detail_values(self, engine: Engine) -> list[dict]:
        """Per-case ``{metric: {class: value}}`` from the metric handlers' per-case, per-class details."""
        details = getattr(engine.state, "metric_details", {}) or {}
        cases: list[dict] = []
        for metric in details:
            values = torch.as_tensor(details[metric]).float().cpu()
            if values.ndim == 3 and values.shape[-1] == 4:  # raw confusion matrices (tp, fp, tn, fn) per case/class
                name = next((m for m in ("sensitivity", "specificity", "precision", "accuracy") if m in metric), None)
                if name is None:
                    continue
                values = compute_confusion_matrix_metric(name, values)
            if values.ndim == 1:
                values = values[:, None]
            n_cls = values.shape[1]
            if self.class_names is not None and len(self.class_names) != n_cls:
                raise ValueError(f"class_names {self.class_names} name {len(self.class_names)} classes but {metric} has "
                                 f"{n_cls}; give one name per class without background (out_channels - 1).")
            names = self.class_names or [f"class_{i + 1}" for i in range(n_cls)]
            for i in range(values.shape[0]):
                while len(cases) <= i:
                    cases.append({})
                cases[i][metric] = {c: float(values[i, j]) for j, c in enumerate(names)}
        return cases

    def _rows_and_summary(self, cases: list[dict]) -> tuple[list[dict], dict]:
        rows: list[dict] = []
        for i, values in enumerate(cases):
            file = self._files[i] if i < len(self._files) else f"case_{i}"
            row: dict = {"case": Path(file).name, "image": file}
            for metric, v in values.items():
                if isinstance(v, Mapping):
                    row.update({f"{metric}_{c}": _num_or_nan(x) for c, x in v.items()})
                    row[f"{metric}_mean"] = finite_mean(v)
                else:
                    row[metric] = v
            rows.append(row)
        summary: dict = {}
        for metric in self._summarised(dict.fromkeys(m for values in cases for m in values)):
            per_case = [values.get(metric, math.nan) for values in cases]
            if any(isinstance(v, Mapping) for v in per_case):
                classes = list(dict.fromkeys(c for v in per_case if isinstance(v, Mapping) for c in v))
                table = [[_num_or_nan(v.get(c, math.nan)) if isinstance(v, Mapping) else math.nan for c in classes]
                         for v in per_case]
                summary[metric] = summarise(np.asarray(table, dtype=np.float64).reshape(len(per_case), -1), classes)
            else:
                summary[metric] = summarise(np.asarray([_num_or_nan(v) for v in per_case], dtype=np.float64))
        return rows, summary

    def _write(self, engine: Engine) -> None:
        cases = self._values if self.case_metrics is not None else self._detail_values(engine)
        rows, summary = self._rows_and_summary(cases)
        result = {**self.extra, "aggregation": AGGREGATION, "cases": rows, "summary": summary}
        dice_key = next((k for k in summary if k == "dice" or k.endswith("mean_dice")), None)
        if dice_key is not None:
            result["mean_dice"] = summary[dice_key]["mean"]
        atomic_write_json(result, self.output_path)
        logger.info("wrote per-case metrics of %d case(s) to %s (%s)", len(rows), self.output_path,
                    "per class over the cases, then the mean over the classes")
        for metric, s in summary.items():
            unit = f" {self.extra[f'{metric}_unit']}" if f"{metric}_unit" in self.extra else ""
            if "per_class" in s:
                logger.info("%s: mean over %d classes %s%s; per class %s", metric, len(s["per_class"]),
                            _rounded(s["mean"]), unit, {k: _rounded(v) for k, v in s["per_class"].items()})
            else:
                logger.info("%s: mean %s%s over %d case(s)", metric, _rounded(s["mean"]), unit, s["n"])
        if self.csv_path is not None:
            buf = io.StringIO()
            fields = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(buf, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(buf.getvalue(), self.csv_path)
        if self.summary_path is not None:
            atomic_write_json({"mean_dice": result.get("mean_dice"), **self.extra, "aggregation": AGGREGATION,
                               **summary}, self.summary_path)


def _case_file(item: Mapping, keys: Sequence[str], default: str) -> str:
    """The ``filename_or_obj`` of the first of ``keys`` in ``item`` whose meta data has one, else ``default``."""
    for key in keys:
        name = (getattr(item.get(key), "meta", None) or {}).get("filename_or_obj")
        if isinstance(name, (list, tuple)):  # a collated batch of one
            name = name[0] if len(name) == 1 else None
        if name:
            return str(name)
    return default


def _spacing_of(x: object) -> list[float] | None:
    """Voxel size per spatial axis of a MetaTensor, from its affine; ``None`` without one."""
    aff = getattr(x, "affine", None)
    if aff is None:
        return None
    aff = np.asarray(aff.detach().cpu() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64)
    n = aff.shape[0] - 1
    return np.sqrt((aff[:n, :n] ** 2).sum(axis=0)).tolist()


def _num_or_nan(v) -> float:
    """``v`` as a float; anything that is no number (e.g. ``None``) as NaN."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _rounded(v: float | None) -> float | None:
    """``v`` to 4 decimals for a log line; ``None`` or NaN (no finite value, e.g. a class absent from every case)
    as ``None``."""
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 4)


def _rounded_value(v: float | Mapping[str, float]) -> float | None | dict:
    """A metric value for a log line: a number, or a mapping of class name to number, rounded."""
    return {k: _rounded(x) for k, x in v.items()} if isinstance(v, Mapping) else _rounded(_num_or_nan(v))


class GradientClipping:
    """Clip the total gradient norm of the trainer's network after every backward pass, as nnU-Net's train step
    does (``clip_grad_norm_(network.parameters(), 12)`` before the optimizer step).

    Runs on MONAI's ``IterationEvents.BACKWARD_COMPLETED``, which a ``SupervisedTrainer`` fires after
    ``backward()`` and before ``optimizer.step()`` / ``scaler.step()``. With AMP the gradients are first unscaled
    through the trainer's ``GradScaler`` (``scaler.step`` then does not unscale them again), so the norm is that
    of the true gradients. With gradient accumulation it clips only on the iterations that step.

    Args:
        max_norm: the largest total norm; ``None`` or 0 attaches nothing (no clipping).
        norm_type: the norm (2: Euclidean, as nnU-Net).
    """

    def __init__(self, max_norm: float | None = 12.0, norm_type: float = 2.0) -> None:
        if max_norm is not None and (not math.isfinite(float(max_norm)) or float(max_norm) < 0):
            raise ValueError(f"max_norm must be a finite number >= 0, or None / 0 to switch clipping off, got {max_norm}.")
        self.max_norm = float(max_norm) if max_norm else None
        self.norm_type = float(norm_type)

    def attach(self, engine: Engine) -> None:
        if self.max_norm is not None:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @staticmethod
    def _steps_now(engine: Engine) -> bool:
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        if acc <= 1:
            return True
        length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % length if length is not None else engine.state.iteration - 1
        return (local + 1) % acc == 0 or (length is not None and local + 1 == length)

    def __call__(self, engine: Engine) -> None:
        if not self._steps_now(engine):
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, norm_type=self.norm_type)
