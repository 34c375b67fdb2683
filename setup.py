"""Build script. A plain ``pip install -e .`` installs pure Python (Triton kernels are JIT
compiled at first use). The CUDA extension ``unidd_fast._cuda`` (csrc/) is built only when
asked for, against the installed torch (hence --no-build-isolation)::

    UNIDD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" pip install -e . --no-build-isolation

CUDA_HOME defaults to /usr/local/cuda; TORCH_CUDA_ARCH_LIST to "8.0;9.0a" (A100, H100 —
no GPU is needed to build). MAX_JOBS bounds parallel compiles. See docs/cuda.md.
"""
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def wheel_cuda_includes(cuda_home: str) -> list[str]:
    """Headers that torch's own headers include (cusparse.h, cublas_v2.h, ...) but a minimal
    toolkit lacks: take them from the nvidia-* wheels that the CUDA build of torch installs."""
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(str(p.parent) for root in roots for p in Path(root).glob("*/include/cusparse.h"))


def cuda_extensions():
    if os.environ.get("UNIDD_BUILD_CUDA", "0") != "1":
        return {}, []
    cuda_home = os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    if not (Path(cuda_home) / "bin" / "nvcc").is_file():
        raise SystemExit(f"UNIDD_BUILD_CUDA=1 but {cuda_home}/bin/nvcc does not exist: install the CUDA toolkit "
                         "matching torch.version.cuda and point CUDA_HOME at it")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # torch-free kernels (*.cu) compile in seconds; bindings.cpp is the one file with torch headers
    sources = sorted(str(p.relative_to(HERE)) for p in list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cpp")))
    ext = CUDAExtension(
        name="unidd_fast._cuda",
        sources=sources,
        include_dirs=[str(CSRC)] + wheel_cuda_includes(cuda_home),
        # no --use_fast_math: the inverse's pivots and square roots need IEEE fp32
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # torch picks -std (C++20)
    )
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}, [ext]


cmdclass, ext_modules = cuda_extensions()
setup(cmdclass=cmdclass, ext_modules=ext_modules)
