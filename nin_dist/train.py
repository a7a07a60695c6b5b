"""Train NiN on Fashion-MNIST: one process, N processes, N GPUs or many nodes, all the same way.

    nin-train --config configs/cpu.yaml                                  # a world of one
    torchrun --standalone --nproc_per_node=2 -m nin_dist.train --config configs/cpu.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        -m nin_dist.train --config configs/d2l.yaml                      # on each node
    nin-train --sync-tracking runs/NAME                                  # replay unsent MLflow data

Overrides are dotted `key=value` pairs after the options (`train.epochs=2 data.root=DIR`).
`train.batch_size` is the global batch: each of N ranks takes batch_size / N of it, and the run
resumes from `run.out_dir/checkpoints/last.pt` when one exists (so `torchrun --max-restarts` just
works). N ranks compute the updates one process computes; in fp32 their rounding differs and
training amplifies it until the trajectories part, while `train.precision=fp64` (CPU) keeps them
within ~1e-12 (see nin_dist/layers.py). A NaN/inf loss or state stops the run (exit 2) and never
overwrites the last good checkpoint. Exit codes: 0 done, 2 user error (one line), 1 anything else
(with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from nin_dist import checkpoint as ckpt
from nin_dist import distributed
from nin_dist.config import Config, config_hash, dump_yaml, load_config, model_relevant, replace
from nin_dist.data import TrainBatches, eval_batches, load_datasets, to_inputs
from nin_dist.distributed import DistInfo
from nin_dist.errors import CheckpointError, ConfigError, UserError
from nin_dist.logs import init_logging
from nin_dist.model import build_model
from nin_dist.optim import apply_hyperparameters, build_optimizer, build_scheduler
from nin_dist.perf import mfu
from nin_dist.tracking import make_tracker, sync_spool

log = logging.getLogger("nin_dist.train")


class DivergedError(UserError):
    """The training loss, the parameters or the optimizer state became NaN or infinite."""


def train_step(model, inputs, labels, opt, scaler, scheduler, cfg: Config, autocast):
    """One optimizer step on this rank's slice of the global batch; returns (loss, logits), no sync."""
    opt.zero_grad(set_to_none=True)
    with autocast:
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.optim.label_smoothing)
    scaler.scale(loss).backward()  # DDP averages the gradients over ranks while this runs
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(opt)
    scaler.update()
    scheduler.step()
    return loss.detach(), logits.detach()


