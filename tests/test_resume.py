# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Training that resumes everywhere: checkpoints loadable by single-process and torchrun runs (old ``module.``
checkpoints too), an extended run continuing the polynomial LR schedule, distributed validation with fewer
cases than ranks (each case counted once), removal of temporary files of interrupted saves, and training curves
that continue over a resumed run."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler, MeanDice, from_engine
from monai.metrics import DiceMetric
from parameterized import parameterized
from torch.optim.lr_scheduler import PolynomialLR

from scripts.handlers import BestModelSaver, IgnoreStandIn, LatestCheckpoint, TrainingCurves, ValidationShardSampler
from scripts.io_utils import atomic_path, remove_stale_temp_files
from tests.test_bundle_workflows import _workflow
from tests.utils import ROOT, TINY_PLAN, env_with_root, torchrun_training_command, write_dataset

LR = 0.1
POWER = 0.9


def _poly(epoch: int, total: int, power: float = POWER, base: float = LR) -> float:
    return base * (1.0 - min(epoch, total) / total) ** power


def _state(net: torch.nn.Module, total_iters: int = 2) -> dict:
    """A network, its optimizer and PolynomialLR: the save_dict of a LatestCheckpoint."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    return {"model": net, "optimizer": optimizer,
            "lr_scheduler": PolynomialLR(optimizer, total_iters=total_iters, power=POWER)}


def _train(path: Path, save_dict: dict, epochs: int) -> tuple[Engine, list[float]]:
    """Run a no-op ignite trainer with the bundle's LR schedule and checkpoint handlers; return it and the
    learning rate of each epoch it ran."""
    engine = Engine(lambda e, batch: None)
    LrScheduleHandler(save_dict["lr_scheduler"], print_lr=False).attach(engine)
    LatestCheckpoint(path, save_dict).attach(engine)
    lrs: list[float] = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: lrs.append(save_dict["optimizer"].param_groups[0]["lr"]))
    engine.run([0, 0], max_epochs=epochs)
    return engine, lrs


class TestExtendedSchedule(unittest.TestCase):
    @parameterized.expand([(2, 4), (2, 3), (3, 7)])
    def test_lr_continues_on_the_new_curve(self, first, total):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint_latest.pt"
            _, lrs = _train(path, _state(torch.nn.Linear(2, 2), first), first)
            self.assertAlmostEqual(torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["lr"], 0.0)
            engine, lrs = _train(path, _state(torch.nn.Linear(2, 2), total), total)
            self.assertEqual(engine.state.epoch, total)
            expected = [_poly(e, total) for e in range(first, total)]  # the new epochs, on the curve over `total`
            self.assertEqual(len(lrs), total - first)
            for got, want in zip(lrs, expected):
                self.assertGreater(got, 0.0)
                self.assertAlmostEqual(got, want, places=10)
            self.assertEqual(torch.load(path, weights_only=True)["lr_scheduler"]["total_iters"], total)


class TestCheckpointKeys(unittest.TestCase):
    """A one-process gloo group, so DistributedDataParallel can wrap a network on the CPU."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        dist.init_process_group("gloo", init_method=f"file://{cls.tmp / 'pg'}", rank=0, world_size=1)

    @classmethod
    def tearDownClass(cls):
        dist.destroy_process_group()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @staticmethod
    def _net(ddp: bool) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        return torch.nn.parallel.DistributedDataParallel(net) if ddp else net

    @parameterized.expand([
        ("ddp_to_single", True, False, False),
        ("single_to_ddp", False, True, False),
        ("ddp_to_ddp", True, True, False),
        ("old_module_keys_to_single", True, False, True),
        ("old_module_keys_to_ddp", True, True, True),
    ])
    def test_resume(self, _, save_ddp, load_ddp, old_style):
        path = self.tmp / f"{self._testMethodName}.pt"
        source = self._net(save_ddp)
        _train(path, _state(source), 1)
        checkpoint = torch.load(path, weights_only=True)
        self.assertFalse(any(k.startswith("module.") for k in checkpoint["model"]), list(checkpoint["model"]))
        if old_style:  # as written before the fix: DDP's state_dict keys
            checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}
            torch.save(checkpoint, path)
        target = self._net(load_ddp)
        with self.assertLogs("scripts.handlers", level=logging.INFO) as logs:
            engine, _ = _train(path, _state(target), 2)
        self.assertTrue(any("after epoch 1 of 2" in m for m in logs.output), logs.output)
        self.assertEqual(engine.state.epoch, 2)
        reloaded = torch.load(path, weights_only=True)["model"]
        self.assertEqual(set(reloaded), set(self._net(False).state_dict()))


