"""`nin-bench`: benchmarks that print a table and write JSON. Not tests: numbers, side by side.

    nin-bench data      # our device-resident batches vs the seed's torchvision DataLoader
    nin-bench kernels   # fused Triton 1x1 pairs vs cuDNN eager vs torch.compile (CUDA)
    nin-bench train     # training img/s and MFU: the seed's recipe, then each switch added
    nin-bench scaling   # 1 process vs N torchrun processes, same global batch
    nin-bench tta       # training and wall seconds to a target accuracy over seeds, configs side by side
    nin-bench traffic   # modelled HBM/L2 bytes, FLOPs and predicted µs of each kernel (no GPU)
    nin-bench profile   # where a step's time goes: each part's share and FLOP/s, the all-reduce's overlap
    nin-bench sweep     # trials per hour: 1 sweep worker x all threads vs K workers x fewer
    nin-bench ablate    # each recipe change's effect on val accuracy, paired by seed, vs the seed-to-seed noise

Every benchmark measures its baseline in the same run and reports ratios to it; absolute times mean
something only on the machine named in the JSON.
"""

from __future__ import annotations

import argparse
import sys

from nin_dist.bench import ablate, data, gpu, kernels, profile, scaling, sweep, traffic, train, tta
from nin_dist.errors import UserError, report
from nin_dist.logs import init_logging

BENCHMARKS = {"data": data, "kernels": kernels, "train": train, "scaling": scaling, "tta": tta, "gpu": gpu,
              "traffic": traffic, "profile": profile, "sweep": sweep, "ablate": ablate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nin-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        p.add_argument("--json", metavar="PATH", help="write the results here")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    init_logging(0)
    try:
        return BENCHMARKS[args.bench].run(args)
    except UserError as err:
        return report("nin-bench", err)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