def accumulate(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """sums += (loss sum, correct, images) on the device; Python scalars only, so no host sync."""
    n = labels.numel()
    sums[0] += loss.double() * n
    sums[1] += (logits.argmax(1) == labels).sum()
    sums[2] += n


@torch.no_grad()
def evaluate(model, split, cfg: Config, info: DistInfo, autocast, with_predictions: bool = False):
    """Exact test metrics: each rank scores its own shard, sums are reduced, every image counts once.

    Returns (loss, acc, count, predictions-or-None); predictions is the full [N] vector on every rank.
    """
    model.eval()
    sums = torch.zeros(3, device=info.device, dtype=torch.float64)  # loss sum, correct, images
    preds = torch.zeros(len(split), device=info.device, dtype=torch.long) if with_predictions else None
    for inputs, labels, index in eval_batches(split, cfg.data, cfg.train.eval_batch_size, info.rank,
                                              info.world_size):
        with autocast:
            logits = model(prepare(inputs, cfg)).float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.numel()
        if preds is not None:
            preds[index.to(info.device)] = logits.argmax(1)
    distributed.all_reduce_sum_(sums)
    if preds is not None:
        distributed.all_reduce_sum_(preds)  # every other rank holds zeros at this rank's indices
    loss, correct, count = sums.tolist()
    model.train()
    return loss / count, correct / count, int(count), preds


def memory_format(cfg: Config):
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def param_dtype(cfg: Config) -> torch.dtype:
    """fp64 keeps parameters and activations in float64; every other precision has fp32 parameters."""
    return torch.float64 if cfg.train.precision == "fp64" else torch.float32


def prepare(inputs: torch.Tensor, cfg: Config) -> torch.Tensor:
    return inputs.to(dtype=param_dtype(cfg), memory_format=memory_format(cfg))


def make_autocast(cfg: Config, device: torch.device):
    if cfg.train.precision in ("fp32", "fp64"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def dropout_seed(seed: int, step: int) -> int:
    """The dropout mask's seed for one step: its own stream, apart from the data order's (seed, epoch)."""
    return (seed + 1) * 0x9E3779B1 + 7919 * step + 1


def state_is_finite(raw_model, opt) -> bool:
    tensors = [t for t in raw_model.state_dict().values() if t.is_floating_point()]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


class Trainer:
    """Everything one rank trains with, and its position: `epoch`, `epoch_step` (steps done in it), `step`."""

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.started = time.perf_counter()
        self.out_dir = Path(cfg.run.out_dir)
        torch.manual_seed(cfg.seed)
        self.train_split, self.test_split = (s.to(info.device) for s in load_datasets(cfg.data))
        self.batches = TrainBatches(self.train_split, cfg.data, cfg.train.batch_size, info.rank, info.world_size,
                                    cfg.seed)
        self.raw_model = build_model(cfg.model, info.device).to(dtype=param_dtype(cfg),
                                                                 memory_format=memory_format(cfg))
        self.opt = build_optimizer(self.raw_model, cfg.optim)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16")
        self.checkpointer = ckpt.Checkpointer(self.out_dir, info)
        self.digest = config_hash(cfg)
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.history: list[dict] = []  # one entry per evaluation, kept across restarts by the checkpoint
        state = self.checkpointer.load_for_resume(self.digest, model_relevant(cfg), cfg.run.allow_config_change) \
            if cfg.run.resume else None
        self.resumed = state is not None
        if state is not None:
            self._restore(state)
        # Built after the restore: the lr of the next step is a function of the step (see nin_dist.optim).
        self.scheduler = build_scheduler(self.opt, cfg.optim, self.batches.steps_per_epoch, cfg.train.epochs,
                                         self.step)
        self.model = distributed.wrap_ddp(self.raw_model, info, cfg.train.bucket_cap_mb)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.autocast = make_autocast(cfg, info.device)
        tags = {"world_size": str(info.world_size), "nodes": str(info.num_nodes), "backend": info.backend or "none",
                "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
                "kernel": self.raw_model.kernel}
        self.tracker = make_tracker(cfg, info, self.out_dir, state.get(ckpt.MLFLOW_RUN_ID) if state else None, tags)

    def _restore(self, state: dict) -> None:
        """Model, optimizer, scaler, RNG and position from a checkpoint; the config keeps its hyperparameters."""
        path = self.checkpointer.path
        try:
            self.raw_model.load_state_dict(state[ckpt.MODEL])
            self.opt.load_state_dict(state[ckpt.OPTIMIZER])
        except (RuntimeError, ValueError, KeyError) as err:  # a different architecture, e.g. model.width
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this model ({first}); use another run.out_dir "
                                  f"or run.resume=false") from None
        apply_hyperparameters(self.opt, self.cfg.optim)
        self.scaler.load_state_dict(state[ckpt.SCALER])
        ckpt.set_rng_state(state[ckpt.RNG])
        self.epoch, self.epoch_step, self.step = state[ckpt.EPOCH], state[ckpt.EPOCH_STEP], state[ckpt.STEP]
        self.history = list(state.get(ckpt.HISTORY, []))
        log.info("resuming from %s at epoch %d, step %d", path, self.epoch + 1, self.step)

    def start(self) -> None:
        """Record the run's config (and, for a new run, its datasets) before the first step."""
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            self.tracker.log_artifact_file(self.out_dir / "config.yaml")
        if not self.resumed:
            self.tracker.log_datasets(self.train_split, self.test_split)

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
            ckpt.MLFLOW_RUN_ID: self.tracker.run_id, ckpt.RUN_NAME: self.cfg.run.name, ckpt.HISTORY: self.history})

    def _kept(self) -> str:
        path = self.checkpointer.path
        return f"the last good checkpoint {path} is kept" if path.exists() else "no checkpoint was written"

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise DivergedError(f"training diverged: train/loss is {loss} (NaN/inf) at step {self.step} "
                                f"(epoch {self.epoch + 1}); {self._kept()}; lower optim.lr or set optim.grad_clip")

    def run(self) -> tuple[dict, torch.Tensor | None]:
        """Train to the end (or train.max_steps); returns the last evaluation's metrics and predictions."""
        cfg = self.cfg
        max_steps = cfg.train.max_steps or math.inf
        results, preds = {}, None
        bar = tqdm(total=self.batches.steps_per_epoch * cfg.train.epochs, initial=self.step, unit="step",
                   disable=not (self.info.is_main and cfg.train.progress), dynamic_ncols=True)
        while self.epoch < cfg.train.epochs and self.step < max_steps:
            sums, images, seconds = self.train_epoch(bar, max_steps)
            results, preds = self.end_epoch(sums, images, seconds, max_steps)
        bar.close()
        if not results:  # resumed from a checkpoint of a finished run (e.g. a restart after the last save)
            test_loss, test_acc, test_count, preds = evaluate(self.raw_model, self.test_split, cfg, self.info,
                                                              self.autocast, True)
            results = {"test/loss": test_loss, "test/acc": test_acc}
            log.info("nothing left to train at epoch %d, step %d | test loss %.4f acc %.4f (%d images)",
                     self.epoch, self.step, test_loss, test_acc, test_count)
        return results, preds

    def train_epoch(self, bar, max_steps: float) -> tuple[torch.Tensor, int, float]:
        """The rest of the current epoch; returns (loss sum, correct, images) on the device, images, seconds."""
        cfg, info, batches = self.cfg, self.info, self.batches
        t0 = time.perf_counter()
        sums = torch.zeros(3, device=info.device, dtype=torch.float64)
        images = 0
        for inputs, labels in batches.epoch(self.epoch, self.epoch_step):
            self.raw_model.set_dropout_rows(info.rank * batches.local_batch, batches.global_batch,
                                            seed=dropout_seed(cfg.seed, self.step))
            loss, logits = train_step(self.model, prepare(inputs, cfg), labels, self.opt, self.scaler,
                                      self.scheduler, cfg, self.autocast)
            accumulate(sums, loss, logits, labels)
            self.step, self.epoch_step, images = self.step + 1, self.epoch_step + 1, images + batches.global_batch
            bar.update(1)
            if self.step == 1 or self.step % cfg.train.log_every == 0:
                # The one host sync between logs: the loss value.
                loss_value = distributed.all_reduce_sum_(loss.float().clone()).item() / info.world_size
                self._check_finite(loss_value)
                bar.set_postfix_str(f"loss {loss_value:.4f}, {images / (time.perf_counter() - t0):.0f} img/s")
                self.tracker.log_metrics({"train/loss": loss_value, "train/lr": self.scheduler.get_last_lr()[0]},
                                         self.step)
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                self.save()
            if self.step >= max_steps:
                break
        return sums, images, time.perf_counter() - t0

    def end_epoch(self, sums: torch.Tensor, images: int, seconds: float, max_steps: float):
        """Evaluate, log, advance to the next epoch if this one is done, and checkpoint."""
        cfg = self.cfg
        loss_sum, correct, count = distributed.all_reduce_sum_(sums).tolist()
        count = max(1.0, count)
        self._check_finite(loss_sum)
        epoch_done = self.epoch_step == self.batches.steps_per_epoch
        last = (self.epoch + 1 == cfg.train.epochs and epoch_done) or self.step >= max_steps
        test_loss, test_acc, test_count, preds = evaluate(self.raw_model, self.test_split, cfg, self.info,
                                                          self.autocast, last)
        img_s = images / seconds
        results = {"train/epoch_loss": loss_sum / count, "train/acc": correct / count, "test/loss": test_loss,
                   "test/acc": test_acc, "perf/img_per_s": img_s, "perf/epoch_s": seconds,
                   "perf/mfu": mfu(img_s, cfg, self.info.device, self.info.world_size)}
        log.info("epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images) | "
                 "%.0f img/s | %.1f s | MFU %.2f%%", self.epoch + 1, cfg.train.epochs, results["train/epoch_loss"],
                 results["train/acc"], test_loss, test_acc, test_count, img_s, seconds, 100 * results["perf/mfu"])
        self.tracker.log_metrics(results, self.step)
        self.history.append({"epoch": self.epoch + 1, "step": self.step, "test_acc": test_acc,
                             "test_loss": test_loss, "time": time.time()})  # wall clock: `nin-bench tta` uses it
        if epoch_done:
            self.epoch, self.epoch_step = self.epoch + 1, 0
        self.save()
        return results, preds

    def finish(self, results: dict, preds: torch.Tensor | None) -> dict:
        """Log the test predictions, write metrics.json and log the model (fp32, what inference uses)."""
        if preds is not None:
            self.tracker.log_test_predictions(self.test_split, preds.cpu())
        metrics = {"test_acc": results.get("test/acc"), "test_loss": results.get("test/loss"),
                   "train_loss": results.get("train/epoch_loss"), "train_acc": results.get("train/acc"),
                   "img_per_s": results.get("perf/img_per_s"), "epochs": self.epoch, "steps": self.step,
                   "world_size": self.info.world_size, "mlflow_run_id": self.tracker.run_id,
                   "wall_s": time.perf_counter() - self.started, "history": self.history}
        if self.info.is_main:
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            self.tracker.log_artifact_file(self.out_dir / "metrics.json")
            example = self.test_split.images[:4].cpu()
            model = self.raw_model if param_dtype(self.cfg) == torch.float32 else copy.deepcopy(self.raw_model).float()
            self.tracker.log_model(model, to_inputs(example, self.cfg.data))
        return metrics


