"""One optimizer step on this rank's slice of the global batch, and the epoch's running sums.

Neither reads a value back to the host: the loop's log step does the one sync (see nin_dist.train).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nin_dist.config import Config
from nin_dist.precision import autocast
from nin_dist.profiling import region


def train_step(model, inputs, labels, opt, scaler, scheduler, cfg: Config, device: torch.device):
    """zero_grad -> autocast forward -> loss -> backward -> clip -> step -> schedule; returns (loss, logits)."""
    opt.zero_grad(set_to_none=True)
    with autocast(cfg.train, device):
        with region("forward"):
            logits = model(inputs)
        with region("loss"):
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.optim.label_smoothing)
    with region("backward"):
        scaler.scale(loss).backward()  # DDP averages the gradients over ranks while this runs
    with region("optimizer.step"):
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
