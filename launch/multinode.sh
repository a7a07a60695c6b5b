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
# Hosts may come and go (README, "Fault tolerance"). With NNODES=MIN:MAX a job that loses a node
# restarts on the nodes left (if at least MIN) from the last checkpoint, and a node started later
# with the same settings joins it; the global batch stays train.batch_size, so the weights are those
# one process would have. The node at RDZV_ENDPOINT must stay up: its loss ends the job.
#
# Settings (environment):
#   NNODES          node count, or MIN:MAX for an elastic job (default 2)
#   NPROC_PER_NODE  processes on this node (default: one per visible GPU, else 1)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (default 127.0.0.1:29400);
#                   the host is a name or an address, an IPv6 address in brackets ([fd00::1]:29400)
#   RDZV_ID         one id per job, the same on every node
#   MAX_RESTARTS    failures this node's torchrun restarts its workers after (default 10). A lost node
#                   costs every other node one restart, a node joining costs none: 10 outlasts several
#                   lost hosts. A node whose budget runs out closes the job on every node.
#   LOCAL_ADDR      this node's address as the other nodes reach it (torchrun --local-addr). Set it on
#                   a node with several addresses (a multi-homed host, a network namespace): torchrun
#                   otherwise names the node by its host name, which may resolve elsewhere. With
#                   LOCAL_ADDR the script also says whether this node hosts the rendezvous (is_host=1
#                   when LOCAL_ADDR and RDZV_ENDPOINT's host resolve to a common address, so a host
#                   name and an address match; else 0), where torchrun's own guess fails ("The
#                   connection to the C10d store has failed"). If either does not resolve here
#                   (getent ahosts), is_host is left to torchrun, and the script says so.
#   RDZV_CONF       extra --rdzv-conf entries, key=value[,key=value...] (e.g. is_host=1,
#                   keep_alive_interval=2). They come after the script's own entries, so they win:
#                   last_call_timeout=10 (torchrun: 30; how long a rendezvous that has MIN nodes waits
#                   for more), plus is_host with LOCAL_ADDR.
#   CUT_OFF_S       seconds this node may fail to reach RDZV_ENDPOINT (once it has reached it) before
#                   it ends its torchrun and workers itself and exits 1 (default 120; 0 = never). A
#                   node cut off from the network otherwise hangs for many minutes (see the supervisor
#                   below). It is probed every 2 s: the node ends about CUT_OFF_S + 5 s after the cut.
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                   the interface the process groups use (gloo on CPU, nccl on GPU), e.g. eth1;
#                   passed to torchrun and its workers when set. Set them where the interface the host
#                   name resolves to is not the one the other nodes reach.
#
# Examples:
#   # two nodes with 8 GPUs each; node0 is 10.0.0.1 (run on both):
#   RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=nin-42 launch/multinode.sh --config configs/d2l.yaml
#   # elastic: start with whatever 1 to 4 nodes are up, admit more as they come:
#   NNODES=1:4 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=nin-43 launch/multinode.sh --config configs/d2l.yaml
#   # elastic CPU nodes on a private network (on 10.0.0.1, which hosts the rendezvous; on the others
#   # LOCAL_ADDR is their own address):
#   NNODES=1:2 NPROC_PER_NODE=1 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=nin-44 LOCAL_ADDR=10.0.0.1 \
#       GLOO_SOCKET_IFNAME=eth1 launch/multinode.sh --config configs/cpu.yaml train.device=cpu
#   # two "nodes" of one CPU process each on this machine (what the tests do):
#   NNODES=2 NPROC_PER_NODE=1 RDZV_ENDPOINT=127.0.0.1:29500 RDZV_ID=nin-local-1 launch/multinode.sh \
#       --config configs/cpu.yaml train.device=cpu &   # and the same again in a second shell
#
# Arguments go to nin-train unchanged: options, then dotted key=value overrides. The config they make
# is checked once before torchrun starts: a wrong one ends the node at once (exit 2).
set -euo pipefail

# shellcheck source=SCRIPTDIR/gpus.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"

NNODES=${NNODES:-2}                            # node count, or MIN:MAX for an elastic job
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_processes)}  # default: one per visible GPU, else 1
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}  # host:port of the rendezvous, reachable from every node
RDZV_ID=${RDZV_ID:-}                           # one id per job, the same on every node; names runs/nin-<id>
MAX_RESTARTS=${MAX_RESTARTS:-10}               # failures restarted after; a lost node costs one
LOCAL_ADDR=${LOCAL_ADDR:-}                     # this node's address for the others; empty: its host name
RDZV_CONF=${RDZV_CONF:-}                       # extra --rdzv-conf key=value entries; they win
CUT_OFF_S=${CUT_OFF_S:-120}                    # rendezvous unreachable this long: end this node; 0 = never

