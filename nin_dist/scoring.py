"""What an evaluation scores: the validation split every epoch, the test split when it is due.

With `data.val_size` the held-out images are scored at every epoch's end and the test split only at
the end of the run (also every epoch with `train.eval_test_every_epoch`), so choices made by reading
the epochs' numbers are made on validation images. Without a validation split the test split is
scored every epoch, as before there was one. The model scored is the one the trainer evaluates (the
EMA of the weights when `train.ema_decay` is on), with mirror TTA when `train.tta` is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nin_dist.config import Config
from nin_dist.data import Split
from nin_dist.distributed import DistInfo
from nin_dist.evaluate import Evaluation, evaluate
from nin_dist.profiling import region


@dataclass(frozen=True)
class Scores:
    """One evaluation's results: each split's, or None where it was not scored."""

    val: Evaluation | None
    test: Evaluation | None

    def _scored(self) -> dict[str, Evaluation]:
        return {name: result for name, result in (("val", self.val), ("test", self.test)) if result is not None}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: `val/loss`, `val/acc`, `test/loss`, `test/acc` of the splits scored."""
        return {f"{name}/{what}": getattr(result, what) for name, result in self._scored().items()
                for what in ("loss", "acc")}

    def history(self) -> dict[str, float]:
        """metrics.json's history fields: `val_acc`, `val_loss`, `test_acc`, `test_loss` of the splits scored."""
        return {key.replace("/", "_"): value for key, value in self.metrics().items()}

    def summary(self) -> str:
        """`val loss 0.3000 acc 0.9000 (5000 images) | test loss ...` for the log line."""
        return " | ".join(f"{name} loss {result.loss:.4f} acc {result.acc:.4f} ({result.count} images)"
                          for name, result in self._scored().items())

    @property
    def predictions(self) -> torch.Tensor | None:
        """The test split's predicted classes, when asked for."""
        return self.test.predictions if self.test is not None else None


class Scorer:
    """Scores `model` on the validation split (if any) and, when due, the test split."""

    def __init__(self, val: Split | None, test: Split, cfg: Config, info: DistInfo):
        self.val, self.test, self.cfg, self.info = val, test, cfg, info

    def test_due(self, last: bool) -> bool:
        return last or self.val is None or self.cfg.train.eval_test_every_epoch

    def score(self, model: torch.nn.Module, last: bool) -> Scores:
        """The epoch's scores; `last`: the run's final evaluation, which also keeps the test predictions."""
        data, train, info = self.cfg.data, self.cfg.train, self.info
        with region("evaluation"):
            val = evaluate(model, self.val, data, train, info) if self.val is not None else None
            test = evaluate(model, self.test, data, train, info, with_predictions=last) if self.test_due(last) else None
        return Scores(val, test)
