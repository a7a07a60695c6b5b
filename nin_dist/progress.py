"""How training shows its progress on rank 0: a bar on a terminal, plain lines in a log file.

`train.progress` is one setting:

- `bar`: tqdm's bar. It redraws itself with carriage returns, which a terminal shows as one line
  and a file keeps as one frame per redraw (thousands of them in a `> train.log`).
- `lines`: one log line every `train.log_every` steps (and step 1), with the loss, the throughput
  and the time left; no carriage return. For files: SLURM and Kubernetes logs, `nin-train > log`.
- `off`: neither (the per-epoch lines stay).
- `auto` (the default): `bar` when stderr is a terminal, else `lines`.

Other ranks show nothing. The loss comes from the trainer's log step, its one host sync.
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
    """Steps done of `total` (from `initial`, on a resume), shown as `mode` says on the main rank."""

    def __init__(self, mode: str, total: int, initial: int, main: bool):
        self.mode = resolve(mode) if main else "off"
        self.total, self.start, self.done = total, initial, initial
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if self.mode == "bar" else None

    def update(self) -> None:
        """One more step done."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def report(self, loss: float, img_per_s: float) -> None:
        """The loss and throughput of a log step: the bar's postfix, or one line."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {img_per_s:.0f} img/s")
        elif self.mode == "lines":
            log.info("step %d/%d (%.0f%%)  loss %.4f  %.0f img/s  %s left", self.done, self.total,
                     100 * self.done / max(1, self.total), loss, img_per_s, self._left())

    def _left(self) -> str:
        """The time left at the pace of the steps done since this process started, as h:mm:ss."""
        steps = self.done - self.start
        seconds = (self.total - self.done) * (time.perf_counter() - self.started) / steps if steps else 0.0
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
