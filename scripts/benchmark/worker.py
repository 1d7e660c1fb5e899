# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""One benchmark model in a process of its own, timing calls on request (``python -m scripts.benchmark.worker``).

The C allocator setting holds for a whole process, and with the bundle's default (``reuse``:
:func:`scripts.runtime.reuse_freed_cpu_memory`, the configs' ``cpu_memory_reuse: true``) the process keeps its
peak memory. One process holding every network, with workloads of very different sizes, is the worst case for such
a heap (``docs/benchmarks/optimizations.md``), so each model lives in its own process, as in a training or
inference run: :class:`ModelWorker` starts it with the allocator of the run (``reuse`` or ``system``, glibc's
defaults), and the parent sends it one request at a time (one JSON line on its stdin, one JSON line back), so that
no two measurements overlap. Anything else the process writes to its standard output (e.g. a ``print`` in a
third-party network) goes to its standard error.

Requests: ``{"op": "call", "mode": "forward" | "train" | "sliding", "size": edge}`` (one timed call: wall-clock
and process CPU seconds; ``sliding``: sliding-window inference over a ``size^3`` volume with windows of edge
``"roi"``), ``{"op": "flops", "size": edge}`` (:func:`scripts.benchmark.probes.count_flops`),
``{"op": "peaks", ...}`` (:func:`scripts.benchmark.probes.measure_peaks`) and ``{"op": "exit"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from scripts.benchmark.allocator import SETTINGS as ALLOCATORS
from scripts.runtime import SHARED_CPU_ENVIRONMENT, openmp_wait_policy

__all__ = ["ALLOCATORS", "ModelWorker", "WorkerError", "apply_allocator", "error_line", "main", "worker_env"]


def error_line(e: BaseException, limit: int = 400) -> str:
    """An exception as recorded in the results: its type and the first line of its message (at most ``limit``
    characters)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


class WorkerError(RuntimeError):
    """A request failed in the worker, or the worker process is gone (e.g. killed for memory)."""


def apply_allocator(allocator: str) -> bool:
    """Apply the C allocator setting ``allocator`` (one of :data:`ALLOCATORS`) to this process.

    Returns:
        Whether freed memory is kept for reuse (``reuse`` on a glibc system).

    Raises:
        ValueError: an unknown setting.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}.")
    from scripts.runtime import reuse_freed_cpu_memory

    return reuse_freed_cpu_memory() if allocator == "reuse" else False


def worker_env(name: str | None) -> dict[str, str]:
    """The environment of the timing process of the model ``name``: :func:`scripts.benchmark.probes.bundle_env`,
    with ``OMP_WAIT_POLICY`` set to ``PASSIVE`` for ``+omppassive`` and removed for ``+ompspin``
    (:mod:`scripts.benchmark.models`).

    Raises:
        ValueError: an invalid model name, or both options.
    """
    from scripts.benchmark.models import parse_model_name
    from scripts.benchmark.probes import bundle_env

    env = bundle_env()
    opts = parse_model_name(name)[1] if name else set()
    if {"omppassive", "ompspin"} <= opts:
        raise ValueError(f"{name!r}: +omppassive and +ompspin exclude each other.")
    if "omppassive" in opts:
        env.update(SHARED_CPU_ENVIRONMENT)
    elif "ompspin" in opts:
        env.pop("OMP_WAIT_POLICY", None)
    return env


