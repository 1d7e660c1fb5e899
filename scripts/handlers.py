# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the bundle: resumable latest checkpoint, training curves plot, metrics JSON."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader
from monai.metrics import compute_confusion_matrix_metric

from .io_utils import atomic_path, atomic_torch_save, atomic_write_text

__all__ = ["BestModelSaver", "LatestCheckpoint", "loads_checkpoint", "TrainingCurves", "MetricsJSONWriter"]

logger = logging.getLogger(__name__)


def loads_checkpoint(engine: Engine) -> bool:
    """Whether a :class:`monai.handlers.CheckpointLoader` runs when ``engine`` starts (a fine-tuning run)."""
    handlers = getattr(engine, "_event_handlers", {}).get(Events.STARTED, [])
    return any(isinstance(h[0], CheckpointLoader) for h in handlers)


class LatestCheckpoint:
    """Save the full training state every epoch and resume from it.

    At every ``save_interval`` epochs the state of every object of ``save_dict`` (network, optimizer, LR
    scheduler, trainer, ...) is written to ``path`` atomically. With ``resume=True`` and an existing file, the
    state is loaded when the trainer starts (``weights_only=True``), so the run continues after the last
    completed epoch; the trainer's ``max_epochs`` of the current run is kept, so a resumed run may be extended.
    A run that also loads weights with a ``CheckpointLoader`` attached before this handler (e.g. MONAI Label's
    training from ``models/model.pt``) is a fine-tuning run: it starts at epoch 0 from those weights instead.

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
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # every rank holds the same state; rank 0 writes it
        atomic_torch_save({k: v.state_dict() for k, v in self.save_dict.items()}, self.path)
        logger.info("epoch %d: saved the training state to %s", engine.state.epoch, self.path)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.path.is_file()):
            return
        if loads_checkpoint(engine):
            logger.info("weights loaded by a CheckpointLoader: fine-tuning from epoch 0, not resuming %s", self.path)
            return
        max_epochs = engine.state.max_epochs
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks {missing}; delete it or start with resume=False.")
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        if "trainer" in self.save_dict:
            engine.state.max_epochs = max_epochs
        logger.info("resumed from %s after epoch %d of %d", self.path, engine.state.epoch, max_epochs)


class BestModelSaver:
    """Keep the weights with the best validation key metric in ``path`` (e.g. ``models/model.pt``).

    Attached to an evaluator, it compares the evaluator's key metric after every run and writes the network's
    ``state_dict`` atomically when it improves. Attached to a trainer too, it writes the final weights at the
    end of training if no validation ever ran (e.g. MONAI Label training without a validation split), so the
    served model is always refreshed. Its ``state_dict`` (best metric and epoch) is part of the resumable
    checkpoint, so a resumed run does not forget its best model.

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
            engine.add_event_handler(Events.COMPLETED, self._final)
        else:
            engine.add_event_handler(Events.COMPLETED, self._compare)

    def _weights(self) -> dict:
        net = self.network.module if hasattr(self.network, "module") else self.network
        return net.state_dict()

    def _compare(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(name) if name else None
        if value is None or not math.isfinite(float(value)):
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else engine.state.epoch
        if float(value) > self.best_metric:
            self.best_metric, self.best_epoch = float(value), int(epoch)
            atomic_torch_save(self._weights(), self.path)
            logger.info("new best %s %.4f at epoch %d: saved %s", name, self.best_metric, epoch, self.path)

    def _final(self, engine: Engine) -> None:
        if self.best_epoch < 0:
            atomic_torch_save(self._weights(), self.path)
            logger.info("no validation ran: saved the final weights to %s", self.path)


class TrainingCurves:
    """Record the mean training loss per epoch and the validation key metric, and plot them to a PNG.

    The history is kept in ``<output_dir>/training_curves.json`` (reloaded when a run resumes) and drawn to
    ``<output_dir>/training_curves.png`` when training completes (and after every validation).

    Args:
        output_dir: folder for the JSON and PNG.
        validator: the evaluator whose ``key_metric`` is recorded after it runs (optional).
        loss_key: key of the loss in the trainer's output.
    """

    def __init__(self, output_dir: str | os.PathLike, validator: Engine | None = None, loss_key: str = "loss") -> None:
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.loss_key = loss_key
        self.history: dict[str, list] = {"epoch": [], "loss": [], "val_epoch": [], "val_metric": []}
        self._losses: list[float] = []

    @property
    def json_path(self) -> Path:
        return self.output_dir / "training_curves.json"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._plot)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validation)
        self._trainer = engine

    def _start(self, engine: Engine) -> None:
        if engine.state.epoch > 0 and self.json_path.is_file():  # resumed: keep the curves so far
            with open(self.json_path) as f:
                old = json.load(f)
            self.history = {k: [v for v, e in zip(old[k], old["epoch" if k in ("epoch", "loss") else "val_epoch"])
                                if e <= engine.state.epoch] for k in self.history}
        elif engine.state.epoch == 0:
            self.history = {k: [] for k in self.history}

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
        atomic_write_text(json.dumps(self.history, indent=1), self.json_path)

    def _validation(self, validator: Engine) -> None:
        metric = validator.state.metrics.get(validator.state.key_metric_name) if hasattr(validator.state, "key_metric_name") else None
        if metric is None and validator.state.metrics:
            metric = next(iter(validator.state.metrics.values()))
        if metric is not None and math.isfinite(float(metric)):
            self.history["val_epoch"].append(self._trainer.state.epoch)
            self.history["val_metric"].append(float(metric))
            atomic_write_text(json.dumps(self.history, indent=1), self.json_path)

    def _plot(self, engine: Engine | None = None) -> Path:
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
                     label="validation mean Dice")
            ax2.set_ylabel("validation mean Dice", color="tab:red")
            ax2.set_ylim(0, 1)
        ax1.set_title("MambaClinix training")
        fig.tight_layout()
        path = self.output_dir / "training_curves.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        logger.info("wrote %s", path)
        return path


