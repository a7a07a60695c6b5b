"""One logging set-up for every entry point: a `[rank N]` prefix, INFO on rank 0, warnings elsewhere."""

import logging
import sys


def init_logging(rank: int = 0) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
