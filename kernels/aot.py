"""Compile every kernel variant the GPU dispatch can choose, for sm_80 and sm_90, without a GPU.

    python -m kernels.aot [--arch 80 90] [--set all|general|nin] [--json PATH] [--jobs N] [--only KERNEL]

Two sets of variants, both by default. "general": every ``kernels.ops.gpu_variants()`` entry, the
table's configs with the specializations any launch of their kind gets. "nin": the launches the
NiN shapes make (``launch_variants``: the blocks of configs/d2l.yaml and configs/fast.yaml at batch
128 and 256, bf16, fp16 and fp32 as TF32, channels_last and NCHW), with the JIT's specializations of
their actual integer arguments: sizes, strides and grid-order numbers that are 1 become constants
and those divisible by 16 are marked, so a one-chunk block's STEP_T and CHUNKS are constants too.
These are the kernels that run in training, and each row says which shapes launch it.

For each variant and each architecture,
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers the kernel to PTX and
a cubin on this machine, and triton's own ``ptxas -v`` log gives registers and spills (when the
kernel comes from triton's cache, ptxas is run again on its PTX). A variant is a kernel, a dtype,
its constexprs (block sizes, BLOCK_C, dot precision), warps and stages, and the integer
specializations the JIT makes at launch: the layout's unit stride becomes the constant 1, and the
sizes and strides an "aligned" launch guarantees, plus C_PAD, are marked divisible by 16. Pointers
are taken as 16-byte aligned (PyTorch allocations are); the other integers stay general.

Printed per variant: shared memory (triton's allocation), registers, spill bytes, and the
tensor-core instructions found in the PTX (``mma`` on sm_80, ``wgmma`` on sm_90). Checks, with
exit status 1 and one line per failure if any fails:

- every variant compiles;
- a 16-bit or tf32 kernel that calls ``tl.dot`` uses tensor cores: ``mma.sync`` on sm_80 and
  ``wgmma.mma_async`` on sm_90 (fp32 "ieee" dots are FMA loops by design and are not checked);
- ptxas reports zero spill bytes;
- shared memory fits the card: 163 KiB per block on sm_80 (A100 opt-in), 227 KiB on sm_90 (H100).

About a minute per set and architecture on two CPU cores (``--jobs`` compile processes, default one
per core).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may opt in to
TC_INSTRUCTION = {80: "mma.sync", 90: "wgmma.mma_async"}  # tensor-core instruction per arch
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_FP32_POINTERS = {"part_ptr"}  # split partial sums are fp32 whatever the input dtype


def find_ptxas() -> str:
    """triton's bundled ptxas (what it compiles with), else $TRITON_PTXAS_PATH, else PATH's."""
    candidates = [os.environ.get("TRITON_PTXAS_PATH", ""),
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"),
                  shutil.which("ptxas") or ""]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no ptxas found: set TRITON_PTXAS_PATH or put CUDA's bin on PATH")


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    """ASTSource signature: pointer -> "*fp16"..., float -> "fp32", int -> "i32", or "constexpr"."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else "*" + _TRITON_DTYPE[dtype]
        elif name.endswith("_floor"):  # the float scalars (input_floor, p_floor)
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


# (channels, side) of the NiN blocks that configs/d2l.yaml and configs/fast.yaml build (224-pixel input,
# stem 11/4/0, width 1): written out, as this package imports nothing of nin_dist; a test derives
# them from the configs with nin_dist.shapes and compares
NIN_BLOCKS = ((96, 54), (256, 26), (384, 12), (10, 5))
NIN_BATCHES = (128, 256)
NIN_DTYPES = ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True))  # (dtype, TF32)
NIN_LAYOUTS = ("channels_last", "nchw")


