"""H100 roofline model of the pipeline's steps: PREDICTIONS, nothing measured.

- ``hardware``: the H100 SXM peaks, the launch gap, and the roofline term of one kernel;
- ``teacher``: FLOPs and HBM bytes per leaf layer of a network (forward, input backward);
- ``ops``: the fused ops as each backend runs them (Triton, CUDA extension, torch
  composites, cuSOLVER), at their tilings and precisions;
- ``step``: whole steps from these — the recover step (``full_step``, ``step_totals``), a
  forward with the site statistics (the stats pass) and a training step.

``unidd-fast plan`` prints its H100 column from ``step``; ``bench/roofline*.py`` and
``bench/bench_cuda_roofline.py`` print the same model's tables.
"""