class ModelWorker:
    """The parent's handle on a worker process holding one model (or none, to measure the machine's peaks).

    The process starts at once (so that several build their models in parallel); :meth:`ready` waits for it.

    Args:
        name: the model (:mod:`scripts.benchmark.models`), or ``None`` for a worker without a model.
        device: where the model runs.
        train_batch: batch size of the training step.
        threads: ``torch.set_num_threads`` of the process.
        allocator: one of :data:`ALLOCATORS`, applied before the process imports torch.

    Raises:
        ValueError: an unknown allocator setting.
    """

    def __init__(self, name: str | None, device: str, train_batch: int, threads: int, allocator: str) -> None:
        from scripts.benchmark.probes import BUNDLE_ROOT

        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}.")
        env = worker_env(name)
        self.name = name
        args = ["--device", device, "--train-batch", str(train_batch), "--threads", str(threads), "--allocator", allocator]
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "scripts.benchmark.worker", *(["--model", name] if name else []), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BUNDLE_ROOT, env=env,
        )
        self._info: dict[str, Any] | None = None

    def ready(self) -> dict[str, Any]:
        """Wait for the process to build its model.

        Returns:
            ``params`` (trainable parameters, 0 without a model), ``reuse`` (whether freed memory is kept),
            ``pid`` and ``openmp_wait_policy`` (:func:`scripts.runtime.openmp_wait_policy` of its environment).

        Raises:
            WorkerError: the model could not be built, or the process died.
        """
        if self._info is None:
            self._info = self._read()  # raises (and the process exits) when the model could not be built
        return self._info

    def request(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request (see :mod:`scripts.benchmark.worker`) and return the reply.

        Raises:
            WorkerError: the request failed (its message says why), or the process died.
        """
        self.ready()
        if self._proc is None or self._proc.stdin is None:
            raise WorkerError(f"the worker of {self.name} has been closed.")
        try:
            self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self._proc.stdin.flush()
        except OSError as e:  # a broken pipe: the process is gone
            raise WorkerError(f"the worker of {self.name} is gone ({e}).") from e
        return self._read()

    def call(self, mode: str, size: int, **kwargs: Any) -> tuple[float, float]:
        """One timed call (``mode`` ``forward``, ``train`` or ``sliding``): wall-clock and process CPU seconds."""
        reply = self.request("call", mode=mode, size=size, **kwargs)
        return reply["wall_s"], reply["cpu_s"]

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self._proc = None
            raise WorkerError(f"the worker of {self.name} exited (code {code}; -9: killed, e.g. out of memory).")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError as e:  # something wrote to the reply channel: the protocol is lost
            self.close()
            raise WorkerError(f"the worker of {self.name} sent {line[:200]!r}, not a reply.") from e
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def peak_rss_mib(self) -> float | None:
        """The process's peak resident set size so far (Linux ``VmHWM``) in MiB; ``None`` once it is gone."""
        from scripts.benchmark.procfs import proc_status_mib

        return proc_status_mib("VmHWM", self._proc.pid) if self._proc is not None else None

    def close(self) -> None:
        """Ask the process to exit (killed if it does not within 30 s)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            if proc.stdin is not None:
                proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> ModelWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------------
# the worker process
# ------------------------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, channel: IO[str]) -> None:
    """Build the model, then answer requests from stdin on ``channel`` until ``exit`` or end of input."""
    reuse = apply_allocator(args.allocator)  # before torch is imported and allocates anything
    import torch

    from scripts.benchmark.probes import count_flops, measure_peaks
    from scripts.benchmark.workload import Workload, timed

    def reply(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    try:
        workload = Workload(args.model, device, args.train_batch) if args.model else None
    except Exception as e:  # noqa: BLE001 - any build failure (e.g. a missing dependency) is reported to the parent
        reply({"error": error_line(e)})
        return
    reply({"params": workload.params if workload else 0, "reuse": reuse, "pid": os.getpid(),
           "openmp_wait_policy": openmp_wait_policy()})
    calls: dict[tuple, Callable[[], Any]] = {}

    def make(mode: str, size: int, roi: int = 0) -> Callable[[], Any]:
        """The call of ``mode`` at patch edge ``size`` (``sliding``: a ``size^3`` volume in ``roi^3`` windows)."""
        assert workload is not None
        if mode == "forward":
            return workload.forward(size)
        if mode == "train":
            return workload.train_step(size)
        if mode != "sliding":
            raise ValueError(f"mode must be 'forward', 'train' or 'sliding', got {mode!r}.")
        from monai.inferers import SlidingWindowInferer

        inferer = SlidingWindowInferer(roi_size=(roi,) * 3, sw_batch_size=1, overlap=0.5)
        x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)

        def run() -> torch.Tensor:
            workload.model.eval()
            with torch.inference_mode():
                return inferer(x, workload.infer)

        return run

    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            return
        try:
            if op == "peaks":
                reply(measure_peaks(device, **request))
            elif workload is None:
                raise ValueError(f"this worker holds no model; {op!r} needs one.")
            elif op == "flops":
                reply(count_flops(workload.model, request["size"]))
            elif op == "call":
                key = tuple(sorted(request.items()))
                if key not in calls:
                    calls[key] = make(**request)
                wall, cpu = timed(calls[key], device)
                reply({"wall_s": wall, "cpu_s": cpu})
            else:
                raise ValueError(f"unknown request {op!r}.")
        except Exception as e:  # noqa: BLE001 - a failed call (e.g. out of memory) is the parent's to record
            reply({"error": error_line(e)})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark.worker", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", default="reuse", choices=ALLOCATORS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """The worker process (started by :class:`ModelWorker`): replies on the original standard output only."""
    args = _parser().parse_args(argv)
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # any other output (C or Python) goes to stderr
    try:
        _serve(args, channel)
    finally:
        channel.close()


if __name__ == "__main__":
    main()