def _case(seed: int, channels: int = 3, size: int = 6) -> dict:
    """One-hot prediction and label of a random case: Dice differs from case to case."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, channels, (size, size, size), generator=g)
    pred = torch.where(torch.rand(label.shape, generator=g) < 0.3 + 0.1 * seed,
                       torch.randint(0, channels, label.shape, generator=g), label)
    onehot = torch.nn.functional.one_hot
    return {"pred": onehot(pred, channels).permute(3, 0, 1, 2).float(),
            "label": onehot(label, channels).permute(3, 0, 1, 2).float()}


def _validate_shards(rank: int, world: int, case_counts: list[int], init_file: str, out_dir: str) -> None:
    """One rank of distributed validations of ``n`` cases for each ``n`` of ``case_counts``, with the bundle's
    sampler and stand-in guard (one process group for all: every start of a process imports torch and MONAI)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for n_cases in case_counts:
            cases = [_case(i) for i in range(n_cases)]
            sampler = ValidationShardSampler(cases)
            loader = torch.utils.data.DataLoader(cases, batch_size=1, sampler=sampler, collate_fn=list)
            engine = Engine(lambda e, batch: batch)
            metric = MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
            metric.attach(engine, "val_mean_dice")
            IgnoreStandIn(sampler, {"val_mean_dice": metric}).attach(engine)
            engine.run(loader)
            torch.save({"value": engine.state.metrics["val_mean_dice"], "indices": sampler.indices,
                        "details": engine.state.metric_details["val_mean_dice"]},
                       os.path.join(out_dir, f"{n_cases}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


class TestDistributedValidation(unittest.TestCase):
    def test_metric_counts_each_case_once(self):
        world, case_counts = 3, [1, 2, 4]  # two stand-ins, one stand-in (counting it would change the mean), none
        with tempfile.TemporaryDirectory() as tmp:
            context = torch.multiprocessing.spawn(_validate_shards, args=(world, case_counts, f"{tmp}/pg", tmp),
                                                  nprocs=world, join=False)
            deadline = time.monotonic() + 300
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in context.processes:
                        p.kill()
                    self.fail(f"distributed validation on {world} ranks hangs")
            results = {n: [torch.load(f"{tmp}/{n}_{r}.pt", weights_only=True) for r in range(world)]
                       for n in case_counts}
        for n_cases, per_rank in results.items():
            with self.subTest(n_cases=n_cases):
                cases = [_case(i) for i in range(n_cases)]
                dice = DiceMetric(include_background=False)
                dice(torch.stack([c["pred"] for c in cases]), torch.stack([c["label"] for c in cases]))
                expected = float(dice.aggregate())
                real = [i for r in per_rank[:n_cases] for i in r["indices"]]
                self.assertEqual(sorted(real), list(range(n_cases)))
                for r in per_rank:
                    self.assertAlmostEqual(r["value"], expected, places=6)
                    finite_rows = torch.isfinite(r["details"]).all(dim=1)
                    self.assertEqual(int(finite_rows.sum()), n_cases)  # each real case once; stand-ins NaN rows
                    self.assertEqual(len(r["details"]), max(n_cases, world))

    def test_sampler_arguments(self):
        self.assertEqual(ValidationShardSampler(range(5), num_replicas=2, rank=1).indices, [1, 3])
        self.assertTrue(ValidationShardSampler(range(1), num_replicas=2, rank=1).stand_in)
        self.assertEqual(len(ValidationShardSampler([], num_replicas=2, rank=1)), 0)
        with self.assertRaises(ValueError):
            ValidationShardSampler(range(3), num_replicas=2, rank=2)


class TestStaleTempFiles(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _made_by_atomic_path(self, target: Path) -> Path:
        """A temporary file exactly as an interrupted atomic_path leaves it (a zero-byte file)."""
        name = None
        try:
            with atomic_path(target) as tmp:
                name = tmp
                raise KeyboardInterrupt  # stands for kill -9: the file name is what matters
        except KeyboardInterrupt:
            pass
        name.touch()
        return name

    @staticmethod
    def _age(path: Path, seconds: float) -> Path:
        t = time.time() - seconds
        os.utime(path, (t, t))
        return path

    @parameterized.expand([("model.pt",), ("checkpoint_latest.pt",), ("training_curves.json",), ("plain",)])
    def test_old_removed_fresh_and_others_kept(self, name):
        target = self.tmp / name
        stale = self._age(self._made_by_atomic_path(target), 3600)
        fresh = self._made_by_atomic_path(target)  # a save in progress in another process
        suffix = "".join(Path(name).suffixes) or ".tmp"
        others = [self.tmp / n for n in (
            name, f".{name}.abc{suffix}", f".{name}.abcdefgh{suffix}.bak", f".other{name}.abcdefgh{suffix}",
            f"{name}.abcdefgh{suffix}")]
        for p in others:
            p.touch()
            self._age(p, 3600)
        self.assertRegex(stale.name, "^" + re.escape(f".{name}.") + "[a-z0-9_]{8}" + re.escape(suffix) + "$")
        self.assertEqual(remove_stale_temp_files(target), [stale])
        self.assertFalse(stale.exists())
        self.assertTrue(fresh.exists())
        self.assertTrue(all(p.exists() for p in others))
        self.assertEqual(remove_stale_temp_files(target, min_age_s=0), [fresh])

    def test_bad_age(self):
        with self.assertRaisesRegex(ValueError, "min_age_s"):
            remove_stale_temp_files(self.tmp / "model.pt", min_age_s=-1)

    def test_handlers_clean_up_when_training_starts(self):
        latest, best = self.tmp / "checkpoint_latest.pt", self.tmp / "model.pt"
        stale = [self._age(self._made_by_atomic_path(p), 3600) for p in (latest, best)]
        from monai.engines import SupervisedTrainer

        net = torch.nn.Conv3d(1, 1, 1)
        trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[{"image": torch.ones(1, 1, 2, 2, 2),
                                    "label": torch.ones(1, 1, 2, 2, 2)}], network=net, optimizer=torch.optim.SGD(
                                    net.parameters(), lr=LR), loss_function=torch.nn.MSELoss(), amp=False)
        LatestCheckpoint(latest, {"model": net}).attach(trainer)
        BestModelSaver(best, net).attach(trainer)
        trainer.run()
        self.assertFalse(any(p.exists() for p in stale))
        self.assertTrue(latest.is_file() and best.is_file())


class _Validation:
    """Run ``validator`` after every trainer epoch (as MONAI's ValidationHandler does)."""

    def __init__(self, validator: Engine) -> None:
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self.validator.run([0], max_epochs=1))


class TestTrainingCurvesOrder(unittest.TestCase):
    """TrainingCurves records the validator's key metric and keeps a resumed run's curves at any position in the
    trainer's handler list (before or after the validation and the resumable checkpoint)."""

    @parameterized.expand([("first", 0), ("middle", 1), ("last", 2)])
    def test_position(self, _, position):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for epochs in (2, 4):  # the second run resumes after epoch 2
                trainer = Engine(lambda e, batch: {"loss": float(e.state.epoch)})
                validator = Engine(lambda e, batch: None)
                validator.state.key_metric_name = "val_mean_dice"

                def metrics(v: Engine, trainer: Engine = trainer) -> None:  # computed when the epoch completes
                    v.state.metrics.update({"other": -1.0, "val_mean_dice": trainer.state.epoch / 10})

                validator.add_event_handler(Events.EPOCH_COMPLETED, metrics)
                checkpoint = LatestCheckpoint(tmp / "latest.pt", {"model": torch.nn.Linear(1, 1)})
                handlers = [_Validation(validator), checkpoint]
                handlers.insert(position, TrainingCurves(tmp, validator=validator))
                for handler in handlers:
                    handler.attach(trainer)
                trainer.run([0, 0], max_epochs=epochs)
            curves = json.loads((tmp / "training_curves.json").read_text())
            self.assertEqual(curves["epoch"], [1, 2, 3, 4])
            self.assertEqual(curves["loss"], [1.0, 2.0, 3.0, 4.0])
            self.assertEqual(curves["val_epoch"], [1, 2, 3, 4])
            np.testing.assert_allclose(curves["val_metric"], [0.1, 0.2, 0.3, 0.4])
            self.assertTrue((tmp / "training_curves.png").is_file())


class TestTrainingWorkflows(unittest.TestCase):
    """The bundle's configs: an extended single-process run and a resumed torchrun run with one validation case."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.data = cls.tmp / "data"
        cls.datalist = write_dataset(cls.data, n_train=2, n_val=1, n_test=0)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_extended_run_trains_on(self):
        root = self.tmp / "extend"
        args = dict(TINY_PLAN, bundle_root=str(ROOT), dataset_dir=str(self.data), datalist=str(self.datalist),
                    ckpt_dir=str(root / "models"), output_dir=str(root / "runs"), device="cpu", cache_rate=0.0,
                    iterations_per_epoch=1, val_interval=100, learning_rate=LR, poly_power=POWER)
        _workflow(["train.yaml"], "training", "train", **args, epochs=2)
        # ConfigWorkflow configures logging (root handlers replaced): capture the two loggers themselves
        with self.assertLogs("scripts.handlers", level=logging.INFO) as logs, \
                self.assertLogs("ignite.engine.engine.SupervisedTrainer", level=logging.INFO) as trainer_logs:
            wf = _workflow(["train.yaml"], "training", "train", **args, epochs=4)
        self.assertEqual(wf.trainer.state.epoch, 4)
        text = "\n".join(logs.output + trainer_logs.output)
        self.assertIn("after epoch 2 of 4", text)
        stepped = [float(v) for v in re.findall(r"Current learning rate: (\S+)", text)]
        self.assertEqual(len(stepped), 2, text)  # after epochs 3 and 4: the rate of epoch 4, then the end
        self.assertGreater(stepped[0], 0.0)
        self.assertAlmostEqual(stepped[0], _poly(3, 4), places=8)
        resumed = re.search(r"polynomial schedule over 4 epochs at learning rate (\S+)", text)
        self.assertIsNotNone(resumed, text)
        self.assertAlmostEqual(float(resumed.group(1)), _poly(2, 4), places=5)  # the rate of epoch 3
        self.assertEqual(torch.load(root / "models" / "checkpoint_latest.pt", weights_only=True)[
            "lr_scheduler"]["total_iters"], 4)

    def test_torchrun_resumes_with_one_validation_case(self):
        root = self.tmp / "torchrun"
        for epochs in (1, 2):
            args = torchrun_training_command(root, self.data, self.datalist, epochs=epochs, iterations_per_epoch=1,
                                             val_interval=1, cache_rate=0)
            result = subprocess.run(args, cwd=ROOT, env=env_with_root(), capture_output=True, text=True,
                                    timeout=600)
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 0, output[-6000:])
        self.assertIn("after epoch 1 of 2", output)
        state = torch.load(root / "models" / "checkpoint_latest.pt", weights_only=True)
        self.assertEqual(state["trainer"]["iteration"], 2)  # 2 epochs of 1 iteration
        self.assertFalse(any(k.startswith("module.") for k in state["model"]))
        best = state["best_model"]
        self.assertGreaterEqual(best["best_epoch"], 1)

        # the distributed validation metric of model.pt equals a single-process evaluation of the same weights
        eval_dir = root / "eval"
        lists = json.loads(self.datalist.read_text())
        eval_datalist = root / "eval_datalist.json"  # the validation case as the test case
        eval_datalist.write_text(json.dumps({**lists, "test": lists["validation"]}))
        _workflow(["train.yaml", "evaluate.yaml"], "evaluating", "eval", **TINY_PLAN, bundle_root=str(ROOT),
                  dataset_dir=str(self.data), datalist=str(eval_datalist), ckpt_dir=str(root / "models"),
                  output_dir=str(root / "runs"), eval_dir=str(eval_dir), device="cpu", cache_rate=0.0,
                  tta_mirror_axes=[])  # validation during training does not mirror
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        self.assertEqual(len(metrics["cases"]), 1)
        self.assertAlmostEqual(metrics["mean_dice"], best["best_metric"], places=4)


if __name__ == "__main__":
    unittest.main()
