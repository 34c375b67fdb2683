"""Backends of the fused ops, installed as ``unidd_fast.kernels``: ``registry`` chooses one per
op and input; ``composite`` (torch), ``triton/`` and ``cuda/`` (host side of ``csrc/``) implement
them; ``compile_report`` compiles the Triton and CUDA kernels for a GPU without one."""
