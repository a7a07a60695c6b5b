"""MLflow tracking, rank 0 only.

`make_tracker` returns an `MLflowTracker` on rank 0 when `tracking.enabled`, and a `NullTracker`
with the same methods everywhere else, so call sites never test the rank. mlflow is imported only
once an MLflow tracker or a sync is made: with `tracking.enabled=false` it need not be installed.

A run holds: params = the resolved config with dotted keys; tags = git commit, world size, nodes,
backend, device, kernel, torch / triton / mlflow versions (and the trainer's); metrics named with a
namespace and unit (`train/loss`, `perf/img_per_s`) at the global optimizer step; MLflow's own
system metrics (`system/...`); the two splits as dataset inputs (contexts training / testing); the
artifacts (`config.yaml`, `metrics.json`, and `predictions/` with the confusion matrix, per-class
accuracy and misclassified images); the models at the end, two LoggedModels at the same step (an
MLflow model has one signature for all its flavors): "model", raw images in, labels, class names
and probabilities out, for MLflow's own tools (`mlflow models serve -m models:/<model_id>`,
`mlflow.pyfunc.load_model`), the one registered; and "network", the plain network for PyTorch
users (`mlflow.pytorch.load_model("models:/<model_id>")`), preprocessed floats in, logits out.

The modules, one job each:

- `tracker`: `MLflowTracker`, rank 0's run from start to close;
- `run`: creating or resuming the run, with its params and tags;
- `records`: what a record is (metrics, datasets, artifact, model, end), which are fit to send,
  and sending one to MLflow;
- `sender`: the background thread that sends records in call order, or keeps them;
- `saved_model`: the models saved into the spool, and logged from its files (never loaded);
- `served_model`: the code MLflow runs to serve that model (self-contained: copied into the model);
- `registry`: the logged model as a new version of a registered model (`tracking.register_model`);
- `spool`: records kept in the run folder, read as untrusted input, and their replay;
- `replay`: `nin-train --sync-tracking RUN_DIR`, the replay of a run folder's spool (`sync`);
- `store`: where the store is, whether it answers, how long one HTTP request may take;
- `redaction`: secrets and URI passwords kept out of everything sent and every error logged;
- `mlflow_internals`: the MLflow internals used, and why the public API does not do the job;
- `report`: the test-set report (confusion matrix, per-class accuracy, misclassified images).
- `evaluation`: the evaluation run of `nin-eval`, linked to the model it scored.

This module imports none of them until a tracker or a sync is asked for.
"""

from __future__ import annotations

from pathlib import Path


class NullTracker:
    """Same methods as the MLflow tracker; does nothing (ranks > 0, tracking.enabled=false)."""

    run_id: str | None = None

    def log_datasets(self, train, test, val=None) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_test_predictions(self, split, predictions) -> None: ...

    def log_artifact_file(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, model, images, test_split=None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def make_tracker(cfg, info, run_dir: Path, resume_run_id: str | None, tags: dict[str, str]):
    """The MLflow tracker on rank 0 with tracking enabled; a NullTracker elsewhere."""
    if info.rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    from nin_dist.tracking.tracker import MLflowTracker

    return MLflowTracker(cfg, info, run_dir, resume_run_id, tags)


def sync(run_dir: Path) -> int:
    """`nin-train --sync-tracking RUN_DIR`: send what a run kept in RUN_DIR/tracking-spool/, holding the
    run folder's lock, so neither the job still writing that spool nor a second sync can run beside it."""
    from nin_dist.errors import TrackingError
    from nin_dist.run_dir import RunDir
    from nin_dist.tracking.replay import sync as replay

    folder = RunDir(Path(run_dir))
    if not folder.path.is_dir():
        raise TrackingError(f"--sync-tracking {run_dir}: no such run folder")
    folder.open(wait_s=0)
    try:
        return replay(folder.path)
    finally:
        folder.close()
