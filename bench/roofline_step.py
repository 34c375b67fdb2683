"""H100 roofline PREDICTION of a full recover step (``roofline_step_*.json``): the teacher per
layer (forward + input backward), augmentation, Adam + clip, the CFM loss as the code runs it
on CUDA with ``auto`` (the Triton statistics of ``roofline.py`` at the kernels' precisions:
3xTF32 Gram, bf16x3 backward; the inverse in float64 on cuSOLVER, which every synthetic
inverse takes inside the CUDA-graph capture that recover uses on CUDA by default, with
``bench_cuda_roofline.py``'s per-matrix latency model), the SRe2L BN loss at its fused ideal,
and launch gaps of a replayed CUDA graph; totals give the predicted CFM overhead over the
bare teacher step and over SRe2L. Nothing here is measured on a GPU.

    python bench/roofline_step.py [--dtype bf16|fp32] [--markdown]

Geometries: ResNet-18 at class-batch 100, 200 and 500, ResNet-50 at 500 (224 px).
``full_step(..., graphs=False)`` models eager steps instead (fp32 inverses: the CUDA
extension below ``kernels/registry.py`` LARGE_WIDTH, cuSOLVER above), valid only while
κ = (λmax + β)/β stays below ``_utils.FP32_MAX_CONDITION``.
"""
from __future__ import annotations

import torchvision

from bench_cuda_roofline import cusolver_model, inverse_model
from common import prediction_args, report
from roofline import ELEM, HBM, PEAK, reg_inverse_bwd, site_stats_bwd, site_stats_fwd, term
from sites import site_shapes

from unidd_fast.kernels.registry import LARGE_WIDTH
from unidd_fast.roofline import LAUNCH_GAP_S, teacher_layers


