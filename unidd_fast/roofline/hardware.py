"""H100 SXM figures the roofline model uses, and the roofline term of one kernel."""
from __future__ import annotations

PEAK = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "fp64": 67e12}  # dense FLOP/s (fp64: tensor cores)
HBM = 3.35e12  # bytes/s
SMS = 132
ELEM = {"bf16": 2, "fp32": 4}
LAUNCH_GAP_S = 1.0e-6  # ASSUMPTION: gap between two kernels of a replayed CUDA graph


def term(flops: float, peak: float, nbytes: float) -> dict:
    """One kernel: max(FLOPs / peak, bytes / HBM bandwidth), with both terms (µs) and which bounds it."""
    t_c, t_m = flops / peak, nbytes / HBM
    return {"flops": flops, "bytes": nbytes, "t_compute_us": t_c * 1e6, "t_memory_us": t_m * 1e6,
            "predicted_us": max(t_c, t_m) * 1e6, "bound": "compute" if t_c > t_m else "memory"}


def teacher_peak(dtype: str) -> float:
    """Tensor-core peak of the teacher's convolutions and GEMMs: bf16 autocast, else TF32."""
    return PEAK["bf16"] if dtype == "bf16" else PEAK["tf32"]
