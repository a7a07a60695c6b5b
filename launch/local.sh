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

# shellcheck source=SCRIPTDIR/gpus.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
NGPU=${NGPU:-$(default_processes)}

exec torchrun --standalone --nproc_per_node="$NGPU" -m nin_dist.train "$@"
