"""launch/slurm.sbatch under a real SLURM: munged, slurmctld and slurmd running on this machine.

The cluster is one node, `localhost` (so the script's head node resolves for the rendezvous), with
cons_tres, proctrack/linuxproc, task/none and no accounting. Its config, munge key, sockets, state
and logs live in one tmp folder, on ports of its own, so nothing of the machine's own SLURM or munge
(if any) is touched. SLURM comes from Debian's `slurm-wlm` and `munge`, installed with apt when
missing; the test is skipped only where apt cannot install them.

The job is a tiny fp64 2-process run submitted with sbatch; it must equal the same job started by a
plain `torchrun --nproc_per_node=2`: same world size, same reduction order, so the same bits.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    REPO,
    assert_bit_identical,
    env,
    finish,
    free_port,
    last_checkpoint,
    overrides,
    run,
    start,
    torchrun_cmd,
)

from nin_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow

PACKAGES = ["slurm-wlm", "munge"]
TOOLS = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel"]
NODE = "localhost"
SCRIPT = REPO / "launch" / "slurm.sbatch"
# 4 steps of cpu.yaml (BatchNorm across ranks, dropout on) in fp64: enough to see a different job.
TINY = {"data__train_limit": 16 * 4, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 1,
        "train__precision": "fp64", "model__dropout": 0.1}


# --------------------------------------------------------------------------- installing SLURM

def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _install_slurm() -> None:
    """apt-get install slurm-wlm and munge, or skip the test saying why apt cannot."""
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not installed ({', '.join(_missing_tools())} missing) and apt needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(f"SLURM is not installed ({', '.join(_missing_tools())} missing) and there is no apt-get")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = ["-o", "DPkg::Lock::Timeout=300"]  # someone else's apt on the machine: wait, don't fail
    for cmd in (["apt-get", *lock_wait, "update"],
                ["apt-get", *lock_wait, "install", "-y", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(cmd, env=apt_env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"apt cannot install SLURM: {' '.join(cmd)} took over 900 s")
        if done.returncode != 0:
            pytest.skip(f"apt cannot install SLURM: {' '.join(cmd)} exited {done.returncode}: "
                        f"{(done.stdout + done.stderr)[-1500:]}")
    if _missing_tools():
        pytest.skip(f"apt installed {PACKAGES} but {_missing_tools()} are still not on PATH")


# --------------------------------------------------------------------------- the cluster

@dataclass
class Cluster:
    folder: Path
    cpus: int
    env: dict[str, str]  # SLURM_CONF for every daemon and client; also marks their processes
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def logs(self) -> str:
        """The tail of what each daemon printed (in the foreground they copy their logs there), for a failure."""
        files = [self.folder / f"{name}.out" for name in ("munged", "slurmctld", "slurmd")]
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in files
                         if path.exists())

    def command(self, *args: str, timeout: float = 30) -> str:
        """A SLURM client command against this cluster; its stdout, or a failure with the daemons' logs."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}: {done.stderr}\n{self.logs()}"
        return done.stdout


