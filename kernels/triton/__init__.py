"""Triton kernels of the fused ops: launchers and autograd Functions beside their kernels."""
