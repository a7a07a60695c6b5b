#!/usr/bin/env bash
# Train across machines: run this on every node with the same RDZV_ENDPOINT and RDZV_ID. The c10d
# rendezvous (hosted by the torchrun on the RDZV_ENDPOINT host) forms the job, gives every process
# its RANK / WORLD_SIZE, and restarts all workers up to MAX_RESTARTS times after a failure; the run
# resumes from run.out_dir/checkpoints/last.pt, so run.out_dir must be on storage every node sees.
# RDZV_ID is required with more than one node (it must be the same on every node, so no default can
# be made up here): it names the run folder, runs/nin-<RDZV_ID>, so give every job its own.
# The rendezvous store and MASTER_PORT are unauthenticated (TCPStore listens on every interface and
# the process group unpickles what it receives): keep the nodes on a private network.
#
# Examples:
#   # two nodes with 8 GPUs each; node0 is 10.0.0.1 (run on both):
#   RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=nin-42 launch/multinode.sh --config configs/d2l.yaml
#   # elastic: start with whatever 1 to 4 nodes are up, admit more as they come:
#   NNODES=1:4 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=nin-43 launch/multinode.sh --config configs/d2l.yaml
#   # two "nodes" of one CPU process each on this machine (what the tests do):
#   NNODES=2 NPROC_PER_NODE=1 RDZV_ENDPOINT=127.0.0.1:29500 RDZV_ID=nin-local-1 launch/multinode.sh \
#       --config configs/cpu.yaml train.device=cpu &   # and the same again in a second shell
#
# Arguments go to nin-train unchanged: options, then dotted key=value overrides.
set -euo pipefail

# shellcheck source=SCRIPTDIR/gpus.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"

NNODES=${NNODES:-2}                            # node count, or MIN:MAX for an elastic job
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_processes)}  # default: one per visible GPU, else 1
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}  # host:port of the rendezvous, reachable from every node
RDZV_ID=${RDZV_ID:-}                           # one id per job, the same on every node; names runs/nin-<id>
MAX_RESTARTS=${MAX_RESTARTS:-3}                # worker-group restarts before the job fails

if [[ -z "$RDZV_ID" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "multinode.sh: error: set RDZV_ID to one id for this job, the same on every node" \
      "(e.g. RDZV_ID=nin-\$(date +%Y%m%d-%H%M%S)); it names the run folder runs/nin-<RDZV_ID>" >&2
    exit 2
  fi
  RDZV_ID="nin-$(date +%Y%m%d-%H%M%S)-$$"      # one node: this job's own id
fi

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" --max-restarts="$MAX_RESTARTS" \
  -m nin_dist.train "$@"