def _slurm_conf(folder: Path, cpus: int, munge_socket: Path) -> str:
    """One node and one partition on loopback; every path under `folder`, ports of its own."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    # slurmctld runs only where SlurmctldHost names this machine; the address keeps it on loopback.
    host = socket.gethostname().split(".")[0]
    settings = {
        "ClusterName": "nintest",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
        "SlurmUser": user, "SlurmdUser": user,
        "AuthType": "auth/munge", "CredType": "cred/munge", "AuthInfo": f"socket={munge_socket}",
        "StateSaveLocation": folder / "state", "SlurmdSpoolDir": folder / "spool",
        "SlurmctldPidFile": folder / "slurmctld.pid", "SlurmdPidFile": folder / "slurmd.pid",
        "SlurmctldLogFile": folder / "slurmctld.log", "SlurmdLogFile": folder / "slurmd.log",
        "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none", "MpiDefault": "none", "MailProg": shutil.which("true"),
        "ReturnToService": 2,
        # The node is what slurm.conf says, whatever hwloc counts (a container may see the host's cores).
        "SlurmdParameters": "config_overrides",
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines += [f"NodeName={NODE} CPUs={cpus} State=UNKNOWN",
              f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP"]
    return "\n".join(lines) + "\n"


def _munge_key(folder: Path) -> Path:
    """A key of this cluster's own, else the machine's (older munge has no mungekey --create)."""
    key = folder / "munge.key"
    if shutil.which("mungekey"):
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], capture_output=True, timeout=30)
    return key if key.is_file() else Path("/etc/munge/munge.key")


def _start_daemon(cluster: Cluster, name: str, cmd: list[str]) -> None:
    """`cmd` in the foreground of its own session, its output with its log; kept to stop later."""
    with open(cluster.folder / f"{name}.out", "wb") as out:
        cluster.daemons[name] = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for(cluster: Cluster, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `ready` until it holds; fail at once, with the logs, if a daemon has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        for name, daemon in cluster.daemons.items():
            if daemon.poll() is not None:
                pytest.fail(f"{name} exited {daemon.returncode} waiting for {what}:\n{cluster.logs()}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{cluster.logs()}"
        time.sleep(0.2)


def _munge_answers(munge_socket: Path) -> bool:
    """munged encodes a credential: it is up and has read its key."""
    done = subprocess.run(["munge", "--no-input", f"--socket={munge_socket}"], capture_output=True, timeout=30)
    return done.returncode == 0


def _node_state(cluster: Cluster) -> str:
    done = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%T"], env=cluster.env, capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def _start(cluster: Cluster) -> None:
    munge_socket = cluster.folder / "munge" / "munge.socket"
    munge_socket.parent.mkdir(mode=0o755)
    for folder in ("state", "spool"):
        (cluster.folder / folder).mkdir()
    cluster.conf.write_text(_slurm_conf(cluster.folder, cluster.cpus, munge_socket))
    _start_daemon(cluster, "munged", ["munged", "--foreground", f"--socket={munge_socket}",
                                      f"--key-file={_munge_key(cluster.folder)}",
                                      f"--log-file={cluster.folder / 'munged.log'}",
                                      f"--pid-file={cluster.folder / 'munged.pid'}",
                                      f"--seed-file={cluster.folder / 'munged.seed'}"])
    _wait_for(cluster, "munge credential", lambda: _munge_answers(munge_socket))
    # -D: in the foreground, so each is a child this test can stop; -c: a clean state, no old jobs.
    _start_daemon(cluster, "slurmctld", ["slurmctld", "-D", "-c", "-f", str(cluster.conf)])
    _start_daemon(cluster, "slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(cluster.conf)])
    _wait_for(cluster, f"idle node {NODE}", lambda: _node_state(cluster) == "idle")


# --------------------------------------------------------------------------- tearing it down

def _processes_of(cluster: Cluster) -> list[int]:
    """Every process started with this cluster's SLURM_CONF: the daemons, slurmstepd, a job's workers."""
    marker = f"SLURM_CONF={cluster.conf}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):  # gone while we looked, or not ours to read
            if marker in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                found.append(int(environ.parent.name))
    return found


def _cancel_jobs(cluster: Cluster) -> None:
    if cluster.daemons.get("slurmctld") and cluster.daemons["slurmctld"].poll() is None:
        user = pwd.getpwuid(os.geteuid()).pw_name
        subprocess.run(["scancel", f"--user={user}"], env=cluster.env, capture_output=True, timeout=30)


def _stop(cluster: Cluster) -> None:
    """Cancel what runs, stop the daemons (slurmd, slurmctld, munged), then kill any process left behind."""
    _cancel_jobs(cluster)
    for name in ("slurmd", "slurmctld", "munged"):
        daemon = cluster.daemons.get(name)
        if daemon is None or daemon.poll() is not None:
            continue
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=20)
    for pid in _processes_of(cluster):  # slurmstepd and job steps live in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _processes_of(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A running one-node SLURM cluster; on teardown no process of it is left and its folder is gone."""
    if _missing_tools():
        _install_slurm()
    # Not under pytest's basetemp (mode 0700): munged wants every folder above its socket open to all
    # users. Short, too: a socket's path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="nin-slurm-"))
    folder.chmod(0o755)
    cluster = Cluster(folder, cpus=len(os.sched_getaffinity(0)), env={**os.environ})
    cluster.env["SLURM_CONF"] = str(cluster.conf)
    try:
        _start(cluster)
        yield cluster
    finally:
        _stop(cluster)
        left = _processes_of(cluster)
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"processes of the test's SLURM cluster still running: {left}"


# --------------------------------------------------------------------------- the job

def _cpu_node_flags(cluster: Cluster) -> list[str]:
    """The sbatch flags the script's header gives for a small CPU-only cluster."""
    return ["--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}"]


def _sbatch(cluster: Cluster, job_dir: Path, train_args: list[str]) -> tuple[str, int, str]:
    """launch/slurm.sbatch as README says for a CPU-only node: 2 processes, no GPUs; waits for the job."""
    job_env = env(SLURM_CONF=str(cluster.conf), GPUS_PER_NODE="2", RDZV_PORT=str(free_port()), MAX_RESTARTS="0")
    cmd = ["sbatch", "--wait", "--parsable", *_cpu_node_flags(cluster), f"--chdir={job_dir}",
           f"--output={job_dir}/%x-%j.out", str(SCRIPT), *train_args]
    rc, text = run(cmd, env=job_env, timeout=300)
    job_id = text.split()[0].split(";")[0] if text.strip() else ""
    return job_id, rc, text