def full_step(image: int, batch: int, dtype: str, arch: str = "resnet18", graphs: bool = True) -> list[dict]:
    """Rows of one recover step of ``arch`` at ``image``² and class-batch ``batch``: the
    teacher (forward + input backward, per-layer roofline), augmentation, Adam + clip, the
    CFM loss with the backends ``auto`` picks on CUDA (Triton statistics; the inverse:
    with ``graphs``, the default on CUDA, in float64 on cuSOLVER, else the CUDA extension
    below LARGE_WIDTH and cuSOLVER above), the SRe2L BN loss fused to one read forward and
    one read + one write backward (its ideal), and the kernel launch gaps of a replayed
    CUDA graph."""
    model = getattr(torchvision.models, arch)()
    title = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}[arch]
    layers = teacher_layers(model, image, batch, dtype)
    peak = PEAK["bf16"] if dtype == "bf16" else PEAK["tf32"]
    rows = []

    def add(part, name, flops, nbytes, kernels, peak_flops=peak, **extra):
        r = term(flops, peak_flops, nbytes)
        r.update(extra)
        rows.append({"part": part, "name": name, "kernels": kernels, **r})

    for direction in ("fwd", "bwd"):
        t = sum(max(l[direction][0] / peak, l[direction][1] / HBM) for l in layers)
        flops, nbytes = sum(l[direction][0] for l in layers), sum(l[direction][1] for l in layers)
        add("teacher", f"{title} {direction} ({len(layers)} layers)", flops, nbytes, len(layers))
        rows[-1]["predicted_us"] = t * 1e6  # per-layer roofline: each layer its own bound
    pixels = batch * 3 * image * image
    add("update", "augment (affine grid + grid_sample, fwd + bwd)", 0, pixels * 4 * 4, 4)
    add("update", "Adam + clip (fp32 images)", 0, pixels * 4 * 9, 3)
    sites = {k: (batch,) + tuple(v[1:]) for k, v in site_shapes(model.eval(), image).items()}
    widths = {}
    for n, d, h, w in sites.values():
        widths.setdefault(d, []).append((n, d, h, w))
    for (n, d, h, w) in sorted(set(sites.values())):
        count = sum(1 for v in sites.values() if v == (n, d, h, w))
        for name, fn, kernels in (("site_stats fwd (Triton)", site_stats_fwd, 2), ("site_stats bwd (Triton)", site_stats_bwd, 1)):
            r = fn(n, d, h, w, dtype)
            rows.append({"part": "cfm", "name": f"{name} {n}x{d}x{h}x{w} ×{count}", "kernels": kernels * count,
                         **{k: count * r[k] for k in ("flops", "bytes", "t_compute_us", "t_memory_us", "predicted_us")},
                         "bound": r["bound"]})
    ds = [v[1] for v in sites.values()]
    if graphs:  # inside a capture every fp32 inverse is promoted to float64: the torch backend (cuSOLVER)
        groups = (("float64, cuSOLVER (torch), per width", lambda g: cusolver_model(g, "fp64"), ds),)
    else:
        groups = (("batched (CUDA)", inverse_model, [d for d in ds if d < LARGE_WIDTH]),
                  ("cuSOLVER (torch)", cusolver_model, [d for d in ds if d >= LARGE_WIDTH]))
    for label, model_fn, group in groups:
        if group:
            inv = model_fn(group)
            add("cfm", f"inverse fwd, {label}, {len(group)} sites", inv["flops"], inv["bytes"], inv["launches"])
            rows[-1]["predicted_us"], rows[-1]["bound"] = inv["predicted_us"], "latency"
    c = 1000  # ImageNet classes: Φ is d × c
    for d, group in sorted(widths.items()):
        k = len(group)
        r = reg_inverse_bwd(k, d)
        add("cfm", f"inverse bwd (torch GEMMs) {k}x{d}x{d}", r["flops"], r["bytes"], 2, PEAK["fp32"])
        # Φ_s (pooled features × one-hot), EMU fold, norms, Y·Φ_s and their backward: small GEMMs
        # and ~12 passes over the group's (d×d + d×c) matrices
        add("cfm", f"loss ops {k}x{d}", 3 * 2 * k * d * d * c, 12 * k * (d * d + d * c) * 4, 24, PEAK["fp32"])
    for (n, d, h, w) in sorted(set(sites.values())):
        count = sum(1 for v in sites.values() if v == (n, d, h, w))
        X = n * d * h * w * ELEM[dtype]
        add("sre2l", f"BN mean/var fwd + bwd {n}x{d}x{h}x{w} ×{count}", 0, count * 3 * X, 3 * count)
    return rows


def step_totals(rows: list[dict], label: str) -> dict:
    by = {}
    for r in rows:
        by.setdefault(r["part"], [0.0, 0])
        by[r["part"]][0] += r["predicted_us"]
        by[r["part"]][1] += r["kernels"]
    gaps = {part: kernels * LAUNCH_GAP_S * 1e6 for part, (_, kernels) in by.items()}
    bare = by["teacher"][0] + by["update"][0] + gaps["teacher"] + gaps["update"]
    cfm = bare + by["cfm"][0] + gaps["cfm"]
    sre2l = bare + by["sre2l"][0] + gaps["sre2l"]
    return {"geometry": label, "teacher_us": by["teacher"][0], "update_us": by["update"][0],
            "cfm_us": by["cfm"][0], "sre2l_us": by["sre2l"][0], "launch_gaps_us": sum(gaps.values()),
            "bare_step_us": bare, "cfm_step_us": cfm, "sre2l_step_us": sre2l,
            "cfm_overhead_vs_bare": cfm / bare, "cfm_vs_sre2l": cfm / sre2l,
            "cfm_share_of_step": (cfm - bare) / cfm}


def main(argv=None):
    args = prediction_args(__doc__, argv)
    dtype = args.dtype
    step_rows, step_sums = [], []
    for arch, batch in (("resnet18", 100), ("resnet18", 200), ("resnet18", 500), ("resnet50", 500)):
        label = f"{arch} ImageNet 224 b{batch}"
        rows_b = full_step(224, batch, dtype, arch)
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
