"""H100 roofline PREDICTION of whole steps, from the per-layer teacher model (``teacher``) and
the per-op costs (``ops``, ``cuda_ops``); nothing here is measured on a GPU.

- ``full_step``: one recover step as the code runs it on CUDA with backend ``auto`` — the
  teacher (forward + input backward), augmentation, Adam + clip, the CFM loss (Triton
  statistics at the kernels' precisions; the inverse in float64 on cuSOLVER inside the CUDA
  graph recover captures by default, else the CUDA extension below ``LARGE_WIDTH`` and
  cuSOLVER above), the SRe2L BN loss at its fused ideal; ``step_totals`` adds the launch
  gaps of a replayed CUDA graph and gives the bare, CFM and SRe2L steps;
- ``stats_pass_seconds``: a forward with the Triton site statistics (the stats stage);
- ``train_step_seconds``: forward, input and weight backward, optimiser (squeeze, evaluate).

Site shapes are (d, h, w) per site, as ``unidd_fast.sites.site_input_shapes`` gives them.
"""
from __future__ import annotations

from collections import Counter

from unidd_fast.kernels.registry import LARGE_WIDTH

from .cuda_ops import cusolver_model, inverse_model
from .hardware import ELEM, HBM, LAUNCH_GAP_S, PEAK, teacher_peak, term
from .ops import reg_inverse_bwd, site_stats_bwd, site_stats_fwd
from .teacher import pass_seconds, teacher_layers

# the step total that each recover.loss runs ("none" runs no step; its bare step is the floor)
STEP_OF_LOSS = {"cfm": "cfm_step_us", "sre2l": "sre2l_step_us", "none": "bare_step_us"}


def full_step(model, sites, batch: int, dtype: str, image: int, channels: int = 3, num_classes: int = 1000,
              graphs: bool = True, title: str | None = None, calls=None) -> list[dict]:
    """Rows (part, name, kernels, flops, bytes, t_compute_us, t_memory_us, predicted_us,
    bound) of one recover step of the frozen teacher ``model`` on ``batch`` images of
    ``channels``×``image``×``image`` with activations in ``dtype`` ("bf16" | "fp32").
    ``sites``: (d, h, w) of every site of the loss (an iterable, or the dict of
    ``site_input_shapes``); ``num_classes``: the columns of Φ; ``graphs``: CUDA graphs on
    (every synthetic inverse then runs in float64 on cuSOLVER) or off (fp32: the CUDA
    extension below LARGE_WIDTH, cuSOLVER above; valid only while κ = (λmax + β)/β stays
    below ``_utils.FP32_MAX_CONDITION``). Parts: "teacher", "update" (augmentation, Adam +
    clip), "cfm", "sre2l" (BN mean/var loss, fused to one read forward and one read + one
    write backward: its ideal). ``calls``: the model's shape probe, as ``teacher_layers``
    takes it."""
    title = title or type(model).__name__
    layers = teacher_layers(model, image, batch, dtype, channels, calls)
    peak = teacher_peak(dtype)
    rows = []

    def add(part, name, flops, nbytes, kernels, peak_flops=peak):
        rows.append({"part": part, "name": name, "kernels": kernels, **term(flops, peak_flops, nbytes)})

    for direction in ("fwd", "bwd"):
        flops, nbytes = sum(l[direction][0] for l in layers), sum(l[direction][1] for l in layers)
        add("teacher", f"{title} {direction} ({len(layers)} layers)", flops, nbytes, len(layers))
        rows[-1]["predicted_us"] = pass_seconds(layers, direction, peak) * 1e6  # each layer its own bound
    pixels = batch * channels * image * image
    add("update", "augment (affine grid + grid_sample, fwd + bwd)", 0, pixels * 4 * 4, 4)
    add("update", "Adam + clip (fp32 images)", 0, pixels * 4 * 9, 3)
    shapes = [(batch,) + tuple(s) for s in (sites.values() if isinstance(sites, dict) else sites)]
    counts = Counter(shapes)
    for (n, d, h, w), count in sorted(counts.items()):
        for name, fn, kernels in (("site_stats fwd (Triton)", site_stats_fwd, 2), ("site_stats bwd (Triton)", site_stats_bwd, 1)):
            r = fn(n, d, h, w, dtype)
            rows.append({"part": "cfm", "name": f"{name} {n}x{d}x{h}x{w} ×{count}", "kernels": kernels * count,
                         **{k: count * r[k] for k in ("flops", "bytes", "t_compute_us", "t_memory_us", "predicted_us")},
                         "bound": r["bound"]})
    ds = [s[1] for s in shapes]
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
    c = num_classes  # Φ is d × c
    for d, k in sorted(Counter(ds).items()):
        r = reg_inverse_bwd(k, d)
        add("cfm", f"inverse bwd (torch GEMMs) {k}x{d}x{d}", r["flops"], r["bytes"], 2, PEAK["fp32"])
        # Φ_s (pooled features × one-hot), EMU fold, norms, Y·Φ_s and their backward: small GEMMs
        # and ~12 passes over the group's (d×d + d×c) matrices
        add("cfm", f"loss ops {k}x{d}", 3 * 2 * k * d * d * c, 12 * k * (d * d + d * c) * 4, 24, PEAK["fp32"])
    for (n, d, h, w), count in sorted(counts.items()):
        X = n * d * h * w * ELEM[dtype]
        add("sre2l", f"BN mean/var fwd + bwd {n}x{d}x{h}x{w} ×{count}", 0, count * 3 * X, 3 * count)
    return rows


def step_totals(rows: list[dict], label: str) -> dict:
    """Per part of ``full_step``'s rows: µs and launch gaps (one ``LAUNCH_GAP_S`` per kernel);
    the bare step (teacher + update), the CFM and the SRe2L steps, and their ratios."""
    by = {part: [0.0, 0] for part in ("teacher", "update", "cfm", "sre2l")}
    for r in rows:
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


def stats_pass_seconds(model, sites, batch: int, dtype: str, image: int, channels: int = 3, calls=None) -> float:
    """Seconds of one batch of the statistics pass: the teacher's forward and the Triton site
    statistics forward at every site in ``sites`` ((d, h, w) each; none: a bare forward, as
    evaluate's KD teacher), one launch gap per kernel; ``calls`` as ``teacher_layers`` takes it."""
    layers = teacher_layers(model, image, batch, dtype, channels, calls)
    stats = sum(site_stats_fwd(batch, d, h, w, dtype)["predicted_us"] * 1e-6 for d, h, w in sites)
    return pass_seconds(layers, "fwd", teacher_peak(dtype)) + stats + (len(layers) + 2 * len(sites)) * LAUNCH_GAP_S


def train_step_seconds(model, batch: int, dtype: str, image: int, channels: int = 3, calls=None) -> float:
    """Seconds of one training step of ``model`` at ``batch`` images: forward, input backward,
    weight backward (≈ another backward), an optimiser pass over fp32 parameters and their
    gradient and two states, one launch gap per kernel; ``calls`` as ``teacher_layers`` takes it."""
    layers = teacher_layers(model, image, batch, dtype, channels, calls)
    peak = teacher_peak(dtype)
    params = sum(p.numel() for p in model.parameters())
    return (pass_seconds(layers, "fwd", peak) + 2 * pass_seconds(layers, "bwd", peak) + params * 4 * 4 / HBM
            + (3 * len(layers) + 4) * LAUNCH_GAP_S)
