"""nin-train's command line, and its check before any process starts: `python -m nin_dist.train_args ARGS`.

Parsing and loading the config import no torch, so `launch/multinode.sh` checks the arguments it will
give every worker once, in a fraction of a second, before torchrun starts: a wrong option or config
key (exit 2, nin-train's one line) would otherwise fail every attempt, and torchrun would restart it
MAX_RESTARTS times on every node. Silent and exit 0 when the arguments are good. What depends on the
world (the batch against the world size, the device) is checked by nin-train itself.
"""

from __future__ import annotations

import argparse
import sys

from nin_dist.config import load_config
from nin_dist.errors import UserError, report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nin-train", description="Train NiN on Fashion-MNIST (see nin_dist.train).")
    parser.add_argument("--config", help="YAML config (configs/cpu.yaml, configs/d2l.yaml, configs/fast.yaml)")
    parser.add_argument("--sync-tracking", metavar="RUN_DIR",
                        help="replay the MLflow data a run could not send into its run, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # bad options: argparse's line and exit 2
    if args.sync_tracking:
        return 0  # a replay: no config to check
    try:
        load_config(args.config, args.overrides)
    except UserError as err:
        return report("nin-train", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
