"""The ``cuda`` backend: host code of the kernels in ``csrc/`` (``ops``), their compile report
(``nvcc``) and a CPU emulation for the tests (``emulator``)."""
