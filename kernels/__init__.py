"""Triton kernels of unidd_fast, installed as ``unidd_fast.kernels``."""
