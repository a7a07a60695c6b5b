"""The process group from torchrun's environment, rank helpers, DDP wrap and reductions.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; they are
the inputs read here, with TORCHELASTIC_RESTART_COUNT to keep restarts apart (see `_attempt_store`)
and to report them (`DistInfo.restarts`). Without them a process is a world of one and no process
group is made. The group's timeout (`train.dist_timeout_s`, else `default_dist_timeout_s`)
bounds every collective: a peer that vanishes (host lost, link cut) fails this rank after that long,
and torchrun then forms the job again from the hosts that are left.
Backend: nccl on CUDA, gloo on the CPU. Reductions say in their names where the result lives:
`all_reduce_sum_` works in place on a device tensor, `*_float` returns a host number (a sync).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nin_dist.config import default_dist_timeout_s
from nin_dist.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None for a world of one without a process group
    timeout_s: float = 0.0  # the process group's timeout, seconds (0 without a process group)
    restarts: int = 0  # TORCHELASTIC_RESTART_COUNT: failed attempts this node's torchrun has restarted
    # GROUP_WORLD_SIZE: the nodes (torchrun agents) in this attempt. Not world_size // local_world_size,
    # which is wrong when nodes run different process counts (2 + 1 processes are 2 nodes, not 1 or 3).
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def metrics(self) -> dict[str, float]:
        """The world this attempt trains in: processes, and `dist/restarts`, the failures that the torchrun
        of rank 0's node has restarted its workers after. That is the job's count while every node has been
        in it from the start; a node that joined later counts from its arrival, and a node joining restarts
        the workers without counting."""
        return {"dist/world_size": self.world_size, "dist/restarts": self.restarts}

    def describe(self) -> str:
        """`a world of 2 on 2 nodes (restart 1)`, for the line a (re)started attempt logs at its first step."""
        nodes = self.num_nodes
        return f"a world of {self.world_size} on {nodes} node{'s' if nodes > 1 else ''} (restart {self.restarts})"


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                              f"lower --nproc_per_node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def default_threads(local_world_size: int, environ=os.environ) -> int:
    """torch's intra-op threads for a CPU process when `train.threads` is null. Processes on one machine
    share its cores (oversubscribing them makes every rank slower): cores / local processes. A process
    alone on its machine takes `OMP_NUM_THREADS` instead when it is set to a count, as torch itself
    would: that is the user's choice. With several local processes it is not read, since torchrun sets
    it to 1 for them whenever the user did not."""
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if local_world_size == 1 and omp.isdigit() and int(omp) >= 1:
        return int(omp)
    return max(1, (os.cpu_count() or 1) // local_world_size)


def init_distributed(device: str = "auto", threads: int | None = None, timeout_s: float | None = None,
                     compile: bool = False) -> DistInfo:
    """Read torchrun's environment, pick the device, and join the process group (if any) with a timeout
    of `timeout_s` seconds (None: `default_dist_timeout_s` for a model compiled or not on that device)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    dev = _pick_device(device, local_rank)
    if dev.type == "cpu":
        torch.set_num_threads(threads or default_threads(local_world_size))
    else:
        torch.cuda.set_device(dev)
    backend, seconds = None, 0.0
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        seconds = timeout_s or default_dist_timeout_s(compile, dev.type)
        timeout = datetime.timedelta(seconds=seconds)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=_attempt_store(world_size, timeout),
                                device_id=dev if dev.type == "cuda" else None)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    return DistInfo(rank, local_rank, world_size, local_world_size, dev, backend, seconds, restarts, nodes)


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The torchrun agent's store under a prefix of this attempt, or None for init's own env:// store.

    torchrun (2.14) serves every restart of a worker group from the same rendezvous TCPStore at the
    same MASTER_ADDR:MASTER_PORT, and the process group's keys (each rank's gloo address, the nccl
    id) carry no attempt in their names: after `--max-restarts` restarts the workers, the new ranks
    read the dead ranks' addresses and never connect. Keying this attempt's process group by
    TORCHELASTIC_RESTART_COUNT keeps the attempts apart while every node restarts together. A node
    that joins a running job starts its count at 0 while the others count their failures, so they
    would never meet here: launch/multinode.sh turns the shared store off
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and each attempt's rank 0 serves a store of its own.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"nin_dist/attempt_{attempt}/", store)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistInfo, bucket_cap_mb: float) -> nn.Module:
    """DDP across the world, or the model itself in a world of one."""
    if info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # gradient_as_bucket_view: grads alias the buckets, saving one copy per step. Buffers (BatchNorm
    # running stats) are equal on every rank already (CrossRankBatchNorm2d), so no per-step broadcast.
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb,
                                   gradient_as_bucket_view=True, **_no_forward_buffer_sync())


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "no buffer broadcast before each forward" in this torch.

    torch 2.13 renamed `broadcast_buffers` to `forward_sync_buffers` and warns (FutureWarning, on
    every rank) when given the old name; 2.11 and 2.12 know only the old one. Unlike the old flag,
    the new one still broadcasts the buffers once at the wrap: a no-op here, as they are equal.
    """
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (its state_dict has no prefixes)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, on the tensor's device (no host sync)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (one host sync)."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_reduce_sum_(t).item() == 0.0
