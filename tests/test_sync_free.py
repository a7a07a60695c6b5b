"""The hot loop does not synchronise the host with the GPU between logging steps."""

import pytest
import torch

from nin_dist.config import load_config
from nin_dist.data import TrainBatches, load_split
from nin_dist.model import build_model
from nin_dist.optim import build_optimizer, build_scheduler
from nin_dist.step import accumulate, train_step

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host-device syncs exist only on a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_between_logs_never_sync(data_root, precision):
    cfg = load_config(None, ["data.resize=64", "train.batch_size=32", f"train.precision={precision}",
                             "model.kernel=torch"])
    device = torch.device("cuda")
    split = load_split(data_root, "train", limit=2048).to(device)
    batches = TrainBatches(split, cfg.data, cfg.train.batch_size, 0, 1, cfg.seed)
    model = build_model(cfg.model, device)
    opt = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(opt, cfg.optim, batches.steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    it = batches.epoch(0)
    x, y = next(it)  # the epoch's start moves its permutation to the device: one copy per epoch
    train_step(model, x, y, opt, scaler, scheduler, cfg, device)  # warm-up: lazy inits may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(20):
            x, y = next(it)
            model.set_dropout_rows(0, cfg.train.batch_size, seed=step)
            loss, logits = train_step(model, x, y, opt, scaler, scheduler, cfg, device)
            accumulate(sums, loss, logits, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums[2].item() == 20 * cfg.train.batch_size
