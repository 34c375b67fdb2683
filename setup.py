"""Build script. A plain ``pip install -e .`` installs pure Python (Triton kernels are JIT
compiled at first use). The CUDA extension in ``csrc/`` is built only when asked for::

    UNIDD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" pip install -e . --no-build-isolation

CUDA_HOME defaults to /usr/local/cuda when unset.
"""
import os
from pathlib import Path

from setuptools import setup


def cuda_extensions():
    if os.environ.get("UNIDD_BUILD_CUDA", "0") != "1":
        return {}, []
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = Path(__file__).parent
    sources = sorted(str(p.relative_to(here)) for p in (here / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(here)) for p in (here / "csrc").glob("*.cpp"))
    ext = CUDAExtension(
        name="unidd_fast._cuda",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"build_ext": BuildExtension}, [ext]


cmdclass, ext_modules = cuda_extensions()
setup(cmdclass=cmdclass, ext_modules=ext_modules)
