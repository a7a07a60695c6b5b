"""Train NiN on Fashion-MNIST: one process, N processes, N GPUs or many nodes, all the same way.

    nin-train --config configs/cpu.yaml                                  # a world of one
    torchrun --standalone --nproc_per_node=2 -m nin_dist.train --config configs/cpu.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=JOB -m nin_dist.train --config configs/d2l.yaml        # on each node
    nin-train --sync-tracking runs/NAME                                  # replay unsent MLflow data

Overrides are dotted `key=value` pairs after the options (`train.epochs=2 data.root=DIR`).
`train.batch_size` is the global batch: each of N ranks takes batch_size / N of it, and the run
resumes from `run.out_dir/checkpoints/last.pt` when one exists (so `torchrun --max-restarts` just
works). N ranks compute the updates one process computes; in fp32 their rounding differs and
training amplifies it until the trajectories part, while `train.precision=fp64` (CPU) keeps them
within ~1e-12 (see nin_dist/layers.py). A NaN/inf loss or state stops the run (exit 2) and never
overwrites the last good checkpoint. Exit codes: 0 done, 2 user error (one line), 1 anything else (with its traceback).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from nin_dist import checkpoint as ckpt
from nin_dist import distributed, precision, profiling
from nin_dist.config import Config, config_hash, load_config, model_relevant
from nin_dist.data import TrainBatches, hold_out, load_datasets
from nin_dist.distributed import DistInfo
from nin_dist.ema import WeightEMA
from nin_dist.errors import CheckpointError, ConfigError, DivergedError, UserError, first_line, report
from nin_dist.layers import dropout_seed
from nin_dist.logs import init_logging
from nin_dist.model import build_model
from nin_dist.optim import apply_hyperparameters, build_optimizer, build_scheduler, state_is_finite
from nin_dist.perf import mfu
from nin_dist.precision import check_device, compute_dtype, memory_format, param_dtype, prepare
from nin_dist.progress import Progress
from nin_dist.run_dir import RunDir, open_run_dir, resolve_run
from nin_dist.scoring import Scorer
from nin_dist.step import accumulate, train_step
from nin_dist.tracking import make_tracker, sync
from nin_dist.train_args import parse_args  # torch-free: launch/multinode.sh checks the arguments with it

log = logging.getLogger("nin_dist.train")


class Trainer:
    """Everything one rank trains with, and its position: `epoch`, `epoch_step` (steps done in it), `step`."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: RunDir):
        self.cfg, self.info, self.run_dir = cfg, info, run_dir  # run_dir: made and locked already
        self.started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        train, test = load_datasets(cfg.data)
        train, val = hold_out(train, cfg.data.val_size, cfg.seed)
        self.train_split, self.test_split = train.to(info.device), test.to(info.device)
        self.val_split = val.to(info.device) if val is not None else None
        self.scorer = Scorer(self.val_split, self.test_split, cfg, info)
        self.batches = TrainBatches(self.train_split, cfg.data, cfg.train.batch_size, info.rank, info.world_size,
                                    cfg.seed)
        self.raw_model = build_model(cfg.model, info.device).to(dtype=param_dtype(cfg.train),
                                                                 memory_format=memory_format(cfg.train))
        if self.raw_model.kernel == "triton" and info.device.type == "cuda":
            from kernels.ops import conv_allows_tf32

            self.raw_model.log_paths(compute_dtype(cfg.train), conv_allows_tf32())
        self.opt = build_optimizer(self.raw_model, cfg.optim)
        self.ema = WeightEMA(self.raw_model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16")
        self.checkpointer = ckpt.Checkpointer(self.run_dir.path, info)
        self.digest = config_hash(cfg)
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.history: list[dict] = []  # one entry per evaluation, kept across restarts by the checkpoint
        state = self.checkpointer.load_for_resume(self.digest, model_relevant(cfg), cfg.run.allow_config_change) \
            if cfg.run.resume else None
        if state is not None:
            self._restore(state)
        # Built after the restore: the lr of the next step is a function of the step (see nin_dist.optim).
        self.scheduler = build_scheduler(self.opt, cfg.optim, self.batches.steps_per_epoch, cfg.train.epochs,
                                         self.step)
        self.model = distributed.wrap_ddp(self.raw_model, info, cfg.train.bucket_cap_mb)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        tags = {"world_size": str(info.world_size), "nodes": str(info.num_nodes), "backend": info.backend or "none",
                "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
                "kernel": self.raw_model.kernel}
        self.resumed = state is not None
        self.tracker = make_tracker(cfg, info, self.run_dir.path, state.get(ckpt.MLFLOW_RUN_ID) if state else None,
                                    tags)

    def _restore(self, state: dict) -> None:
        """Model, optimizer, scaler, RNG and position from a checkpoint; the config keeps its hyperparameters."""
        path = self.checkpointer.path
        try:  # the keys and their types are checked (ckpt.check_state); what they hold is checked here
            self.raw_model.load_state_dict(state[ckpt.MODEL])
            self.opt.load_state_dict(state[ckpt.OPTIMIZER])
            self.scaler.load_state_dict(state[ckpt.SCALER])
            ckpt.set_rng_state(state[ckpt.RNG])
            if self.ema is not None:  # a checkpoint of a run without it: the average starts here
                self.ema.load_state_dict(state.get(ckpt.EMA) or self.raw_model.state_dict())
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:  # e.g. another model.width
            raise CheckpointError(f"{path} does not fit this model ({first_line(err)}); use another run.out_dir "
                                  f"or run.resume=false") from None
        apply_hyperparameters(self.opt, self.cfg.optim)
        self.epoch, self.epoch_step, self.step = state[ckpt.EPOCH], state[ckpt.EPOCH_STEP], state[ckpt.STEP]
        self.history = list(state.get(ckpt.HISTORY, []))
        log.info("resuming from %s at epoch %d, step %d", path, self.epoch + 1, self.step)

    def fit(self) -> dict:
        """Train to the end (or train.max_steps), evaluating and checkpointing at every epoch's end;
        returns the final metrics (also written to metrics.json)."""
        cfg, info, batches = self.cfg, self.info, self.batches
        self.tracker.log_artifact_file(self.run_dir.write_config(cfg))  # before the first step
        if not self.resumed:
            self.tracker.log_datasets(self.train_split, self.test_split, self.val_split)
            # A checkpoint of the start: a restart before the first periodic save (an epoch, without
            # train.checkpoint_every) resumes from it, so the job keeps this MLflow run.
            self.save()
        max_steps = cfg.train.max_steps or math.inf
        results, predictions = {}, None
        self.tracker.log_metrics(self.info.metrics(), self.step)  # where this attempt starts
        attempt_start = self.step
        progress = Progress(cfg.train.progress, min(batches.steps_per_epoch * cfg.train.epochs, max_steps),
                            self.step, info.is_main)
        profile = profiling.make_window(cfg.train, info, self.run_dir.path, self.step, batches, self.tracker)
        while self.epoch < cfg.train.epochs and self.step < max_steps:
            t0, images = time.perf_counter(), 0
            sums = torch.zeros(3, device=info.device, dtype=torch.float64)  # loss sum, correct, images
            for inputs, labels in batches.epoch(self.epoch, self.epoch_step):
                self.raw_model.set_dropout_rows(info.rank * batches.local_batch, batches.global_batch,
                                                seed=dropout_seed(cfg.seed, self.step))
                loss, logits = train_step(self.model, prepare(inputs, cfg.train), labels, self.opt, self.scaler,
                                          self.scheduler, cfg, info.device)
                if self.ema is not None:
                    self.ema.update(self.raw_model, self.step)  # self.step: the updates before this one
                accumulate(sums, loss, logits, labels)
                self.step, self.epoch_step, images = self.step + 1, self.epoch_step + 1, images + batches.global_batch
                progress.update()
                profile.at(self.step)
                if self.step == attempt_start + 1:  # a (re)started job trains again from here
                    log.info("training: step %d done in %s", self.step, info.describe())
                if self.step == 1 or self.step % cfg.train.log_every == 0:
                    self._log_loss(loss, progress, images / (time.perf_counter() - t0))
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save()
                if self.step >= max_steps:
                    break
            epoch_done = self.epoch_step == batches.steps_per_epoch
            last = (epoch_done and self.epoch + 1 == cfg.train.epochs) or self.step >= max_steps
            results, predictions = self._end_epoch(sums, images, time.perf_counter() - t0, last)
            if epoch_done:
                self.epoch, self.epoch_step = self.epoch + 1, 0
            self.save()
        progress.close()
        if not results:  # resumed from a checkpoint of a finished run (e.g. a restart after the last save)
            scores = self.scorer.score(self.evaluated, last=True)
            results, predictions = scores.metrics(), scores.predictions
            log.info("nothing left to train at epoch %d, step %d | %s", self.epoch, self.step, scores.summary())
        return self._finish(results, predictions)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model that is scored and logged: the average of the weights with train.ema_decay, else the model."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _log_loss(self, loss: torch.Tensor, progress: Progress, img_per_s: float) -> None:
        # The one host sync between logs: the loss value.
        loss_value = distributed.all_reduce_sum_(loss.float().clone()).item() / self.info.world_size
        self._check_finite(loss_value)
        progress.report(loss_value, img_per_s)
        self.tracker.log_metrics({"train/loss": loss_value, "train/lr": self.scheduler.get_last_lr()[0],
                                  **self.info.metrics()}, self.step)

    def _end_epoch(self, sums: torch.Tensor, images: int, seconds: float, last: bool):
        """Reduce the epoch's train sums, score val / test (test predictions at the end), log; returns the metrics."""
        cfg = self.cfg
        loss_sum, correct, count = distributed.all_reduce_sum_(sums).tolist()
        count = max(1.0, count)
        self._check_finite(loss_sum)
        scores = self.scorer.score(self.evaluated, last)
        img_s = images / seconds
        results = {"train/epoch_loss": loss_sum / count, "train/acc": correct / count, **scores.metrics(),
                   "perf/img_per_s": img_s, "perf/epoch_s": seconds,
                   "perf/mfu": mfu(img_s, cfg, self.info.device, self.info.world_size)}
        log.info("epoch %d/%d  train loss %.4f acc %.4f | %s | %.0f img/s | %.1f s | MFU %.2f%%", self.epoch + 1,
                 cfg.train.epochs, results["train/epoch_loss"], results["train/acc"], scores.summary(), img_s,
                 seconds, 100 * results["perf/mfu"])
        self.tracker.log_metrics(results, self.step)
        # epoch_s: this epoch's training seconds (its evaluation not included), time: the wall clock when
        # the evaluation ended; `nin-bench tta` sums the one and subtracts the launch from the other.
        entry = {"epoch": self.epoch + 1, "step": self.step, **scores.history(), "epoch_s": seconds,
                 "time": time.time()}
        self.history.append(entry)
        self.run_dir.append_epoch(entry | {"mlflow_run_id": self.tracker.run_id})  # watched by nin-sweep
        return results, scores.predictions

    def _finish(self, results: dict, predictions: torch.Tensor | None) -> dict:
        """Log the test predictions and the model (fp32, its test scores as served), write metrics.json."""
        if predictions is not None:
            self.tracker.log_test_predictions(self.test_split, predictions.cpu())
        model, split = self.evaluated.portable_copy(), self.test_split
        results = results | (self.tracker.log_model(model, split.images[:2].cpu(), split) or {})
        metrics = {"test_acc": results.get("test/acc"), "test_loss": results.get("test/loss"),
                   "val_acc": results.get("val/acc"), "val_loss": results.get("val/loss"),
                   "train_loss": results.get("train/epoch_loss"), "train_acc": results.get("train/acc"),
                   "img_per_s": results.get("perf/img_per_s"), "epochs": self.epoch, "steps": self.step,
                   "world_size": self.info.world_size, "mlflow_run_id": self.tracker.run_id,
                   "wall_s": time.perf_counter() - self.started, "history": self.history}
        self.tracker.log_artifact_file(self.run_dir.write_json("metrics.json", metrics))
        return metrics

    def save(self) -> None:
        """Checkpoint the current position; never writes a diverged model over the last good one."""
        if not distributed.all_ranks_agree(state_is_finite(self.raw_model, self.opt), self.info.device):
            raise DivergedError(f"training diverged: the parameters or optimizer state hold NaN/inf after "
                                f"step {self.step} (epoch {self.epoch + 1}); not saved, {self._kept()}; "
                                f"lower optim.lr or set optim.grad_clip")  # one host sync, per save only
        self.checkpointer.save({
            ckpt.MODEL: self.raw_model.state_dict(), ckpt.OPTIMIZER: self.opt.state_dict(),
            ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
            ckpt.RNG: ckpt.rng_state(), ckpt.EPOCH: self.epoch, ckpt.EPOCH_STEP: self.epoch_step,
            ckpt.STEP: self.step, ckpt.CONFIG_HASH: self.digest, ckpt.CONFIG: model_relevant(self.cfg),
            ckpt.MLFLOW_RUN_ID: self.tracker.run_id, ckpt.RUN_NAME: self.cfg.run.name, ckpt.HISTORY: self.history,
            **({ckpt.EMA: self.ema.state_dict()} if self.ema is not None else {})})

    def _kept(self) -> str:
        path = self.checkpointer.path
        return f"the last good checkpoint {path} is kept" if path.exists() else "no checkpoint was written"

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise DivergedError(f"training diverged: train/loss is {loss} (NaN/inf) at step {self.step} "
                                f"(epoch {self.epoch + 1}); {self._kept()}; lower optim.lr or set optim.grad_clip")


def fit(cfg: Config, info: DistInfo) -> dict:
    """Lock the run folder, build everything, train, evaluate each epoch, write metrics.json;
    returns the final metrics."""
    with open_run_dir(Path(cfg.run.out_dir), info) as run_dir:
        trainer, status = Trainer(cfg, info, run_dir), "FAILED"
        try:
            metrics = trainer.fit()
            status = "FINISHED"
            return metrics
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from torchrun (see main)
            status = "KILLED"
            raise
        finally:
            trainer.tracker.close(status)


def check_world(cfg: Config, info: DistInfo) -> None:
    """What the config asks of this world, checked before any work."""
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                          f"{info.world_size} (it is the global batch)")
    check_device(cfg.train, info.device)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # torchrun stops the other workers with SIGTERM when one fails; exiting through SystemExit
        # runs the `finally` blocks, so the MLflow run is closed and unsent records are spooled.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.sync_tracking:
            init_logging(0)
            return sync(Path(args.sync_tracking))
        cfg = load_config(args.config, args.overrides)
        info = distributed.init_distributed(cfg.train.device, cfg.train.threads, cfg.train.dist_timeout_s,
                                            cfg.train.compile)
        init_logging(info.rank)
        check_world(cfg, info)
        cfg = resolve_run(precision.resolve_config(cfg, info.device))
        log.info("run %s -> %s (world size %d, %s%s)", cfg.run.name, cfg.run.out_dir, info.world_size, info.device,
                 f", a lost peer is found after {info.timeout_s:g} s" if info.backend else "")
        fit(cfg, info)
        return 0
    except UserError as err:
        return report("nin-train", err)
    finally:
        distributed.destroy()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