class MetricsJSONWriter:
    """Write per-case and summary metrics of an evaluator to JSON (one row per case, per class and mean).

    Reads ``engine.state.metric_details`` (filled by metrics with ``save_details=True``, the default of MONAI's
    ignite metrics) when the evaluator completes.

    Args:
        output_path: JSON file to write.
        class_names: names of the evaluated classes, in the metric's channel order.
        filename_key: meta key holding each case's image file name.
        summary_path: optional second JSON with only the summary (e.g. ``eval/demo_metrics.json``).
    """

    def __init__(self, output_path: str | os.PathLike, class_names: list[str] | None = None,
                 summary_path: str | os.PathLike | None = None) -> None:
        self.output_path = Path(output_path)
        self.summary_path = Path(summary_path) if summary_path else None
        self.class_names = class_names
        self._files: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._files.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item.get("image") if isinstance(item, Mapping) else None
            meta = getattr(img, "meta", {}) or {}
            name = meta.get("filename_or_obj", f"case_{len(self._files)}")
            if isinstance(name, (list, tuple)):
                self._files.extend(str(n) for n in name)
            else:
                self._files.append(str(name))

    def _write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        cases = []
        summary: dict = {}
        for metric, values in details.items():
            values = torch.as_tensor(values).float().cpu()
            if values.ndim == 3 and values.shape[-1] == 4:  # raw confusion matrices (tp, fp, tn, fn) per case/class
                name = next((m for m in ("sensitivity", "specificity", "precision", "accuracy") if m in metric), None)
                if name is None:
                    continue
                values = compute_confusion_matrix_metric(name, values)
            if values.ndim == 1:
                values = values[:, None]
            n_cls = values.shape[1]
            names = self.class_names if self.class_names and len(self.class_names) == n_cls else [
                f"class_{i + 1}" for i in range(n_cls)]
            for i in range(values.shape[0]):
                while len(cases) <= i:
                    cases.append({"image": self._files[len(cases)] if len(cases) < len(self._files) else f"case_{len(cases)}"})
                for c, cname in enumerate(names):
                    cases[i][f"{metric}_{cname}"] = _num(values[i, c])
                cases[i][f"{metric}_mean"] = _nanmean(values[i])
            per_class = {cname: _nanmean(values[:, c]) for c, cname in enumerate(names)}
            summary[metric] = {"per_class": per_class, "mean": _nanmean(values)}
        result = {"cases": cases, "summary": summary}
        dice_key = next((k for k in summary if k.endswith("mean_dice")), None)
        if dice_key is not None:
            result["mean_dice"] = summary[dice_key]["mean"]
        atomic_write_text(json.dumps(result, indent=2), self.output_path)
        logger.info("wrote per-case metrics of %d case(s) to %s", len(cases), self.output_path)
        for metric, s in summary.items():
            logger.info("%s: mean %.4f, per class %s", metric, s["mean"], {k: round(v, 4) for k, v in s["per_class"].items()})
        if self.summary_path is not None:
            brief = {"mean_dice": result.get("mean_dice")}
            for metric, s in summary.items():
                brief[metric] = s
            atomic_write_text(json.dumps(brief, indent=2), self.summary_path)


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _nanmean(t: torch.Tensor) -> float | None:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else None
