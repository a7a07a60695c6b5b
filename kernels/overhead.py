"""Python time of one fused_pointwise_mlp call up to its kernel launches, per NiN block.

    TRITON_INTERPRET=1 python -m kernels.overhead [--calls N] [--batch-size B]   # on a CPU
    python -m kernels.overhead                                                   # on a GPU

What a call spends before a kernel runs: the op's dispatch, input checks, the plan, layout
arrangement, output allocation and weight padding. The launches themselves are replaced, for the
measurement only, by a stub that returns at once: under the interpreter a launch runs the kernel in
Python, and on a GPU it is a separate cost (``nin-bench kernels`` times it with CUDA graphs). Each
row is the median over ``--calls`` calls, in µs:

- ``fwd``: the public function with inputs that require grad (autograd records the op);
- ``fwd_step``: the same after an in-place update of the weights, as a training step sees them
  (a cached padded weight is stale then; the update itself is outside the timing);
- ``bwd``: the backward op, called as autograd calls it, on the forward's saved tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from . import ops, pointwise_mlp

BLOCKS = ((96, 54), (256, 26), (384, 12), (10, 5))  # NiN's (channels, spatial size) at 224 pixels


class _NoLaunch:
    """Stands in for ``kernel[grid]``: takes the launch's arguments and does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launches_stubbed():
    """Within: every kernel launch of ``kernels.pointwise_mlp`` returns at once, computing nothing."""
    original = pointwise_mlp._launchable
    pointwise_mlp._launchable = lambda kernel: _NoLaunch()
    try:
        yield
    finally:
        pointwise_mlp._launchable = original


def _median_us(fn, calls: int, before=None) -> float:
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure(C: int, size: int, batch: int, dtype: torch.dtype, device: str, calls: int) -> dict:
    """One block's row: median µs of fwd, fwd_step and bwd, with the launches stubbed."""
    x = torch.randn(batch, C, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    params = [torch.randn(C, C, 1, 1), torch.randn(C), torch.randn(C, C, 1, 1), torch.randn(C)]
    params = [p.to(device, dtype).requires_grad_() for p in params]
    x.requires_grad_()
    w1, b1, w2, _ = params

    def bump_weights():  # what optimizer.step does to the weights: an in-place update
        with torch.no_grad():
            w1.add_(0.0)
            w2.add_(0.0)

    with launches_stubbed():
        fwd = _median_us(lambda: ops.fused_pointwise_mlp(x, *params), calls)
        fwd_step = _median_us(lambda: ops.fused_pointwise_mlp(x, *params), calls, before=bump_weights)
        y = ops.fused_pointwise_mlp(x, *params).detach()
        dy = torch.ones_like(y)
        saved = (x.detach(), w1.detach(), b1.detach(), w2.detach(), y)
        bwd = _median_us(lambda: ops._backward_op(dy, *saved, True), calls)
    return {"C": C, "size": size, "batch": batch, "fwd_us": round(fwd, 1), "fwd_step_us": round(fwd_step, 1),
            "bwd_us": round(bwd, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per row; the median is shown")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not ops.INTERPRETED:
        print("kernels.overhead: no CUDA GPU; set TRITON_INTERPRET=1 to measure on the CPU", file=sys.stderr)
        return 2
    # the interpreter has no bf16; the Python path is the same for fp32
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.set_grad_enabled(True)
    print(f"{'C':>4} {'size':>4}  {'fwd µs':>8} {'fwd_step µs':>11} {'bwd µs':>8}   ({device}, {dtype}, "
          f"batch {args.batch_size}, median of {args.calls} calls, launches stubbed)")
    for C, size in BLOCKS:
        row = measure(C, size, args.batch_size, dtype, device, args.calls)
        print(f"{C:>4} {size:>4}  {row['fwd_us']:>8} {row['fwd_step_us']:>11} {row['bwd_us']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
