"""The progress display's count and pace (nin_dist.progress), on a clock the test sets."""

from __future__ import annotations

import logging
import time

from nin_dist.progress import Progress


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def steps(progress: Progress, clock: Clock, seconds: list[float]) -> None:
    for took in seconds:
        clock.now += took
        progress.update()


def test_the_time_left_leaves_out_the_first_step(caplog):
    """A first step of 100 s (a cold compile), then 2 s a step: 6 steps left are 12 s, not 6 x 36 s."""
    clock = Clock()
    progress = Progress("lines", total=10, initial=0, main=True, clock=clock)
    steps(progress, clock, [100.0])
    assert progress.left() == "?"  # one step gives no pace yet
    steps(progress, clock, [2.0, 2.0, 2.0])
    assert progress.left() == "00:12"
    with caplog.at_level(logging.INFO, logger="nin_dist.train"):
        progress.report(0.5, 100.0)
    assert "step 4/10 (40%)  loss 0.5000  100 img/s  00:12 left" in caplog.text


def test_a_resumed_run_paces_from_its_own_first_step():
    """Resumed at step 1000 of 5000: the steps done before this process count for the total only."""
    clock = Clock()
    progress = Progress("lines", total=5000, initial=1000, main=True, clock=clock)
    steps(progress, clock, [300.0, 1.0, 1.0])
    assert (progress.done, progress.left()) == (1003, "1:06:37")  # 3997 s, as tqdm writes it


def test_the_bar_starts_after_the_first_step():
    """tqdm's own rate and time left come from the bar's clock: it starts when the first step is done."""
    progress = Progress("bar", total=8, initial=2, main=True)
    assert progress.bar is None
    time.sleep(0.2)  # the first step
    progress.update()
    assert (progress.bar.n, progress.bar.total) == (3, 8)
    assert progress.bar.format_dict["elapsed"] < 0.2
    progress.update()
    assert progress.bar.n == 4
    progress.close()


def test_other_ranks_show_nothing():
    progress = Progress("bar", total=8, initial=0, main=False)
    progress.update()
    assert progress.bar is None and progress.mode == "off"