def jit_specialization(value: int) -> str:
    """How triton's JIT specializes an int argument at launch: "constexpr" (equal to 1), "D" (marked
    divisible by 16), "" (neither), prefixed "i64 " when it needs 64 bits. Asked of triton's own
    ``native_specialize_impl`` (3.6 to 3.9 have it), else ``written_rule``, the same rule written out."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
    except (ImportError, TypeError, ValueError):  # moved or changed in a later triton
        return written_rule(value)
    return "constexpr" if kind == "constexpr" else ("i64 " if kind == "i64" else "") + (spec or "")


def written_rule(value: int) -> str:
    """triton's rule for an int argument (runtime/jit.py's specialize_impl, 3.x)."""
    if value == 1:
        return "constexpr"
    return ("i64 " if not -2**31 <= value < 2**31 else "") + ("D" if value % 16 == 0 else "")


def launch_variants(blocks=NIN_BLOCKS, batches=NIN_BATCHES, dtypes=NIN_DTYPES, layouts=NIN_LAYOUTS) -> dict:
    """The variants the launchers compile for these shapes, each with the shapes that launch it:
    ``{Variant: ["C96 54x54 N128 channels_last", ...]}`` (the layout of x). Each forward and backward is run on meta
    tensors with its launches recorded (``pointwise_mlp.recorded``), so the integer arguments are
    exactly the launchers' and get the JIT's specializations. Blocks the model leaves to cuDNN
    (``ops.cudnn_instead``) are skipped: no kernel of theirs runs."""
    from kernels import pointwise_mlp
    from kernels.ops import Variant, cudnn_instead, gpu_plan

    found: dict = {}
    for (C, side), N, (dtype, tf32), layout in itertools.product(blocks, batches, dtypes, layouts):
        if cudnn_instead(C, dtype, tf32):
            continue
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.empty((N, C, side, side), dtype=dtype, device="meta").to(memory_format=fmt)
        w = torch.empty((C, C, 1, 1), dtype=dtype, device="meta")
        b = torch.empty((C,), dtype=dtype, device="meta")
        plan = gpu_plan(C, dtype, tf32)
        with pointwise_mlp.recorded() as launches:
            y = pointwise_mlp.forward(x, w, b, w, b, True, plan)
            pointwise_mlp.backward(torch.empty_like(y), x, w, b, w, y, True, plan)
        for launch in launches:
            names = getattr(pointwise_mlp, launch.kernel).arg_names
            specs = {name: jit_specialization(v) for name, v in zip(names, launch.args, strict=False)
                     if type(v) is int}
            wide = [name for name, spec in specs.items() if spec.startswith("i64")]
            if wide:
                raise ValueError(f"{launch.kernel} at C={C} N={N}: 64-bit int arguments {wide}")
            kwargs = dict(launch.kwargs)
            warps, stages = kwargs.pop("num_warps"), kwargs.pop("num_stages")
            ones = tuple(n for n, spec in specs.items() if spec == "constexpr")
            # the kernel's own layout, from its unit stride: dW2's launch reads the channels_last h buffer
            # whatever x's layout; the reduce has none
            kernel_layout = ("any" if launch.kernel == "_bwd_reduce_kernel"
                             else "channels_last" if any(n.startswith("stride_") and n.endswith("c") for n in ones)
                             else "nchw")
            variant = Variant(launch.kernel, dtype, tuple(sorted(kwargs.items())), warps, stages, kernel_layout,
                              kernel_layout == "channels_last" and C % 16 == 0, ones,
                              tuple(n for n, spec in specs.items() if spec == "D"))
            label = f"C{C} {side}x{side} N{N} {layout}"
            found.setdefault(variant, [])
            if label not in found[variant]:
                found[variant].append(label)
    return found


def _parse_ptxas_log(log: str) -> dict[str, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return {"registers": int(regs.group(1)), "spill_bytes": spills}


def _run_ptxas(ptxas: str, ptx: str) -> dict[str, int]:
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags triton itself passes, so the numbers are those of the cubin it builds
        out = None
        for candidate in _ptxas_candidates(ptxas):
            out = subprocess.run([candidate, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True)
            if "Unsupported .version" not in out.stderr:
                break
        out.check_returncode()
    return _parse_ptxas_log(out.stdout + out.stderr)


def _ptxas_candidates(ptxas: str) -> list[str]:
    """`ptxas`, then the other ptxas builds beside it: triton 3.9 ships two (`ptxas` of CUDA 12.9 and
    `ptxas-blackwell` of CUDA 13) and emits PTX 9.x, which only the newer one reads."""
    folder = os.path.dirname(ptxas)
    siblings = sorted(os.path.join(folder, n) for n in os.listdir(folder or ".") if n.startswith("ptxas-"))
    return [ptxas, *(p for p in siblings if os.access(p, os.X_OK))]


def _compile(src, arch: int, options: dict):
    """triton.compile, keeping the ``ptxas -v`` log triton prints when asked to (None if not)."""
    nvidia_knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia_knobs is None or not hasattr(nvidia_knobs, "dump_ptxas_log"):
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), ""
    nvidia_knobs.dump_ptxas_log = True  # triton runs ptxas -v anyway; this prints its log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        nvidia_knobs.dump_ptxas_log = False
    return compiled, log.getvalue()


def compile_variant(variant, arch: int, ptxas: str) -> dict:
    """Compile one variant for one arch; return its table row (``error`` set on failure)."""
    from kernels import pointwise_mlp

    fn = getattr(pointwise_mlp, variant.kernel)
    constexprs = dict(variant.constexprs)
    precision = constexprs.get("INPUT_PRECISION")
    constexprs.update({name: 1 for name in variant.unit_strides})  # as the JIT specializes them
    row = {
        "kernel": variant.kernel,
        "dtype": _TRITON_DTYPE[variant.dtype] + ("/tf32" if precision == "tf32" else ""),
        "arch": f"sm_{arch}",
        "layout": variant.layout + ("/aligned" if variant.aligned else ""),
        "config": " ".join(f"{k}={v}" for k, v in variant.constexprs if k != "INPUT_PRECISION")
        + f" warps={variant.num_warps} stages={variant.num_stages}",
        "uses_dot": "tl.dot" in fn.src,
    }
    start = time.perf_counter()
    try:
        signature = _signature(fn, variant.dtype, constexprs)
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                   if name.endswith("_ptr") or name in variant.divisible}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        compiled, log = _compile(src, arch, {"num_warps": variant.num_warps,
                                             "num_stages": variant.num_stages})
        ptx = compiled.asm["ptx"]
        # a kernel from triton's cache skipped ptxas, so there is no log: run ptxas ourselves
        row.update(_parse_ptxas_log(log) or _run_ptxas(ptxas, ptx))
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["mma"] = ptx.count("mma.sync")
        row["wgmma"] = ptx.count("wgmma.mma_async")
    except Exception as exc:  # reported as a failed check, with the reason
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def check(row: dict) -> list[str]:
    """The failed checks of one row, as messages."""
    name = f"{row['kernel']} {row['dtype']} {row['arch']} {row['layout']} [{row['config']}]"
    if "error" in row:
        return [f"{name}: does not compile: {row['error']}"]
    arch = int(row["arch"][3:])
    problems = []
    tensor_core = row["dtype"] in ("bf16", "fp16", "fp32/tf32")
    if row["uses_dot"] and tensor_core:
        key = "wgmma" if arch == 90 else "mma"
        if row[key] == 0:
            problems.append(f"{name}: no {TC_INSTRUCTION[arch]} in the PTX (tensor cores unused)")
    if row["spill_bytes"] != 0:
        problems.append(f"{name}: ptxas spills {row['spill_bytes']} bytes")
    if row["shared_bytes"] > SMEM_LIMIT[arch]:
        problems.append(f"{name}: {row['shared_bytes']} bytes of shared memory, over the "
                        f"{SMEM_LIMIT[arch]} one block may use on {row['arch']}")
    return problems


def _launch_summary(labels: list[str]) -> str:
    """["C96 54x54 N128 nchw", "C96 54x54 N256 nchw"] -> "C96 N128,256": channels and batches."""
    batches: dict[str, list[str]] = {}
    for label in labels:
        channels, _, batch = label.split()[:3]
        batches.setdefault(channels, []).append(batch[1:])
    return " ".join(f"{c} N{','.join(dict.fromkeys(b))}" for c, b in batches.items()) or "-"


def _format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "arch", "layout", "config", "smem", "regs", "spill", "tensor-core", "NiN launches")
    lines = []
    for r in rows:
        first = (r["kernel"], r["dtype"], r["arch"], r["layout"], r["config"])
        shapes = _launch_summary(r.get("launched_by", []))
        if "error" in r:
            lines.append((*first, "-", "-", "-", "ERROR", shapes))
            continue
        tc = f"wgmma x{r['wgmma']}" if r["wgmma"] else (f"mma x{r['mma']}" if r["mma"] else "-")
        lines.append((*first, str(r["shared_bytes"]), str(r["registers"]), str(r["spill_bytes"]), tc, shapes))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*x) for x in [head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and failures as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: one per CPU)")
    parser.add_argument("--set", choices=("all", "general", "nin"), default="all",
                        help="the table's variants, the NiN shapes' launches, or both (default)")
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="compile only the kernels whose name contains TEXT")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET; it compiles real GPU kernels", file=sys.stderr)
        return 2

    from kernels.ops import gpu_variants

    ptxas = find_ptxas()
    launched_by: dict = {} if args.set == "general" else launch_variants(NIN_BLOCKS)
    candidates = ({} if args.set == "nin" else dict.fromkeys(gpu_variants())) | dict.fromkeys(launched_by)
    variants = [v for v in candidates if args.only in v.kernel]
    jobs = [(v, arch) for arch in args.arch for v in variants]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_variant, [v for v, _ in jobs], [a for _, a in jobs], [ptxas] * len(jobs)))
    wall = time.perf_counter() - start
    for row, (variant, _) in zip(rows, jobs, strict=True):
        row["launched_by"] = launched_by.get(variant, [])

    print(_format_table(rows))
    failures = [msg for row in rows for msg in check(row)]
    ok = [r for r in rows if "error" not in r]
    tc_rows = [r for r in ok if r["uses_dot"] and r["dtype"] != "fp32"]
    print(f"\n{len(rows)} variants ({len(variants)} per arch) compiled in {wall:.0f} s "
          f"with {ptxas}; {len(ok)} compiled; tensor cores in "
          f"{sum(1 for r in tc_rows if r['mma'] or r['wgmma'])}/{len(tc_rows)} 16-bit/tf32 dot "
          f"kernels; max spill {max((r['spill_bytes'] for r in ok), default=0)} bytes; max smem "
          + ", ".join(f"sm_{a} {max((r['shared_bytes'] for r in ok if r['arch'] == f'sm_{a}'), default=0)}"
                      for a in args.arch) + " bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "ptxas": ptxas, "rows": rows,
                       "failures": failures}, f, indent=1)
    if failures:
        print(f"\nkernels.aot: {len(failures)} check(s) failed:", file=sys.stderr)
        for msg in failures:
            print("  " + msg, file=sys.stderr)
        return 1
    print("kernels.aot: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
