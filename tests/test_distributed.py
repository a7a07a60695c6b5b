"""N processes train as one: real torchrun jobs with gloo on loopback.

The equivalence runs use `train.precision=fp64`. In fp32, N ranks round their sums differently from
one process (~1e-7), and training amplifies any such difference: one process started from weights
perturbed by 1e-7 is O(1) away from the unperturbed run within ten steps (a few ReLUs flip sign and
the gradients they gate change by far more than the rounding that flipped them). fp64 shrinks the
rounding to ~1e-16, so what these tests measure is the algorithm: the global batch split over ranks,
cross-rank BatchNorm and one dropout mask per global batch.

One reference job, 2 processes x 2 epochs x 30 steps, serves the comparisons: one process, and two
"nodes" joined by c10d rendezvous whose rank 1 is SIGKILLed mid-epoch and restarted.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    data_dir,
    env,
    finish,
    free_port,
    holding,
    kill_rank_after_checkpoint,
    last_checkpoint,
    max_rel_diff,
    overrides,
    run,
    standalone,
    start,
    train_in_process,
)

from nin_dist import checkpoint as ckpt
from nin_dist.data import eval_batches, load_split, shard_range

STEPS_PER_EPOCH = 30
# cpu.yaml (BatchNorm, Nesterov, one-cycle) at half its widths with dropout on, in fp64 on 480 images,
# global batch 16: 60 steps are plenty, since one rounding difference of ~1e-7 grows to O(1) within
# ten steps (above).
RUN = {"data__train_limit": 16 * STEPS_PER_EPOCH, "data__test_limit": 300, "train__batch_size": 16,
       "train__epochs": 2, "train__precision": "fp64", "train__log_every": 20, "model__dropout": 0.1,
       "model__width": 0.25}
REL_TOL = 1e-5


def _report(what: str, diff: tuple[float, str]) -> None:
    print(f"\n{what}: max relative parameter difference {diff[0]:.2e} ({diff[1]})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 2-process job every other run is compared with; its per-rank logs are kept."""
    out = tmp_path_factory.mktemp("reference")
    logs = out / "logs"
    rc, text = standalone(2, overrides(out / "run", **RUN, train__progress="bar"),
                          extra=["--tee=3", f"--log-dir={logs}"], timeout=300)
    assert rc == 0, text[-4000:]
    return {"out": out / "run", "logs": logs, "text": text, "state": last_checkpoint(out / "run")}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_one_process_equals_two(reference, tmp_path):
    out = tmp_path / "one"
    assert train_in_process(overrides(out, **RUN)) == 0
    one = last_checkpoint(out)
    assert one[ckpt.STEP] == reference["state"][ckpt.STEP] == 2 * STEPS_PER_EPOCH
    diff = max_rel_diff(one[ckpt.MODEL], reference["state"][ckpt.MODEL])
    _report(f"1 process vs 2 processes, {2 * STEPS_PER_EPOCH} steps (fp64)", diff)
    assert diff[0] < REL_TOL, diff
    assert _metrics(out)["test_acc"] == _metrics(reference["out"])["test_acc"]
    # Evaluation scores fp32 logits (`evaluate` casts them): equal to fp32 rounding.
    assert abs(_metrics(out)["test_loss"] - _metrics(reference["out"])["test_loss"]) < 1e-6


def test_progress_bar_and_epoch_lines_on_rank_0_only(reference):
    def rank_log(rank: int) -> str:
        (path,) = reference["logs"].glob(f"*/attempt_0/{rank}/stderr.log")
        return path.read_text()

    rank0, rank1 = rank_log(0), rank_log(1)
    steps = 2 * STEPS_PER_EPOCH
    assert re.search(rf"{steps}/{steps} \[.*loss \d\.\d{{4}}, \d+ img/s\]", rank0)
    assert len(re.findall(r"\[rank 0\] epoch \d/2  train loss .* MFU [\d.]+%", rank0)) == 2
    assert "a lost peer is found after 120 s" in rank0  # train.dist_timeout_s's default: eager, on a CPU
    assert "img/s" not in rank1 and "epoch 1/2" not in rank1, rank1[-2000:]


