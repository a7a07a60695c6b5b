"""How training shows its progress on rank 0: a bar on a terminal, plain lines in a log file.

`train.progress` is one setting:

- `bar`: tqdm's bar. It redraws itself with carriage returns, which a terminal shows as one line
  and a file keeps as one frame per redraw (thousands of them in a `> train.log`).
- `lines`: one log line every `train.log_every` steps (and step 1), with the loss, the throughput
  and the time left; no carriage return. For files: SLURM and Kubernetes logs, `nin-train > log`.
- `off`: neither (the per-epoch lines stay).
- `auto` (the default): `bar` when stderr is a terminal, else `lines`.

The total is the steps the run will do: train.epochs' worth, or train.max_steps when fewer. Other
ranks show nothing. The loss comes from the trainer's log step, its one host sync.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("nin_dist.train")


def resolve(mode: str, stream=None) -> str:
    """`mode` made concrete: `auto` is `bar` when `stream` (stderr) is a terminal, else `lines`."""
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stream: not a terminal
        return "lines"


class Progress:
    """Steps done of `total` (from `initial`, on a resume), shown as `mode` says on the main rank.

    The pace (the bar's rate, the time left) is that of the steps after this process's first: the
    first compiles (train.compile) and warms up, and can take minutes that no later step takes. So
    the bar starts once that step is done, and until a second step is done the time left is `?`.
    `clock` is the time in seconds (`time.perf_counter`; tests give their own).
    """

    def __init__(self, mode: str, total: int, initial: int, main: bool, clock=time.perf_counter):
        self.mode = resolve(mode) if main else "off"
        self.total, self.done = max(total, initial), initial
        self.clock = clock
        self.paced_from: tuple[int, float] | None = None  # (steps done, clock) when the first step ended
        self.bar: tqdm | None = None

    def update(self) -> None:
        """One more step done."""
        self.done += 1
        if self.paced_from is None:
            self.paced_from = (self.done, self.clock())
            if self.mode == "bar":
                self.bar = tqdm(total=self.total, initial=self.done, unit="step", dynamic_ncols=True)
        elif self.bar is not None:
            self.bar.update(1)

    def report(self, loss: float, img_per_s: float) -> None:
        """The loss and throughput of a log step: the bar's postfix, or one line."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {img_per_s:.0f} img/s")
        elif self.mode == "lines":
            log.info("step %d/%d (%.0f%%)  loss %.4f  %.0f img/s  %s left", self.done, self.total,
                     100 * self.done / max(1, self.total), loss, img_per_s, self.left())

    def left(self) -> str:
        """The time left at the pace since the first step, as tqdm writes intervals (`1:02:05`, `00:59`)."""
        if self.paced_from is None or self.done == self.paced_from[0]:
            return "?"
        steps, seconds = self.done - self.paced_from[0], self.clock() - self.paced_from[1]
        return tqdm.format_interval((self.total - self.done) * seconds / steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
