"""Compile every kernel variant the GPU dispatch can choose, for sm_80 and sm_90, without a GPU.

    python -m kernels.aot [--arch 80 90] [--json PATH] [--jobs N] [--only KERNEL]

For each ``kernels.ops.gpu_variants()`` entry and each architecture,
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

About a minute on two CPU cores (``--jobs`` compile processes, default one per core).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
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


def _format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "arch", "layout", "config", "smem", "regs", "spill", "tensor-core")
    lines = []
    for r in rows:
        first = (r["kernel"], r["dtype"], r["arch"], r["layout"], r["config"])
        if "error" in r:
            lines.append((*first, "-", "-", "-", "ERROR"))
            continue
        tc = f"wgmma x{r['wgmma']}" if r["wgmma"] else (f"mma x{r['mma']}" if r["mma"] else "-")
        lines.append((*first, str(r["shared_bytes"]), str(r["registers"]), str(r["spill_bytes"]), tc))
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
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="compile only the kernels whose name contains TEXT")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: unset TRITON_INTERPRET; it compiles real GPU kernels", file=sys.stderr)
        return 2

    from kernels.ops import gpu_variants

    ptxas = find_ptxas()
    variants = [v for v in gpu_variants() if args.only in v.kernel]
    jobs = [(v, arch) for arch in args.arch for v in variants]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_variant, [v for v, _ in jobs], [a for _, a in jobs], [ptxas] * len(jobs)))
    wall = time.perf_counter() - start

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