def fit(cfg: Config, info: DistInfo) -> dict:
    """Build everything, train, evaluate each epoch, write metrics.json; returns the final metrics."""
    trainer = Trainer(cfg, info)
    status = "FAILED"
    try:
        trainer.start()
        metrics = trainer.finish(*trainer.run())
        status = "FINISHED"
        return metrics
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from torchrun (see main)
        status = "KILLED"
        raise
    finally:
        trainer.tracker.close(status)


def _resolve_run(cfg: Config, info: DistInfo) -> Config:
    """Give the run a name and folder that every rank agrees on and a torchrun restart finds again."""
    name = cfg.run.name
    if name is None:
        elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = distributed.broadcast_object(f"nin-{elastic_id[:12]}" if elastic_id != "none" else f"nin-{stamp}")
    out_dir = cfg.run.out_dir or str(Path("runs") / name)
    return replace(cfg, run={"name": name, "out_dir": out_dir})


def _check_world(cfg: Config, info: DistInfo) -> None:
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                          f"{info.world_size} (it is the global batch)")
    if cfg.train.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if cfg.train.precision == "fp64" and info.device.type != "cpu":
        raise ConfigError("train.precision=fp64 is for CPU reference runs; use train.device=cpu or fp32/bf16")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nin-train", description="Train NiN on Fashion-MNIST (see module doc).")
    parser.add_argument("--config", help="YAML config (configs/cpu.yaml, configs/d2l.yaml, configs/fast.yaml)")
    parser.add_argument("--sync-tracking", metavar="RUN_DIR",
                        help="replay the MLflow data a run could not send into its run, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # torchrun stops the other workers with SIGTERM when one fails; exiting through SystemExit
        # runs the `finally` blocks, so the MLflow run is closed and unsent records are spooled.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = None
    try:
        if args.sync_tracking:
            init_logging(0)
            return sync_spool(Path(args.sync_tracking))
        cfg = load_config(args.config, args.overrides)
        info = distributed.init_distributed(cfg.train.device, cfg.train.threads)
        init_logging(info.rank)
        _check_world(cfg, info)
        cfg = _resolve_run(cfg, info)
        log.info("run %s -> %s (world size %d, %s)", cfg.run.name, cfg.run.out_dir, info.world_size, info.device)
        fit(cfg, info)
        return 0
    except UserError as err:
        print(f"nin-train: error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        distributed.destroy()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
