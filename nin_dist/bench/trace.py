"""Where a profiled step's time goes, read from the Chrome trace a profile window wrote (nin_dist.profiling).

Parts of the network come from the named regions: the forward time of a part is its regions'
time; its backward time is that of the autograd functions whose forward ops ran inside those
regions (the profiler gives a forward op and its backward function the same sequence number).
Everything else on the training thread is "other" (DDP's own work, data, dropout, zero_grad).

FLOPs come from the shapes the trace records (`record_shapes`): 2 * N * C_out * H_out * W_out *
C_in/groups * kh * kw per forward conv, 4 * M * C * C per fused 1x1 pair (M = N * H * W). Training
counts the backward as twice the forward (the input grad and the weight grad), except the first
conv's, whose input (the image) needs no grad: once.

The gradient all-reduce is what DDP launches: the process group's `gloo:all_reduce` on gloo's worker
threads (launch to completion) over a flat bucket, 1-D; CrossRankBatchNorm2d's statistics, [2, C],
block inside its own regions and count there. On CUDA it is NCCL's AllReduce kernels.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

PARTS = ("kxk conv", "1x1 pairs", "BatchNorm", "pooling+loss", "optimizer", "other")
_STEP = re.compile(r"ProfilerStep#\d+$")
_BACKWARD_FN = "autograd::engine::evaluate_function: "


def part_of(region: str) -> str | None:
    """The part a region (or optimizer range) belongs to; None for a region that is not a part."""
    if re.fullmatch(r"block\d+/conv\d+x\d+", region):
        return "kxk conv"
    if region.endswith("/pair1x1"):
        return "1x1 pairs"
    if region.endswith("/batchnorm"):
        return "BatchNorm"
    if re.fullmatch(r"pool\d+|avgpool|loss", region):
        return "pooling+loss"
    if region == "optimizer.step" or region.startswith("Optimizer.zero_grad"):
        return "optimizer"
    if region == "evaluation":  # a window across an epoch's end: kept apart from the training step's parts
        return "evaluation"
    return None


def load(path: Path) -> list[dict]:
    """The complete ("X") events of a trace, .json or .json.gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def conv_flops(args: dict) -> float:
    """Forward FLOPs of one aten::conv2d from its recorded shapes and arguments (0 if they are missing)."""
    try:
        (n, _, h, w), (c_out, c_in_g, kh, kw) = args["Input Dims"][0], args["Input Dims"][1]
        stride, padding, dilation = (json.loads(args["Concrete Inputs"][i]) for i in (3, 4, 5))
    except (KeyError, IndexError, ValueError, TypeError):
        return 0.0
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return 2.0 * n * c_out * h_out * w_out * c_in_g * kh * kw


def pair_flops(args: dict) -> float:
    """Forward FLOPs of one fused 1x1 pair: two C x C GEMMs over the N * H * W pixels."""
    try:
        n, c, h, w = args["Input Dims"][0]
    except (KeyError, IndexError, ValueError):
        return 0.0
    return 4.0 * n * h * w * c * c


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def analyze(path: Path) -> dict:
    """One rank's trace: per part ms/step, FLOPs/step and top ops by self time; the step; the all-reduce."""
    events = load(path)
    steps = [e for e in events if _STEP.match(e["name"])]
    if not steps:
        raise ValueError(f"{path}: no ProfilerStep ranges: not a trace of a profile window")
    main = steps[0]["tid"]
    n_steps = len(steps)
    time_us: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    self_us: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seq_part: dict[int, str] = {}  # sequence number of a forward op -> the part it ran in
    backward: list[tuple[float, float]] = []
    computing: list[tuple[float, float]] = []  # backward's autograd functions: not its wait for the last bucket
    stack: list[list] = []  # [end, part, self time so far, name, region] of the enclosing events
    for e in sorted((e for e in events if e["tid"] == main), key=lambda e: (e["ts"], -e["dur"])):
        start, end = e["ts"], e["ts"] + e["dur"]
        while stack and stack[-1][0] <= start:
            _close(stack.pop(), self_us)
        outer_part = stack[-1][1] if stack else None
        outer_region = stack[-1][4] if stack else None
        name, args = e["name"], e.get("args", {})
        own = part_of(name) if e.get("cat") == "user_annotation" else None
        if name.startswith(_BACKWARD_FN) and outer_part is None:
            own = seq_part.get(args.get("Sequence number"), "other")
        if outer_part == "evaluation":  # the model's regions inside it are evaluation's
            own = None
        part = own or outer_part
        if own and own != outer_part:
            time_us[own] += e["dur"]
        if name == "backward":
            backward.append((start, end))
        elif name.startswith(_BACKWARD_FN):
            computing.append((start, end))
        region = name if own and not name.startswith(_BACKWARD_FN) else outer_region
        if part and "Sequence number" in args and not name.startswith(_BACKWARD_FN):
            seq_part.setdefault(args["Sequence number"], part)
        # Autocast's aten::conv2d calls aten::conv2d again on the cast inputs: count the outer one.
        if name == "aten::conv2d" and part and not any(frame[3] == name for frame in stack):
            first = region is not None and region.startswith("block1/conv")
            flops[part] += conv_flops(args) * (2 if first else 3)
        elif name.endswith("fused_pointwise_mlp") and part and not name.startswith(_BACKWARD_FN):
            flops[part] += pair_flops(args) * 3
        if stack:
            stack[-1][2] -= e["dur"]
        label = f"{name} (its own Python, waits)" if e.get("cat") == "user_annotation" else name
        stack.append([end, part, float(e["dur"]), label, region])
    while stack:
        _close(stack.pop(), self_us)
    step_us = sum(e["dur"] for e in steps)
    time_us["other"] = max(0.0, step_us - sum(time_us[p] for p in (*PARTS, "evaluation") if p != "other"))
    allreduce = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if _is_gradient_allreduce(e, main)])
    reduce_us = _length(allreduce)
    # DDP's backward returns once the last bucket is reduced, so all of it lies inside backward's range;
    # what hides it is backward's compute running beside it.
    overlap_us = _intersection(allreduce, _union(computing))
    return {
        "steps": n_steps, "step_ms": step_us / 1e3 / n_steps,
        "parts": {p: {"ms": time_us[p] / 1e3 / n_steps, "gflop": flops[p] / 1e9 / n_steps,
                      "top_ops": sorted(((op, us / 1e3 / n_steps) for op, us in self_us[p].items()),
                                        key=lambda kv: kv[1], reverse=True)[:3]} for p in PARTS},
        "allreduce_ms": reduce_us / 1e3 / n_steps,
        "allreduce_overlap": overlap_us / reduce_us if reduce_us else None,
        "backward_ms": _length(_union(backward)) / 1e3 / n_steps,
        "evaluation_ms": time_us["evaluation"] / 1e3 / n_steps,
    }


def _close(frame: list, self_us) -> None:
    end, part, own_us, name, _region = frame
    if not _STEP.match(name):
        self_us[part or "other"][name] += max(0.0, own_us)


def _is_gradient_allreduce(e: dict, main_tid) -> bool:
    name = e["name"]
    if e.get("cat") == "kernel":
        return "nccl" in name.lower() and "allreduce" in name.lower()
    if name not in ("gloo:all_reduce",) or e["tid"] == main_tid:
        return False
    dims = e.get("args", {}).get("Input Dims") or [[]]
    return len(dims[0]) == 1  # DDP's flat bucket; CrossRankBatchNorm2d's statistics are [2, C]
