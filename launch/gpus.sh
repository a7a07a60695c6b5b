# Sourced by local.sh and multinode.sh: how many processes a node starts by default.
# shellcheck shell=bash

# Visible GPUs (respects CUDA_VISIBLE_DEVICES); 0 without a driver.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set, even empty: those devices only
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
  else
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  fi
}

# One process per visible GPU; without a GPU, a world of one on the CPU.
default_processes() {
  local gpus
  gpus=$(visible_gpus)
  if [[ "$gpus" -lt 1 ]]; then
    echo 1
  else
    echo "$gpus"
  fi
}
