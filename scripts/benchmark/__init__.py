# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Speed, FLOP and memory benchmarks of MambaClinix against MONAI baselines (benchmarks, not tests).

Run as ``python -m scripts.benchmark [--models ...] [--sizes 64 96] [--rounds 5] [--quick] [--device cpu]``;
``python -m scripts.benchmark --help`` lists every option. Results go to ``docs/benchmarks/``: ``results.json``,
``table.md``, ``README.md`` and PNG plots, each written atomically.

Modules, one job each:

- :mod:`~scripts.benchmark.models`: the networks compared, their ``+`` options and patch-edge rules;
- :mod:`~scripts.benchmark.peers`: the optional ``authors`` peer, the authors' own network where it is installed;
- :mod:`~scripts.benchmark.workload`: a model prepared for measuring (forward and training-step calls) and the
  timing of one call;
- :mod:`~scripts.benchmark.probes`: FLOP counting, the machine's matmul/conv throughput, peak memory;
- :mod:`~scripts.benchmark.machine`: the description of the machine recorded with every result;
- :mod:`~scripts.benchmark.worker`: one model in a process of its own, with the run's C allocator, timing calls
  on request;
- :mod:`~scripts.benchmark.rounds`: the interleaved rounds (rotated order), the spread of times and per-round ratios;
- :mod:`~scripts.benchmark.runners`: the benchmark run (:func:`~scripts.benchmark.runners.run_benchmark`);
- :mod:`~scripts.benchmark.report` and :mod:`~scripts.benchmark.plots`: the written results;
- :mod:`~scripts.benchmark.cli`: ``python -m scripts.benchmark``;
- :mod:`~scripts.benchmark.allocator`: ``python -m scripts.benchmark.allocator``, what
  :func:`scripts.runtime.reuse_freed_cpu_memory` changes, per network in fresh processes;
- :mod:`~scripts.benchmark.scan`: ``python -m scripts.benchmark.scan``, the selective-scan backends alone;
- :mod:`~scripts.benchmark.contention`: ``python -m scripts.benchmark.contention``, each model's CPU time per call
  alone and with several copies of the benchmark running at once.

What ``python -m scripts.benchmark`` measures, per model and cubic patch edge:

- ``params``: trainable parameters.
- ``flops``: forward FLOPs of one sample (batch 1). ``counted`` comes from :class:`torch.utils.flop_counter.FlopCounterMode`
  run on fake tensors (no compute), which counts matmuls, convolutions and attention only; the elementwise work
  of Mamba's selective scan is invisible to it, so ``scan`` adds the analytic count of mamba-ssm's reference
  (``9 * batch * d_inner * d_state * length`` for the recurrence, plus ``D`` skip and ``z`` gate), and
  ``total = counted + scan``.
- ``forward``: latency of one forward pass (batch 1, ``eval()`` + ``torch.inference_mode``).
- ``train``: one training step (batch ``--train-batch``): forward, cross-entropy, backward and an Adam step
  (the optimizer of ``configs/train.yaml``).
- ``memory``: peak memory of a forward pass and of a training step, each the second call of its kind (the first is a
  warm-up: one-time allocations and the optimizer's moment buffers then count in the baseline, as in a running
  inference or training). On CPU each (model, size) runs in a fresh subprocess with the system allocator; the peak
  resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase) is reported,
  absolute and above the RSS just before the phase; on CUDA ``torch.cuda.max_memory_allocated`` after a reset. On
  CPU also ``*_tensor_peak_mib``: the peak of the memory held by the tensors a further call allocates, from
  PyTorch's allocation events (:func:`scripts.benchmark.probes.peak_tensor_mib`), which does not depend on the C
  allocator.
- ``peaks``: the machine's dense fp32 matmul peak and dense 3D-convolution throughput, measured in a phase of their
  own before any model runs. When the 1-minute load average then exceeds the number of cores they are refused: the
  figures derived from them (``fraction_of_matmul_peak``, the FLOP-proportional time ``flops.total / conv
  throughput`` and the ratio to it) are not given, and a warning goes to the log and the README.
- ``gflops_per_s``: ``flops.total / forward`` median time.
- ``sliding_window``: :class:`monai.inferers.SlidingWindowInferer` over a ``1 x 1 x 160^3`` volume (overlap 0.5,
  roi 64^3 on CPU, 96^3 on CUDA).
- ``scaling``: forward latency against the patch edge and a least-squares fit of ``log t = a + k log edge``.
- ``ratios``: per mode and patch edge, the per-round ratios of ``--reference`` (``mambaclinix``) to every other model.

The method (:mod:`scripts.benchmark.rounds`): each model lives in its own worker process
(:mod:`scripts.benchmark.worker`) with the C allocator of ``--allocator``: ``reuse``, the bundle's default
(:func:`scripts.runtime.reuse_freed_cpu_memory`, ``cpu_memory_reuse: true`` in the configs), or ``system`` (glibc's
defaults), a labelled variant; the allocator is named in the outputs. A phase (a mode at a patch edge) calls each
model ``--warmup`` times, then runs ``--rounds`` rounds (5 by default): every model once per round, the order
rotated by one model each round, one call at a time. Every call is recorded with its wall-clock and process CPU time
and the 1-minute load average before it; each model gets the median and range of its times, and the ratio between
two models is taken within each round (the same load for both) and reported as its median, quartiles and range over
the rounds. Each worker keeps its own peak memory with ``reuse``: a run needs about the sum of its models'
training-step peaks (2-7 GB each at 64^3, batch 2, on CPU: ``docs/benchmarks/allocator.json``).
A model/size whose warm-up call exceeds ``--max-call-s`` (or is predicted to, from a smaller size) is skipped
and the reason recorded. Model names may carry ``+`` options (:mod:`scripts.benchmark.models`), e.g.
``mambaclinix+cf+bf16``. ``--models ... authors`` adds the authors' own network where their code is installed
(:mod:`scripts.benchmark.peers`, ``--authors-module``); elsewhere one line says what to install and the run goes on
without it.

Importing the package imports none of its modules (the allocator benchmark must set the allocator before torch is
imported); import the module that owns a name, e.g. ``from scripts.benchmark.runners import run_benchmark``.
"""
