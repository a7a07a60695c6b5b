#!/usr/bin/env bash
# Train on this machine with NGPU processes: one per GPU, or NGPU CPU processes with train.device=cpu.
#
# Examples:
#   launch/local.sh --config configs/d2l.yaml                            # one process per visible GPU
#   NGPU=2 launch/local.sh --config configs/d2l.yaml train.epochs=2      # the first two GPUs
#   CUDA_VISIBLE_DEVICES=4,5,6,7 launch/local.sh --config configs/d2l.yaml
#   NGPU=2 launch/local.sh --config configs/cpu.yaml train.device=cpu    # two CPU processes (gloo)
#
# Arguments go to nin-train unchanged: options, then dotted key=value overrides. train.batch_size
# is the global batch, so the same command gives the same training whatever NGPU is.
set -euo pipefail

# Visible GPUs (respects CUDA_VISIBLE_DEVICES); 0 without a driver.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set, even empty: those devices only
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
  else
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  fi
}

NGPU=${NGPU:-$(visible_gpus)}
if [[ "$NGPU" =~ ^[0-9]+$ && "$NGPU" -lt 1 ]]; then
  NGPU=1  # no GPU: a world of one on the CPU
fi

exec torchrun --standalone --nproc_per_node="$NGPU" -m nin_dist.train "$@"