@contextlib.contextmanager
def _running(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """`cmd` started in a session of its own; killed with its workers if the block leaves it running."""
    proc = start(cmd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_sbatch_job_equals_a_torchrun_job(cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    slurm_out, torchrun_out = tmp_path / "slurm-run", tmp_path / "torchrun-run"

    # The plain torchrun job runs while sbatch waits: sbatch --wait polls the job every few seconds.
    with _running(torchrun_cmd(["--standalone", "--nproc_per_node=2"], overrides(torchrun_out, **TINY))) as plain:
        job_id, rc, text = _sbatch(cluster, job_dir, overrides(slurm_out, **TINY))
        plain_rc, plain_text = finish(plain, timeout=300)
    assert plain_rc == 0, plain_text[-4000:]

    output = job_dir / f"nin-dist-{job_id}.out"
    job_log = output.read_text(errors="replace") if job_id.isdigit() and output.exists() else "(no job output)"
    assert rc == 0 and job_id.isdigit(), f"sbatch exited {rc}: {text}\n{job_log[-4000:]}\n{cluster.logs()}"
    job = cluster.command("scontrol", "show", "job", job_id)
    assert "JobState=COMPLETED" in job and "ExitCode=0:0" in job and f"NodeList={NODE}" in job, job
    assert "world size 2" in job_log, job_log[-4000:]

    slurm_metrics = json.loads((slurm_out / "metrics.json").read_text())
    torchrun_metrics = json.loads((torchrun_out / "metrics.json").read_text())
    assert slurm_metrics["world_size"] == torchrun_metrics["world_size"] == 2
    slurm_state, torchrun_state = last_checkpoint(slurm_out), last_checkpoint(torchrun_out)
    assert slurm_state[ckpt.STEP] == torchrun_state[ckpt.STEP] == 4
    # Two ranks sum in one order whoever starts them: the same bits, not merely close.
    assert_bit_identical(slurm_state[ckpt.MODEL], torchrun_state[ckpt.MODEL])
    assert slurm_metrics["test_acc"] == torchrun_metrics["test_acc"]


def test_the_header_s_request_is_refused_on_a_cpu_node_and_the_documented_flags_fit(cluster, tmp_path):
    """What the header and README say: a plain sbatch asks for GPUs this node lacks; the flags they give fit it."""
    def test_only(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sbatch", "--test-only", f"--chdir={tmp_path}", *flags, str(SCRIPT)], env=cluster.env,
                              capture_output=True, text=True, timeout=30)

    plain = test_only()
    assert plain.returncode != 0 and "Invalid generic resource (gres) specification" in plain.stderr, plain.stderr
    sized = test_only(*_cpu_node_flags(cluster))
    assert sized.returncode == 0 and "to start at" in sized.stderr and f"on nodes {NODE}" in sized.stderr, sized.stderr


def test_sweep_array_of_two_tasks_ends_one_study(cluster, tmp_path):
    """launch/sweep.sbatch with two array tasks, each a worker of one study (the default journal file in the
    sweep folder: one node): exactly the trials asked for, one parent run, FINISHED."""
    import optuna
    from mlflow import MlflowClient
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    config = tmp_path / "cfg.yaml"
    config.write_text((REPO / "configs" / "cpu.yaml").read_text() +
                      "sweep:\n  optim.lr: {type: float, low: 0.01, high: 0.1, log: true}\n")
    tiny = ["data.train_limit=128", "data.val_size=64", "data.test_limit=64", "train.epochs=1", "train.batch_size=64",
            "model.width=0.25", "train.progress=false", "train.threads=1", "tracking.system_metrics=false",
            "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.out_dir={tmp_path}/sweep"]
    cmd = ["sbatch", "--parsable", "--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1",
           f"--chdir={tmp_path}", f"--output={tmp_path}/%x-%A_%a.out", str(REPO / "launch" / "sweep.sbatch"),
           "--config", str(config), "--trials", "2", "--study", "array", *tiny]
    rc, text = run(cmd, env=env(SLURM_CONF=str(cluster.conf)), timeout=60)
    assert rc == 0, f"sbatch exited {rc}: {text}\n{cluster.logs()}"
    job_id = text.split()[0].split(";")[0]
    deadline = time.monotonic() + 300  # polled here: sbatch --wait sleeps up to 30 s between its own looks
    while cluster.command("squeue", "--noheader", f"--jobs={job_id}").strip():
        assert time.monotonic() < deadline, cluster.command("squeue")
        time.sleep(0.5)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("nin-sweep-*.out"))
    job = cluster.command("scontrol", "show", "job", job_id)
    assert job.count("JobState=COMPLETED") == 2 and job.count("ExitCode=0:0") == 2, f"{job}\n{logs}"  # two tasks

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "sweep" / "optuna.journal")))
    study = optuna.load_study(study_name="array", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2, logs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and len(runs) == 3, [(r.info.run_name, r.info.status) for r in runs]
