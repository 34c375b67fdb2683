"""Ahead-of-time compile report of every kernel, for a GPU target, without a GPU.

    unidd-fast kernels --target sm_90 [--imagenet] [--sms 132] [--json FILE]
    python -m unidd_fast.kernels.compile_report --target sm_90 --json FILE

The Triton launchers run on representative inputs (every dtype, layout, β kind and width
class they accept, the float64 β pointer of graph-safe mode, a single-chunk finalize;
``--imagenet``: every launch of ImageNet recover at 224 px, ResNet-18 and ResNet-50 sites
(found by hooking the torchvision models, ``opcheck.site_inputs``), class-batch n in
{100, 200, 500, 1000}, bf16 and fp32, NCHW and channels_last, the inverse of every width
group in fp32 and float64) inside ``launch.recording()``, so the exact signature, constexprs and
integer/alignment specialisations they would launch are recorded, de-duplicated and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.
``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) gives registers, spills
(LOCAL bytes per thread) and static shared memory (plus the dynamic shared memory of the
launch); the PTX tells whether tensor-core instructions (wgmma / mma) were emitted where the
kernel has a ``tl.dot``. The CUDA files are compiled for the same ``--target`` by
``cuda/nvcc.py``'s ``compile_report()``, and their launches at the same inputs are read from
the launchers' own host code (``cuda/emulator.py``, ``LaunchRecorder``).

Each launch's grid is set against the SM count (``--sms``, 132 on an H100 SXM or H200): the
fraction of SMs it can occupy, the blocks one SM holds (from registers, shared memory and
warps: sm_90 limits) and the waves; launches that leave more than half the SMs idle are flagged.

Output (``--json``): {"compiled": [{"kernel", "backend", "target", "ok", "registers",
"spill_bytes", "shared_bytes", "tensor_cores"} (plus "variant", "example",
"tensor_cores_expected", "error")], "launches": [{"kernel", "backend", "example", "grid",
"programs", "warps", "blocks_per_sm", "waves", "sm_fraction", "low_occupancy"}], "summary"}
and printed tables. Exit status 1 if any kernel failed to compile or spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TENSOR_CORE_PTX = re.compile(r"\bwgmma\.mma_async|\bmma\.sync")
RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# ResNet-18 site geometries (d, h, w): an early and a late one, and an odd width that
# selects the 32-channel tile
GEOMETRIES = ((64, 56, 56), (512, 7, 7), (24, 5, 7))
IMAGENET_ARCHS = ("resnet18", "resnet50")
IMAGENET_BATCHES = (100, 200, 500, 1000)
IMAGENET_IMAGE = 224
SMS = 132  # H100 SXM, H200
LOW_SM_FRACTION = 0.5  # a launch whose programs fill fewer SMs than this is flagged
# per-SM limits of sm_80/sm_90 for the resident-blocks estimate (registers are allocated per
# warp in units of 256; shared memory: 228 KiB on sm_90 with 1 KiB reserved per block)
SM_REGISTERS, SM_MAX_BLOCKS, SM_MAX_WARPS = 65536, 32, 64
SM_SHARED = {90: 228 * 1024, 80: 164 * 1024}


def parse_target(text: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", text)
    if not match:
        raise SystemExit(f"--target must look like sm_90 or sm_80, got {text!r}")
    return int(match.group(1))


def _layouts():
    import torch

    return (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last))


def site_stats_examples():
    """(label, recorded launches) of the site-statistics forward and backward at small
    representative inputs, one of them with a single chunk (the finalize's chunks == 1)."""
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for d, h, w in GEOMETRIES:
            for layout, fmt in _layouts():
                n = 4
                # a GPU picks one sample per chunk for small d (many programs needed) and
                # several, or one chunk, for large d: record each specialisation
                for chunks in ((n,) if d <= 64 else (n // 2, 1)):
                    feat = torch.empty(n, d, h, w, dtype=dtype, memory_format=fmt)
                    yield f"{str(dtype)[6:]} d={d} {h}x{w} {layout} chunks={chunks}", _stats_launches(feat, chunks), False


def _stats_launches(feat, chunks):
    import torch

    from .triton.launch import recording
    from .triton.site_stats import site_stats_backward, site_stats_forward

    n, d = feat.shape[:2]
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    with recording() as launches:
        site_stats_forward(feat, chunks)
        site_stats_backward(feat, torch.empty(d, dtype=acc), torch.empty(d, d, dtype=acc), torch.empty(d, dtype=acc),
                            torch.empty(n, d, dtype=acc))
    return launches


def _beta_kinds(dtype):
    """β as eager code passes it (a float), as graph-safe mode does (a 0-d float64 device
    tensor, also with fp32 matrices: CFMLoss.make_graph_safe), and in A's dtype."""
    import torch

    kinds = [("float", 0.1), ("float64 tensor", torch.tensor(0.1, dtype=torch.float64))]
    if dtype != torch.float64:
        kinds.append((f"{str(dtype)[6:]} tensor", torch.tensor(0.1, dtype=dtype)))
    return kinds


def _inverse_launches(k, d, dtype, beta):
    import torch

    from .triton.launch import recording
    from .triton.reg_inverse import cholesky_inverse

    with recording() as launches:
        cholesky_inverse(torch.empty(k, d, d, dtype=dtype), beta)
    return launches


def reg_inverse_examples():
    """(label, recorded launches) of the batched regularised inverse."""
    import torch

    for dtype in (torch.float32, torch.float64):
        for d in (64, 512, 24):
            for kind, beta in _beta_kinds(dtype):
                yield f"{str(dtype)[6:]} 5x{d}x{d} beta={kind}", _inverse_launches(5, d, dtype, beta), False


def imagenet_sites(arch: str, image: int = IMAGENET_IMAGE) -> tuple[list[tuple], dict[int, int]]:
    """Distinct (d, h, w) of the BatchNorm sites of torchvision's ``arch`` at ``image`` px, and
    the number of sites per width (one batched inverse per width, as CFMLoss groups them)."""
    from collections import Counter

    from unidd_fast.opcheck import site_inputs

    sites = [s[1:] for s in site_inputs(arch, image, 1)]
    return list(dict.fromkeys(sites)), dict(sorted(Counter(d for d, _, _ in sites).items()))


def imagenet_cases(archs=IMAGENET_ARCHS, batches=IMAGENET_BATCHES, dtypes=("bfloat16", "float32"),
                   layouts=("channels_last", "NCHW")):
    """(label, kind, args) of every launch set of ImageNet recover: kind "stats" with
    (n, d, h, w, dtype, memory format, chunks), kind "inverse" with (k, d, dtype, β)."""
    import torch

    from .triton.site_stats import num_chunks

    for arch in archs:
        shapes, widths = imagenet_sites(arch)
        for dtype in (getattr(torch, name) for name in dtypes):
            elem = torch.empty((), dtype=dtype).element_size()
            for layout, fmt in _layouts():
                if layout not in layouts:
                    continue
                for n in batches:
                    for d, h, w in shapes:
                        chunks = num_chunks(n, d, n * h * w, elem)
                        yield (f"{arch} n={n} {str(dtype)[6:]} {d}x{h}x{w} {layout}", "stats",
                               (n, d, h, w, dtype, fmt, chunks))
        for d, k in widths.items():
            for dtype in (torch.float32, torch.float64):  # float64: promoted inside a CUDA-graph capture
                for kind, beta in _beta_kinds(dtype)[:2]:
                    yield f"{arch} inverse {k}x{d}x{d} {str(dtype)[6:]} beta={kind}", "inverse", (k, d, dtype, beta)


def case_examples(cases):
    """(label, recorded Triton launches, True) of ``imagenet_cases``-style ``cases``."""
    import torch

    for label, kind, args in cases:
        if kind == "stats":
            n, d, h, w, dtype, fmt, chunks = args
            yield label, _stats_launches(torch.empty(n, d, h, w, dtype=dtype, memory_format=fmt), chunks), True
        else:
            yield label, _inverse_launches(*args), True


def specialise(kernel, args, meta, backend):
    """What the JIT would compile for this launch: (options, signature, constexprs, attrs)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    return kernel._pack_args(backend, meta, bound, specialization, options)


def expects_tensor_cores(kernel, constexprs) -> bool:
    """A ``tl.dot`` should become wgmma/mma, except in the one-tile specialisation (nb == 1)
    of the blocked-Cholesky kernels, whose block loops (and dots) are statically empty."""
    names = list(kernel.arg_names)
    one_tile = any(names[i] == "nb" and v == 1 for (i,), v in constexprs.items())
    return "tl.dot(" in kernel.src and not one_tile


def variant_name(kernel, signature, constexprs) -> str:
    """The first pointer's type, the other pointers of another type (the float64 β pointer of
    graph-safe mode next to fp32 matrices), and the constexprs."""
    names = list(kernel.arg_names)
    pointers = [(k, v) for k, v in signature.items() if v.startswith("*")]
    parts = [f"{k}={v}" for i, (k, v) in enumerate(pointers) if i == 0 or v != pointers[0][1]]
    for (index,), value in sorted(constexprs.items()):
        value = getattr(value, "name", value)
        parts.append(f"{names[index]}={value}")
    return ",".join(parts)


def resource_usage(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    match = RESOURCES.search(out)
    if not match:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    reg, _stack, shared, local = (int(g) for g in match.groups())
    return {"registers": reg, "spill_bytes": local, "static_shared": shared}


def compile_one(kernel, signature, constexprs, attrs, options, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    return {"registers": usage["registers"], "spill_bytes": usage["spill_bytes"],
            "shared_bytes": usage["static_shared"] + int(compiled.metadata.shared),
            "tensor_cores": bool(TENSOR_CORE_PTX.search(compiled.asm["ptx"]))}


def triton_report(arch: int, examples, sms: int) -> tuple[list[dict], list[dict]]:
    """(compiled records, launch records) of the Triton launches in ``examples`` [(label,
    launches, real)]: every distinct specialisation compiled once, every launch of a real
    (full-size) example set against ``sms`` SMs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    compiled: dict[tuple, dict] = {}
    launches = []
    for label, recorded, real in examples:
        for kernel, grid, args, meta in recorded:
            options, signature, constexprs, attrs = specialise(kernel, args, meta, backend)
            key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items(), key=str)))
            if key not in compiled:
                record = {"kernel": kernel.__name__, "backend": "triton", "target": f"sm_{arch}",
                          "variant": variant_name(kernel, signature, constexprs), "example": label,
                          "tensor_cores_expected": expects_tensor_cores(kernel, constexprs), "ok": False,
                          "registers": None, "spill_bytes": None, "shared_bytes": None, "tensor_cores": None,
                          "error": None}
                try:
                    record.update(compile_one(kernel, signature, constexprs, attrs, options, arch), ok=True)
                except Exception as err:  # report every failure, keep compiling the rest
                    record["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                compiled[key] = record
            if real:
                launches.append(launch_record(compiled[key], label, grid, options.num_warps, arch, sms))
    return list(compiled.values()), launches


def blocks_per_sm(registers: int | None, shared_bytes: int | None, warps: int, arch: int) -> int | None:
    """Blocks of ``warps`` warps one SM holds at these registers/thread and bytes of shared
    memory (the CUDA occupancy rules of sm_80/sm_90), or None when not compiled."""
    if registers is None or shared_bytes is None:
        return None
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [SM_MAX_BLOCKS, SM_MAX_WARPS // warps, SM_REGISTERS // (regs_per_warp * warps)]
    if shared_bytes:
        limits.append(SM_SHARED.get(arch, SM_SHARED[80]) // (shared_bytes + 1024))
    return min(limits)


def launch_record(compiled: dict, example: str, grid, warps: int, arch: int, sms: int) -> dict:
    """One launch set against ``sms`` SMs: programs (grid product; programs that exit at once,
    such as the upper-triangle ones of a symmetric grid, count), the fraction of SMs they can
    occupy, resident blocks per SM and waves."""
    grid = tuple(int(g) for g in grid)
    programs = 1
    for g in grid:
        programs *= g
    per_sm = blocks_per_sm(compiled.get("registers"), compiled.get("shared_bytes"), warps, arch)
    fraction = min(programs, sms) / sms
    return {"kernel": compiled["kernel"], "backend": compiled["backend"], "example": example, "grid": list(grid),
            "programs": programs, "warps": warps, "blocks_per_sm": per_sm,
            "waves": programs / (sms * per_sm) if per_sm else None, "sm_fraction": fraction,
            "low_occupancy": fraction < LOW_SM_FRACTION}


def cuda_compiled(target: str) -> list[dict]:
    from .cuda.nvcc import compile_report

    return list(compile_report((target,)))


_CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def cuda_launches(cases, compiled: list[dict], arch: int, sms: int) -> list[dict]:
    """Launch records of the CUDA backend at ``cases`` (``imagenet_cases`` format; float64
    cases run the torch backend and are skipped), read from the launchers' host code
    (``LaunchRecorder``: meta tensors, nothing allocated or run)."""
    import tempfile

    import torch

    from .cuda import ops
    from .cuda.emulator import LaunchRecorder, build_emulator

    by_name = {r["kernel"]: r for r in compiled if r["ok"]}
    records = []
    with tempfile.TemporaryDirectory(prefix="unidd_emu_") as tmp:
        recorder = LaunchRecorder(build_emulator(tmp))
        for label, kind, args in cases:
            if kind == "stats":
                n, d, h, w, dtype, fmt, _ = args
                if dtype == torch.float64:
                    continue
                feat = torch.empty(n, d, h, w, dtype=dtype, device="meta", memory_format=fmt)
                x, layout = ops.feature_layout(feat)
                _, mu, _ = ops.stats_forward(x, layout, recorder)
                ops.stats_backward(x, layout, mu, torch.empty(d, d, device="meta"), None, None, recorder)
            else:
                k, d, dtype, beta = args
                if dtype == torch.float64 or torch.is_tensor(beta):  # every β reaches the kernels as an fp32 tensor
                    continue
                ops.inverse_forward([torch.empty(k, d, d, device="meta")], torch.empty((), device="meta"), recorder)
                dtype = None
            for name, grid, block in recorder.launches():
                full = name.replace("<T>", f"<{_CUDA_TYPES[str(dtype)[6:]]}>") if dtype is not None else name
                comp = by_name.get(full, {"kernel": full, "backend": "cuda"})
                warps = -(-block[0] * block[1] * block[2] // 32)
                records.append(launch_record(comp, label, grid, warps, arch, sms))
    return records


def summary(compiled: list[dict], launches: list[dict], sms: int) -> dict:
    low = [r for r in launches if r["low_occupancy"]]
    return {"specialisations": len(compiled),
            "per_backend": {b: sum(r["backend"] == b for r in compiled) for b in ("triton", "cuda")},
            "failed": sum(not r["ok"] for r in compiled),
            "spilling": sum((r.get("spill_bytes") or 0) > 0 for r in compiled),
            "launches": len(launches), "sms": sms, "low_occupancy_launches": len(low),
            "low_occupancy_kernels": sorted({f"{r['backend']}:{r['kernel']}" for r in low})}


def print_table(records: list[dict]) -> None:
    head = (f"{'kernel':28} {'backend':7} {'target':7} {'ok':3} {'regs':>5} {'spill':>6} {'smem':>7} {'TC':>4}  "
            f"{'example':38} variant")
    print(head)
    print("-" * len(head))
    for r in records:
        tc = {True: "yes", False: "no", None: "-"}[r.get("tensor_cores")]
        if r.get("tensor_cores_expected") is False:
            tc = "n/a"
        print(f"{r['kernel'][:28]:28} {r['backend']:7} {r['target']:7} {'yes' if r['ok'] else 'NO':3} "
              f"{r['registers'] if r['registers'] is not None else '-':>5} "
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>6} "
              f"{r['shared_bytes'] if r['shared_bytes'] is not None else '-':>7} {tc:>4}  "
              f"{r.get('example') or '':38} {r.get('variant') or ''}{'  ' + r['error'] if r.get('error') else ''}")


def print_launches(launches: list[dict], sms: int, show_all: bool) -> None:
    """Per kernel and backend: launch sets, the SM fraction range, and the flagged ones
    (every launch with ``show_all``, else at most 12 flagged ones per kernel)."""
    print(f"\nLaunches against {sms} SMs (SM fraction = min(programs, SMs) / SMs; LOW below {LOW_SM_FRACTION:.0%})")
    head = f"{'kernel':28} {'backend':7} {'launches':>8} {'programs':>15} {'SM fraction':>13} {'blocks/SM':>9} {'LOW':>5}"
    print(head)
    print("-" * len(head))
    groups: dict[tuple, list[dict]] = {}
    for r in launches:
        groups.setdefault((r["backend"], r["kernel"]), []).append(r)
    for (backend, kernel), rows in groups.items():
        progs = [r["programs"] for r in rows]
        frac = [r["sm_fraction"] for r in rows]
        per_sm = sorted({r["blocks_per_sm"] for r in rows if r["blocks_per_sm"] is not None})
        per_sm_text = "-" if not per_sm else f"{per_sm[0]}" if len(per_sm) == 1 else f"{per_sm[0]}-{per_sm[-1]}"
        low = sum(r["low_occupancy"] for r in rows)
        print(f"{kernel[:28]:28} {backend:7} {len(rows):8} {min(progs):>7}-{max(progs):<7} "
              f"{min(frac):>6.0%}-{max(frac):<6.0%} {per_sm_text:>9} {low:5}")
    flagged = [r for r in launches if r["low_occupancy"] or show_all]
    if flagged:
        print(f"\n{'all launches' if show_all else 'LOW launches'}: kernel, backend, grid, programs, SM fraction, example")
        shown: dict[tuple, int] = {}
        for r in flagged:
            key = (r["backend"], r["kernel"])
            shown[key] = shown.get(key, 0) + 1
            if show_all or shown[key] <= 12:
                print(f"  {r['kernel'][:28]:28} {r['backend']:7} {str(tuple(r['grid'])):18} {r['programs']:7} "
                      f"{r['sm_fraction']:6.0%}  {r['example']}")
        for key, count in shown.items():
            if not show_all and count > 12:
                print(f"  ... {count - 12} more LOW launches of {key[1]} ({key[0]})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unidd-fast kernels", description="AOT compile report of every kernel")
    parser.add_argument("--target", default="sm_90", help="GPU architecture of both the Triton and the CUDA "
                        "part, e.g. sm_90 (default), sm_90a or sm_80")
    parser.add_argument("--json", type=Path, help="write the compiled and launch records to this JSON file")
    parser.add_argument("--skip-cuda", action="store_true", help="report the Triton kernels only")
    parser.add_argument("--imagenet", action="store_true",
                        help="every launch of ImageNet recover (ResNet-18/50 at 224 px, n = 100/200/500/1000, "
                             "bf16/fp32, NCHW/channels_last, every inverse width group): slower")
    parser.add_argument("--sms", type=int, default=SMS, help=f"SM count the grids are set against (default {SMS}: "
                        "H100 SXM, H200)")
    parser.add_argument("--all-launches", action="store_true", help="print every launch, not only the LOW ones")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.target):
        parser.error(f"--target must look like sm_90 or sm_80, got {args.target!r}")
    if args.sms < 1:
        parser.error(f"--sms must be a positive SM count (132 on an H100 SXM), got {args.sms}")
    arch = parse_target(args.target)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter replaces @triton.jit at import: compile in a fresh process without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "unidd_fast.kernels.compile_report", *argv], env=env).returncode
    if args.imagenet:
        cases = list(imagenet_cases())
    else:  # what a default ImageNet ResNet-18 run at class-batch 100 launches
        cases = list(imagenet_cases(("resnet18",), (100,), ("bfloat16",), ("channels_last",)))
    examples = (e for g in (site_stats_examples(), reg_inverse_examples(), case_examples(cases)) for e in g)
    compiled, launches = triton_report(arch, examples, args.sms)
    if not args.skip_cuda:
        cuda = cuda_compiled(args.target)
        compiled += cuda
        if all(r["ok"] for r in cuda):
            launches += cuda_launches(cases, cuda, arch, args.sms)
    print_table(compiled)
    print_launches(launches, args.sms, args.all_launches)
    totals = summary(compiled, launches, args.sms)
    print(f"\n{totals['specialisations']} specialisations ({totals['per_backend']['triton']} Triton, "
          f"{totals['per_backend']['cuda']} CUDA) for {args.target}, {totals['failed']} failed, "
          f"{totals['spilling']} spilling; {totals['launches']} launch sets, {totals['low_occupancy_launches']} "
          f"fill < {LOW_SM_FRACTION:.0%} of {args.sms} SMs")
    if args.json:
        from unidd_fast.real_stats import atomic_write

        report = {"compiled": compiled, "launches": launches, "summary": totals}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    failed = [r for r in compiled if not r["ok"] or (r.get("spill_bytes") or 0) > 0]
    if failed:
        print(f"{len(failed)} kernel(s) failed to compile or spill registers", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
