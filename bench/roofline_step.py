"""H100 roofline PREDICTION of a full recover step (``roofline_step_*.json``): the teacher per
layer (forward + input backward), augmentation, Adam + clip, the CFM loss as the code runs it
on CUDA with ``auto`` (the Triton statistics at the kernels' precisions:
Gram bf16x4 for bf16 maps and 3xTF32 for fp32, bf16x3 backward; the inverse in float64 on cuSOLVER, which every synthetic
inverse takes inside the CUDA-graph capture that recover uses on CUDA by default, with
the per-matrix latency model of ``bench_cuda_roofline.py``), the SRe2L BN loss at its fused ideal,
and launch gaps of a replayed CUDA graph; totals give the predicted CFM overhead over the
bare teacher step and over SRe2L. Nothing here is measured on a GPU.

    python bench/roofline_step.py [--dtype bf16|fp32] [--markdown]

Geometries: ResNet-18 at class-batch 100, 200 and 500, ResNet-50 at 500 (224 px), the
BatchNorm inputs as sites. The model is ``unidd_fast/roofline/step.py`` (``full_step``,
``step_totals``; ``unidd-fast plan`` uses it for any teacher); this script prints its tables.
``full_step(..., graphs=False)`` models eager steps instead (fp32 inverses: the CUDA
extension below ``kernels/registry.py`` LARGE_WIDTH, cuSOLVER above), valid only while
κ = (λmax + β)/β stays below ``_utils.FP32_MAX_CONDITION``.
"""
from __future__ import annotations

import torchvision

from common import prediction_args, report
from unidd_fast.roofline.hardware import LAUNCH_GAP_S
from unidd_fast.roofline.step import full_step, step_totals
from unidd_fast.sites import site_input_shapes

ARCHS = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
GEOMETRIES = (("resnet18", 100), ("resnet18", 200), ("resnet18", 500), ("resnet50", 500))  # (arch, class-batch)


def main(argv=None):
    args = prediction_args(__doc__, argv)
    dtype = args.dtype
    step_rows, step_sums = [], []
    for arch, batch in GEOMETRIES:
        label = f"{arch} ImageNet 224 b{batch}"
        model = getattr(torchvision.models, arch)().eval()
        sites = site_input_shapes(model, "bn", (3, 224, 224))
        rows_b = full_step(model, sites, batch, dtype, 224, title=ARCHS[arch])
        step_rows += [{"geometry": label, **r} for r in rows_b]
        step_sums.append(step_totals(rows_b, label))
    print()
    report(f"roofline_step_{dtype}", step_rows, ["geometry", "part", "name", "kernels", "flops", "bytes",
                                                 "t_compute_us", "t_memory_us", "predicted_us", "bound"],
           extra={"label": "PREDICTION (H100 roofline, full recover step)", "launch_gap_s": LAUNCH_GAP_S,
                  "totals": step_sums})
    print()
    report(f"roofline_step_{dtype}_totals", step_sums, list(step_sums[0]))
    if args.markdown:
        print_step_markdown(step_rows, step_sums, dtype)


def print_step_markdown(rows, sums, dtype):
    print(f"\n| geometry ({dtype}) | part | what | GFLOP | MB | compute µs | memory µs | predicted µs | bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['part']} | {r['name']} | {r['flops'] / 1e9:.1f} | {r['bytes'] / 1e6:.0f} | "
              f"{r['t_compute_us']:.0f} | {r['t_memory_us']:.0f} | {r['predicted_us']:.0f} | {r['bound']} |")
    print(f"\n| geometry ({dtype}) | teacher µs | update µs | CFM µs | SRe2L µs | launch gaps µs | bare step µs "
          "| CFM step µs | CFM / bare | CFM / SRe2L | CFM share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in sums:
        print(f"| {t['geometry']} | {t['teacher_us']:.0f} | {t['update_us']:.0f} | {t['cfm_us']:.0f} | "
              f"{t['sre2l_us']:.0f} | {t['launch_gaps_us']:.0f} | {t['bare_step_us']:.0f} | {t['cfm_step_us']:.0f} | "
              f"{t['cfm_overhead_vs_bare']:.2f}× | {t['cfm_vs_sre2l']:.2f}× | {100 * t['cfm_share_of_step']:.1f} % |")


if __name__ == "__main__":
    main()