@pytest.mark.slow
def test_two_nodes_by_c10d_rendezvous_equal_one_node_and_a_killed_worker_changes_nothing(reference, tmp_path):
    """Two `launch/multinode.sh` invocations (one process each) form one job of world size 2. Its rank 1
    is SIGKILLed mid-epoch 2: both nodes' torchruns restart their workers, which resume the checkpoint,
    end on the single-node job's weights, and continue the same MLflow run (a real sqlite store), whose
    epoch metrics carry the steps of both epochs."""
    from mlflow import MlflowClient

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    kill_after = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # a mid-epoch checkpoint, in epoch 2
    tracking = [f"tracking.uri={uri}", "tracking.enabled=true", "tracking.system_metrics=false",
                "tracking.log_model=false"]
    node_env = env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                   RDZV_ID=f"nin-test-{os.getpid()}", MAX_RESTARTS="1")
    args = ["bash", str(REPO / "launch" / "multinode.sh"),
            *overrides(out, **RUN, train__checkpoint_every=kill_after), *tracking]
    nodes = [start(args, env=node_env, cwd=tmp_path) for _ in range(2)]
    path = kill_rank_after_checkpoint(nodes, out, kill_after, settle=0.5)  # rank 1, mid-epoch 2

    results = [finish(node, timeout=300) for node in nodes]
    text = "".join(text for _, text in results)
    for rc, node_text in results:
        assert rc == 0, node_text[-4000:]
    assert "world size 2" in text
    assert f"resuming from {path} at epoch 2, step {kill_after}" in text, text[-4000:]
    final = last_checkpoint(out)
    assert final[ckpt.STEP] == 2 * STEPS_PER_EPOCH
    diff = max_rel_diff(final[ckpt.MODEL], reference["state"][ckpt.MODEL])
    _report(f"2 nodes x 1 process (c10d), rank 1 SIGKILLed after step {kill_after} and restarted, "
            "vs 1 node x 2 processes", diff)
    assert diff[0] < REL_TOL, diff
    assert _metrics(out)["test_acc"] == _metrics(reference["out"])["test_acc"]

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_id == _metrics(out)["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == \
        [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


@pytest.mark.slow
def test_a_second_job_on_a_held_folder_exits_2_on_every_rank(tmp_path):
    out = tmp_path / "run"
    tiny = overrides(out, data__train_limit=64, data__test_limit=100, train__batch_size=16, train__max_steps=1)
    with holding(out) as holder:
        started = time.monotonic()
        rc, text = standalone(2, tiny, extra=["--tee=3"], timeout=120)
        seconds = time.monotonic() - started
    assert rc != 0 and ":Traceback" not in text, text[-3000:]  # no worker printed a traceback
    for rank in (0, 1):  # rank 0 found the holder, rank 1 learned it from rank 0
        assert (f"[default{rank}]:nin-train: error: run.out_dir={out} is in use by another job "
                f"(pid {holder.pid} on host ") in text, text[-3000:]
    root_cause = re.search(r"Root Cause.*?exitcode\s+: (\S+)", text, re.S)
    assert root_cause and root_cause.group(1) == "2", text[-3000:]
    assert not (out / "config.yaml").exists() and seconds < 90, seconds


@pytest.mark.slow
def test_three_processes_evaluate_every_test_image_once(tmp_path):
    """3 ranks: one step equals one process's, and the 200 test images (66 + 67 + 67: shards of
    unequal size) are counted once; the unit test below checks all 10,000 on every world size.

    fp64: in fp32 a BatchNorm bias gradient is a sum of thousands of terms that nearly cancel, and
    one process (torch's BatchNorm) and three (the cross-rank combine) round it differently by
    ~1e-3 relative already after one step."""
    one_step = {"train__batch_size": 24, "train__max_steps": 1, "train__epochs": 1, "data__train_limit": 240,
                "data__test_limit": 200, "train__precision": "fp64"}
    rc, text = standalone(3, overrides(tmp_path / "three", **one_step), timeout=240)
    assert rc == 0, text[-4000:]
    assert train_in_process(overrides(tmp_path / "one", **one_step)) == 0
    assert "(200 images)" in text  # the epoch line of rank 0 counts the reduced total
    diff = max_rel_diff(last_checkpoint(tmp_path / "three")[ckpt.MODEL], last_checkpoint(tmp_path / "one")[ckpt.MODEL])
    _report("3 processes vs 1, one fp64 step", diff)
    assert diff[0] < REL_TOL, diff
    three, one = _metrics(tmp_path / "three"), _metrics(tmp_path / "one")
    assert three["test_acc"] == one["test_acc"] and abs(three["test_loss"] - one["test_loss"]) < 1e-5


def test_eval_shards_cover_each_test_image_exactly_once():
    from nin_dist.config import DataConfig

    split = load_split(data_dir(), "test")
    for world in (1, 2, 3, 7):
        bounds = [shard_range(len(split), rank, world) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 10_000
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        seen = torch.cat([index for rank in range(world)
                          for _, _, index in eval_batches(split, DataConfig(resize=28), 1000, rank, world)])
        assert torch.equal(seen.sort().values, torch.arange(10_000)), world


@pytest.mark.slow
def test_a_config_error_under_torchrun_exits_2_on_every_rank(tmp_path):
    rc, text = standalone(2, ["--config", "configs/cpu.yaml", "train.epochs=0"], extra=["--tee=3"], timeout=120)
    assert rc != 0  # torchrun reports the failed job
    for rank in (0, 1):  # each rank printed the one-line error
        assert f"[default{rank}]:nin-train: error: train.epochs=0 is not allowed" in text, text[-3000:]
    # torchrun's report: the first rank to exit did so with 2 (it stops the other one).
    root_cause = re.search(r"Root Cause.*?exitcode\s+: (\S+)", text, re.S)
    assert root_cause and root_cause.group(1) == "2", text[-3000:]
    # Rank 1 on its own (torchrun may stop it before it exits): 2, before joining any process group.
    rc1, text1 = run([sys.executable, "-m", "nin_dist.train", "--config", "configs/cpu.yaml", "train.epochs=0"],
                     env=env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(free_port())), timeout=60)
    assert rc1 == 2 and len(text1.strip().splitlines()) == 1, text1
    assert text1.startswith("nin-train: error: train.epochs=0 is not allowed: at least 1"), text1


def test_a_lone_process_takes_omp_num_threads_and_local_ranks_share_the_cores(monkeypatch):
    """train.threads null: OMP_NUM_THREADS (the user's, as torch reads it) for a process alone on its
    machine; cores / local processes otherwise, since torchrun sets OMP_NUM_THREADS=1 for those itself."""
    from nin_dist.distributed import default_threads, init_distributed

    cores = os.cpu_count()
    assert default_threads(1, {}) == cores and default_threads(2, {}) == max(1, cores // 2)
    assert default_threads(1, {"OMP_NUM_THREADS": "3"}) == 3
    assert default_threads(2, {"OMP_NUM_THREADS": "1"}) == max(1, cores // 2)  # torchrun's default, not read
    assert default_threads(1, {"OMP_NUM_THREADS": "0"}) == default_threads(1, {"OMP_NUM_THREADS": "x"}) == cores
    threads = torch.get_num_threads()
    try:
        for name, value in {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "3"}.items():
            monkeypatch.setenv(name, value)
        init_distributed("cpu")
        assert torch.get_num_threads() == 3
        init_distributed("cpu", threads=2)  # train.threads wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_nodes_are_torchruns_count_not_processes_over_processes_per_node(monkeypatch):
    """A job of 2 + 1 processes runs on 2 nodes, as torchrun's GROUP_WORLD_SIZE says on every worker;
    WORLD_SIZE // LOCAL_WORLD_SIZE made that 1 node on the first and 3 on the second. (The variable is
    read here in a world of one: a world of 3 would need its peers to form a process group.)"""
    from nin_dist.distributed import DistInfo, init_distributed

    for name, value in {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert init_distributed("cpu", threads=torch.get_num_threads()).num_nodes == 2
    monkeypatch.delenv("GROUP_WORLD_SIZE")  # no torchrun
    assert init_distributed("cpu", threads=torch.get_num_threads()).num_nodes == 1
    for local_world_size in (2, 1):  # each node's rank 0 says the same
        info = DistInfo(rank=0, local_rank=0, world_size=3, local_world_size=local_world_size,
                        device=torch.device("cpu"), backend="gloo", num_nodes=2)
        assert info.describe() == "a world of 3 on 2 nodes (restart 0)"


def test_cross_rank_batchnorm_in_a_world_of_one_is_batchnorm():
    """Output, every gradient and the running statistics equal nn.BatchNorm2d's (float64, |mean| >> std)."""
    from torch import nn

    from nin_dist.layers import CrossRankBatchNorm2d

    x = (torch.randn(6, 5, 7, 7, dtype=torch.float64) * 0.01 + 30.0).requires_grad_()
    dy = torch.randn(6, 5, 7, 7, dtype=torch.float64)
    ours, ref = CrossRankBatchNorm2d(5).double(), nn.BatchNorm2d(5).double()
    with torch.no_grad():
        for layer in (ours, ref):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    outs = []
    for layer in (ours, ref):
        y = layer(x)
        gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        outs.append((y, gx, gw, gb, layer.running_mean, layer.running_var))
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-12, atol=1e-12)


def test_global_batch_dropout_rows_of_two_ranks_make_the_one_rank_mask():
    from nin_dist.layers import GlobalBatchDropout

    x = torch.ones(8, 3, 4, 4)
    whole = GlobalBatchDropout(0.3)
    whole.set_rows(0, 8, seed=1234)
    halves = []
    for rank in (0, 1):
        layer = GlobalBatchDropout(0.3)
        layer.set_rows(4 * rank, 8, seed=1234)
        halves.append(layer(x[4 * rank: 4 * rank + 4]))
    assert torch.equal(torch.cat(halves), whole(x))
    assert 0.1 < (whole(x) == 0).float().mean() < 0.5 and torch.equal(whole.eval()(x), x)


# One rank of a world of 2: a plain torch.compile(NiN) (no trainer) with a backend that records the
# forward and backward graphs it is given, 2 steps with a new dropout seed each, against an eager copy.
_COMPILE_RANK = """
import json, torch, torch.distributed as dist
from torch._dynamo.backends.common import aot_autograd
from nin_dist.config import ModelConfig
from nin_dist.model import NiN

dist.init_process_group("gloo")
cfg = ModelConfig(width=0.05, dropout=0.5, batchnorm=True, stem_kernel=5, stem_stride=1, stem_padding=2)
eager, net = NiN(cfg), NiN(cfg)
net.load_state_dict(eager.state_dict())
graphs, frames = {"fw": [], "bw": []}, []

def keep(kind):
    def compiler(gm, example_inputs):
        graphs[kind].append(gm)
        return gm.forward
    return compiler

def backend(gm, example_inputs):
    frames.append(gm)
    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))(gm, example_inputs)

compiled, rank = torch.compile(net, backend=backend), dist.get_rank()
x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(rank))
for step in range(2):
    outs = []
    for model, module in ((eager, eager), (compiled, net)):
        module.set_dropout_rows(2 * rank, 4, seed=2**64 - 1 - step)  # the largest seeds torch takes
        y = model(x)
        y.square().sum().backward()
        outs.append([y.detach()] + [p.grad.clone() for p in module.parameters()])
        module.zero_grad()
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
ops = {kind: sorted({str(n.target) for g in gms for n in g.graph.nodes if n.op == "call_function"})
       for kind, gms in graphs.items()}
if rank == 0:
    print("RESULT " + json.dumps({"frames": len(frames), "ops": ops}))
dist.destroy_process_group()
"""


def test_a_plain_compiled_nin_keeps_the_collectives_and_the_mask_generator_opaque():
    """torch.compile of the bare model, not through the trainer, in a world of 2: one graph for both
    steps (no graph break at the dropout's generator, no recompile for its seed), each collective
    and the mask one op of ours, and nothing traced from inside them (no c10d functional
    collectives, no rand); the compiled steps compute what the eager ones do."""
    port = free_port()
    procs = [start([sys.executable, "-c", _COMPILE_RANK],
                   env=env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)))
             for rank in (0, 1)]
    results = [finish(proc, timeout=180) for proc in procs]
    assert all(rc == 0 for rc, _ in results), "\n".join(out[-3000:] for _, out in results)
    found = re.search(r"^RESULT (.*)$", results[0][1], re.M)
    assert found, results[0][1][-3000:]
    report = json.loads(found.group(1))
    assert report["frames"] == 1, report
    forward, backward = report["ops"]["fw"], report["ops"]["bw"]
    assert {"nin_dist.global_batch_stats.default", "nin_dist.cross_rank_batch_norm.default",
            "nin_dist.global_batch_keep_mask.default"} <= set(forward), forward
    assert "nin_dist.cross_rank_batch_norm_backward.default" in backward, backward
    traced = [op for op in forward + backward if "c10d" in op or "rand" in op]
    assert not traced, traced


# --------------------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_matches_one_process(tmp_path):
    """2 GPUs: a 2-process nccl job vs one process; 1 GPU: a 1-process CUDA run vs the CPU."""
    cuda = {"data__train_limit": 16 * 20, "data__test_limit": 1000, "train__batch_size": 16, "train__epochs": 1,
            "model__kernel": "torch", "train__max_steps": 1}
    assert train_in_process(overrides(tmp_path / "one", **cuda, train__device="cuda")) == 0
    if torch.cuda.device_count() >= 2:
        rc, text = standalone(2, overrides(tmp_path / "other", **cuda, train__device="cuda"), timeout=300)
        assert rc == 0, text[-4000:]
        what = "2-process nccl vs 1 process, one step"
    else:
        assert train_in_process(overrides(tmp_path / "other", **cuda, train__device="cpu")) == 0
        what = "CUDA vs CPU, one step"
    diff = max_rel_diff(last_checkpoint(tmp_path / "other")[ckpt.MODEL], last_checkpoint(tmp_path / "one")[ckpt.MODEL])
    _report(what, diff)
    assert diff[0] < 1e-3, diff  # TF32 convolutions on the GPU round to ~1e-3
