# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Speed, FLOP and memory benchmarks of MambaClinix against MONAI baselines (benchmarks, not tests).

Run as ``python -m scripts.benchmark [--models ...] [--sizes 64 96] [--repeats 3] [--quick] [--device cpu]``;
``python -m scripts.benchmark --help`` lists every option. Results go to ``docs/benchmarks/``: ``results.json``,
``table.md``, ``README.md`` and PNG plots, each written atomically.

Modules, one job each:

- :mod:`~scripts.benchmark.models`: the networks compared, their ``+`` options and patch-edge rules;
- :mod:`~scripts.benchmark.workload`: a model prepared for measuring (forward and training-step calls) and the
  timing of one call;
- :mod:`~scripts.benchmark.probes`: FLOP counting, the machine's matmul/conv throughput, peak memory;
- :mod:`~scripts.benchmark.machine`: the description of the machine recorded with every result;
- :mod:`~scripts.benchmark.runners`: the benchmark run (:func:`~scripts.benchmark.runners.run_benchmark`);
- :mod:`~scripts.benchmark.report` and :mod:`~scripts.benchmark.plots`: the written results;
- :mod:`~scripts.benchmark.cli`: ``python -m scripts.benchmark``;
- :mod:`~scripts.benchmark.allocator`: ``python -m scripts.benchmark.allocator``, what
  :func:`scripts.runtime.reuse_freed_cpu_memory` changes, per network in fresh processes;
- :mod:`~scripts.benchmark.scan`: ``python -m scripts.benchmark.scan``, the selective-scan backends alone.

What ``python -m scripts.benchmark`` measures, per model and cubic patch edge:

- ``params``: trainable parameters.
- ``flops``: forward FLOPs of one sample (batch 1). ``counted`` comes from :class:`torch.utils.flop_counter.FlopCounterMode`
  run on fake tensors (no compute), which counts matmuls, convolutions and attention only; the elementwise work
  of Mamba's selective scan is invisible to it, so ``scan`` adds the analytic count of mamba-ssm's reference
  (``9 * batch * d_inner * d_state * length`` for the recurrence, plus ``D`` skip and ``z`` gate), and
  ``total = counted + scan``.
- ``forward_s``: latency of one forward pass (batch 1, ``eval()`` + ``torch.inference_mode``).
- ``train_s``: one training step (batch ``--train-batch``): forward, cross-entropy, backward and an SGD step
  (momentum 0.99, Nesterov, as nnU-Net).
- ``memory``: peak memory of a forward pass and of a training step. On CPU each (model, size) runs in a fresh
  subprocess; the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each
  phase) is reported, absolute and above the RSS just before the phase (model, optimizer and inputs built); on CUDA
  ``torch.cuda.max_memory_allocated`` after a reset. The training step measured is the second one: the first
  (warm-up) step creates the optimizer's momentum buffers, which then count in the baseline as in a running training.
  On CPU also ``*_tensor_peak_mib``: the peak of the memory held by the tensors a further call allocates, from
  PyTorch's allocation events (:func:`scripts.benchmark.probes.peak_tensor_mib`), which does not depend on the C
  allocator.
- ``gflops_per_s``: ``flops.total / forward_s``, compared with the machine's measured dense fp32 matmul peak and
  dense 3D-convolution throughput (``peaks``), and the FLOP-proportional time ``flops.total / conv throughput``.
- ``sliding_window_s``: :class:`monai.inferers.SlidingWindowInferer` over a ``1 x 1 x 160^3`` volume (overlap 0.5,
  roi 64^3 on CPU, 96^3 on CUDA).
- ``scaling``: forward latency against the patch edge and a least-squares fit of ``log t = a + k log edge``.

The timings use the system allocator unless ``--cpu-memory-reuse`` applies
:func:`scripts.runtime.reuse_freed_cpu_memory` (the bundle configs' CPU default) to the whole run. One process that
holds a dozen networks and runs workloads of very different sizes is the worst case for a heap that never gives
memory back (``docs/benchmarks/optimizations.md``); :mod:`scripts.benchmark.allocator` measures the setting per
network in fresh processes.

Times are medians after ``--warmup`` runs; the repetitions are interleaved (round-robin over the models within
each repetition) so that drift of a shared machine hits all models alike. Each timing also records the process
CPU time, which is less sensitive to other processes on a shared machine than the wall-clock time.
A model/size whose first call exceeds ``--max-call-s`` (or is predicted to, from a smaller size) is skipped
and the reason recorded. Model names may carry ``+`` options (:mod:`scripts.benchmark.models`), e.g.
``mambaclinix+cf+bf16``.

Importing the package imports none of its modules (the allocator benchmark must set the allocator before torch is
imported); import the module that owns a name, e.g. ``from scripts.benchmark.runners import run_benchmark``.
"""
