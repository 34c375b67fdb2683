"""Ahead-of-time compile report of every kernel, for a GPU target, without a GPU.

    unidd-fast kernels --target sm_90 --json FILE
    python -m unidd_fast.kernels.compile_report --target sm_90 --json FILE

The Triton launchers run on representative inputs (every dtype, layout, β kind and width
class they accept; ResNet-18 geometries) inside ``launch.recording()``, so the exact
signature, constexprs and integer/alignment specialisations they would launch are
recorded, de-duplicated and compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``. ``cuobjdump --dump-resource-usage`` (shipped in the
triton wheel) gives registers, spills (LOCAL bytes per thread) and static shared memory
(plus the dynamic shared memory of the launch); the PTX tells whether tensor-core
instructions (wgmma / mma) were emitted where the kernel has a ``tl.dot``. The CUDA
files are appended from ``cuda/nvcc.py``'s ``compile_report()``.

Output: a JSON list of {"kernel", "backend", "target", "ok", "registers", "spill_bytes",
"shared_bytes", "tensor_cores"} (plus "variant", "example", "tensor_cores_expected", "error") and a
printed table. Exit status 1 if any kernel failed to compile or spills.
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


def parse_target(text: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", text)
    if not match:
        raise SystemExit(f"--target must look like sm_90 or sm_80, got {text!r}")
    return int(match.group(1))


def site_stats_examples():
    """(label, recorded launches) of the site-statistics forward and backward."""
    import torch

    from .triton.launch import recording
    from .triton.site_stats import site_stats_backward, site_stats_forward

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for d, h, w in GEOMETRIES:
            for channels_last in (False, True):
                n = 4
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                feat = torch.empty(n, d, h, w, dtype=dtype).contiguous(memory_format=fmt)
                # a GPU picks one sample per chunk for small d (many programs needed) and
                # several for large d: record both specialisations
                chunks = n if d <= 64 else n // 2
                with recording() as launches:
                    site_stats_forward(feat, chunks)
                    site_stats_backward(feat, torch.empty(d, dtype=acc), torch.empty(d, d, dtype=acc),
                                        torch.empty(d, dtype=acc), torch.empty(n, d, dtype=acc))
                label = f"{str(dtype)[6:]} d={d} {h}x{w} {'channels_last' if channels_last else 'NCHW'}"
                yield label, launches


def reg_inverse_examples():
    """(label, recorded launches) of the batched regularised inverse."""
    import torch

    from .triton.launch import recording
    from .triton.reg_inverse import cholesky_inverse

    for dtype in (torch.float32, torch.float64):
        for d in (64, 512, 24):
            for beta in (0.1, torch.tensor(0.1, dtype=dtype)):
                with recording() as launches:
                    cholesky_inverse(torch.empty(5, d, d, dtype=dtype), beta)
                yield f"{str(dtype)[6:]} d={d} beta={'tensor' if torch.is_tensor(beta) else 'float'}", launches


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
    names = list(kernel.arg_names)
    parts = [f"{k}={v}" for k, v in signature.items() if v.startswith("*")][:1]
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


def triton_report(arch: int) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    seen = set()
    records = []
    for examples in (site_stats_examples(), reg_inverse_examples()):
        for label, launches in examples:
            for kernel, _grid, args, meta in launches:
                options, signature, constexprs, attrs = specialise(kernel, args, meta, backend)
                key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items(), key=str)),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items(), key=str)))
                if key in seen:
                    continue
                seen.add(key)
                record = {"kernel": kernel.__name__, "backend": "triton", "target": f"sm_{arch}",
                          "variant": variant_name(kernel, signature, constexprs), "example": label,
                          "tensor_cores_expected": expects_tensor_cores(kernel, constexprs), "ok": False, "registers": None,
                          "spill_bytes": None, "shared_bytes": None, "tensor_cores": None, "error": None}
                try:
                    record.update(compile_one(kernel, signature, constexprs, attrs, options, arch), ok=True)
                except Exception as err:  # report every failure, keep compiling the rest
                    record["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                records.append(record)
    return records


def cuda_report() -> list[dict]:
    from .cuda.nvcc import compile_report

    return list(compile_report())


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unidd-fast kernels", description="AOT compile report of every kernel")
    parser.add_argument("--target", default="sm_90", help="GPU architecture, e.g. sm_90 (default) or sm_80")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--skip-cuda", action="store_true", help="report the Triton kernels only")
    args = parser.parse_args(argv)
    arch = parse_target(args.target)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter replaces @triton.jit at import: compile in a fresh process without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "unidd_fast.kernels.compile_report", *argv], env=env).returncode
    records = triton_report(arch)
    if not args.skip_cuda:
        records += cuda_report()
    print_table(records)
    if args.json:
        from unidd_fast.real_stats import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    failed = [r for r in records if not r["ok"] or (r.get("spill_bytes") or 0) > 0]
    if failed:
        print(f"{len(failed)} kernel(s) failed to compile or spill registers", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