if [[ -z "$RDZV_ID" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "multinode.sh: error: set RDZV_ID to one id for this job, the same on every node" \
      "(e.g. RDZV_ID=nin-\$(date +%Y%m%d-%H%M%S)); it names the run folder runs/nin-<RDZV_ID>" >&2
    exit 2
  fi
  RDZV_ID="nin-$(date +%Y%m%d-%H%M%S)-$$"      # one node: this job's own id
fi
if [[ ! "$CUT_OFF_S" =~ ^[0-9]+$ ]]; then
  echo "multinode.sh: error: CUT_OFF_S=$CUT_OFF_S is not allowed: a whole number of seconds (0 = never)" >&2
  exit 2
fi
rdzv_host=${RDZV_ENDPOINT%:*}
rdzv_port=${RDZV_ENDPOINT##*:}
if [[ "$RDZV_ENDPOINT" != *:* ]]; then
  rdzv_port=29400                              # torchrun's default port for c10d
fi
rdzv_host=${rdzv_host#[}                       # an IPv6 endpoint is [address]:port
rdzv_host=${rdzv_host%]}
if [[ -z "$rdzv_host" || ! "$rdzv_port" =~ ^[0-9]+$ ]]; then
  echo "multinode.sh: error: RDZV_ENDPOINT=$RDZV_ENDPOINT is not allowed: host:port (an IPv6 address as" \
    "[address]:port)" >&2
  exit 2
fi

# A wrong config fails every attempt the same way: found here, once, it ends the node at once with
# nin-train's one line and exit 2, instead of torchrun restarting it MAX_RESTARTS times on every node.
python3 -m nin_dist.train_args "$@" || exit $?

addresses() {  # the addresses a host name (or address) resolves to, one a line; nothing if it does not
  local address _
  getent ahosts "$1" 2>/dev/null | while read -r address _; do echo "$address"; done | sort -u
}

# The script's own rendezvous settings, then RDZV_CONF: torchrun keeps the last value of a key.
conf="last_call_timeout=10"
local_addr=()
if [[ -n "$LOCAL_ADDR" ]]; then
  local_addr=(--local-addr="$LOCAL_ADDR")
  # This node hosts the rendezvous when LOCAL_ADDR and RDZV_ENDPOINT's host are one machine: compared
  # by address, so that a host name and an address of the same node match.
  ours=$(addresses "$LOCAL_ADDR" || true)
  theirs=$(addresses "$rdzv_host" || true)
  if [[ -z "$ours" ]]; then
    echo "multinode.sh: is_host left to torchrun's guess: LOCAL_ADDR=$LOCAL_ADDR does not resolve here" >&2
  elif [[ -z "$theirs" ]]; then
    echo "multinode.sh: is_host left to torchrun's guess: RDZV_ENDPOINT's host $rdzv_host does not resolve" \
      "here" >&2
  elif [[ -n $(comm -12 <(echo "$ours") <(echo "$theirs")) ]]; then
    conf+=",is_host=1"
    echo "multinode.sh: this node hosts the rendezvous (is_host=1): LOCAL_ADDR=$LOCAL_ADDR is $rdzv_host" \
      "($(echo "$theirs" | paste -sd ' '))" >&2
  else
    conf+=",is_host=0"
    echo "multinode.sh: this node joins the rendezvous on $rdzv_host ($(echo "$theirs" | paste -sd ' '))" \
      "(is_host=0): LOCAL_ADDR=$LOCAL_ADDR is not one of its addresses" >&2
  fi
fi
conf+="${RDZV_CONF:+,$RDZV_CONF}"
# Each attempt's rank 0 serves its process group a store of its own instead of the agents sharing
# one: a node that joins a running job counts its restarts from 0, so keys named by the restart
# count would not meet those of the nodes already there (nin_dist.distributed._attempt_store).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
for name in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  if [[ -n "${!name:-}" ]]; then export "${name?}"; else unset "$name"; fi  # empty would name no interface
done

# torchrun under a supervisor (nin_dist/node_supervisor.py), which takes this script's pid: signals to
# the script reach torchrun, torchrun ends with it (even on SIGKILL), and it watches the rendezvous. A
# node cut off from the network otherwise hangs for many minutes in a store call of torchrun that only
# something outside torchrun can end: once the rendezvous has answered, CUT_OFF_S seconds without
# reaching it end torchrun and every process under it, and the script exits 1. It says at the start
# whether the watch is armed.
exec python3 -m nin_dist.node_supervisor --host="$rdzv_host" --port="$rdzv_port" --cut-off-s="$CUT_OFF_S" -- \
  torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" --rdzv-conf="$conf" "${local_addr[@]}" \
  --max-restarts="$MAX_RESTARTS" -m nin_dist.train "$@"
