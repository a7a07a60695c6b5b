"""A sweep over two hosts that loses one: two network namespaces (10.x addresses inside them only, as
tests/test_hosts.py makes them), PostgreSQL and an MLflow server on PostgreSQL both served from host
A, one nin-sweep worker on each host. Host B is lost (every process in it SIGKILLed) while its trial
trains, past its first checkpoint. Then:

- A takes B's trial over after the grace period and resumes it from that checkpoint;
- the study ends with exactly N trials, all COMPLETE;
- the taken-over trial's final weights equal those of the same trial run without a fault (fp64);
- one parent run, FINISHED, with N children, each ended; @best on the best trial;
- neither the database's nor the tracking server's password is in any process's argv on either host
  (read at the fault) or in any file of the sweep folder.

The numbers the test measured (grace period, seconds until B's trial trained again on A, the weights'
largest relative difference, the trials and the runs) are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers import CPU_CONFIG, env, last_checkpoint, max_rel_diff
from mlflow_server import SCRIPT, free_port
from postgres import PASSWORD, Postgres, binaries

pytestmark = pytest.mark.slow

TRIALS = 2
GRACE_S = 5
TRACKING_PASSWORD = "mlflow-9b2e-secret"  # in the tracking URI the workers get (the server takes any)
TINY = ["data.train_limit=512", "data.val_size=128", "data.test_limit=100", "train.epochs=2", "train.batch_size=64",
        "model.width=0.25", "train.precision=fp64", "optim.schedule=constant", "optim.warmup_epochs=0",
        "train.progress=false", "train.threads=1", "tracking.system_metrics=false"]
CHECK = """
import json, os, optuna
from mlflow import MlflowClient
study = optuna.load_study(study_name="hosts", storage=os.environ["NIN_SWEEP_STORAGE"])
client = MlflowClient(os.environ["CHECK_URI"])
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
best = client.get_model_version_by_alias("nin-hosts", "best")
print(json.dumps({
    "trials": [[t.number, t.state.name, t.value, t.params, t.user_attrs.get("mlflow_run_id"),
                t.system_attrs.get("nin.worker")] for t in study.trials],
    "best_trial": study.best_trial.number, "parent_run_id": study.user_attrs["parent_run_id"],
    "runs": [[r.info.run_name, r.info.run_id, r.info.status, r.data.tags.get("mlflow.parentRunId"),
              r.data.metrics.get("val/acc")] for r in runs],
    "alias_best": [best.version, best.run_id]}))
"""


def in_ns(host, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", host.ns, *cmd]


@pytest.fixture(scope="module")
def hosts():
    """Hosts sa and sb on a switch of their own (tests/test_hosts.py's Network, other names)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the hosts are network namespaces made with ip netns")
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    from test_hosts import Host, Network, built

    network = Network()
    network.switch = network.switch.replace("-switch", "-sweepsw")
    network.a, network.b = Host("sa", network.a.addr), Host("sb", network.b.addr)
    network.hosts = (network.a, network.b)
    with built(network):
        yield network


def _mlflow_server(host, root: Path, backend: str) -> tuple[subprocess.Popen, str]:
    """launch/mlflow-server.sh on host A, its store in PostgreSQL (the password from PGPASSWORD)."""
    port = free_port()
    uri = f"http://{host.addr}:{port}"
    variables = env(HOST=host.addr, PORT=str(port), WORKERS="1", BACKEND=backend, ARTIFACTS=str(root / "artifacts"),
                    PGPASSWORD=PASSWORD, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(in_ns(host, ["bash", str(SCRIPT)]), cwd=root, env=variables, start_new_session=True,
                            stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT)
    wait = ("import time, urllib.request\nfor _ in range(1200):\n    try:\n        urllib.request.urlopen("
            f"'{uri}/health', timeout=1); break\n    except Exception: time.sleep(0.25)\nelse: raise SystemExit(1)")
    up = subprocess.run(in_ns(host, [sys.executable, "-c", wait]), timeout=400)
    assert up.returncode == 0 and proc.poll() is None, (root / "server.log").read_text()[-3000:]
    return proc, uri


def _trial_of(host) -> int | None:
    """The number of the trial whose nin-train runs on `host`, from its command line."""
    for pid in host.pids():
        with contextlib.suppress(OSError):
            found = re.search(rb"run\.name=trial-(\d+)", Path(f"/proc/{pid}/cmdline").read_bytes())
            if found:
                return int(found.group(1))
    return None


def _argv_of(hosts) -> list[bytes]:
    out = []
    for host in hosts.hosts:
        for pid in host.pids():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return out


def _log_time(line: str, day: datetime) -> float:
    """The epoch seconds of a log line's leading HH:MM:SS (the machine's local time, on `day`)."""
    hms = datetime.strptime(line[:8], "%H:%M:%S")
    return day.replace(hour=hms.hour, minute=hms.minute, second=hms.second, microsecond=0).timestamp()


def test_a_host_lost_mid_trial_is_taken_over_on_the_other_from_its_checkpoint(hosts, tmp_path):
    a, b = hosts.a, hosts.b
    os.chmod(tmp_path, 0o755)  # the postgres user reads nothing here, but the server's cwd must be enterable
    pg = Postgres(a.addr, free_port(), prefix=("ip", "netns", "exec", a.ns))
    procs: list[subprocess.Popen] = []
    try:
        pg.start()
        storage, backend = pg.create_db("optuna"), pg.create_db("mlflow")
        server, uri = _mlflow_server(a, tmp_path, backend)
        procs.append(server)
        config = tmp_path / "cfg.yaml"
        config.write_text(CPU_CONFIG.read_text() + "sweep:\n  optim.lr: {type: float, low: 0.01, high: 0.1}\n")
        folder = tmp_path / "sweep"
        cmd = [sys.executable, "-m", "nin_dist.sweep", "--config", str(config), "--trials", str(TRIALS), "--study",
               "hosts", "--seed", "3", "--startup-trials", str(TRIALS + 1), "--workers", "1", "--heartbeat", "1",
               "--grace", str(GRACE_S), "--register", "nin-hosts", *TINY, f"run.out_dir={folder}"]
        # Every secret in the environment: the storage URL has no password (PGPASSWORD has it), the tracking
        # URI has one.
        secrets = env(NIN_SWEEP_STORAGE=storage, PGPASSWORD=PASSWORD,
                      MLFLOW_TRACKING_URI=uri.replace("http://", f"http://nin:{TRACKING_PASSWORD}@"))
        logs = {host.name: open(tmp_path / f"worker-{host.name}.log", "ab") for host in (a, b)}
        for host in (a, b):
            procs.append(subprocess.Popen(in_ns(host, cmd), cwd=tmp_path, env=secrets, start_new_session=True,
                                          stdout=logs[host.name], stderr=subprocess.STDOUT))
        worker_a = procs[1]

        deadline, number = time.monotonic() + 400, None
        while True:  # B's trial past its first checkpoint
            assert time.monotonic() < deadline and worker_a.poll() is None and procs[2].poll() is None, \
                (tmp_path / "worker-sb.log").read_text()[-3000:] + (tmp_path / "worker-sa.log").read_text()[-3000:]
            number = _trial_of(b)
            last = folder / f"trial-{number}" / "checkpoints" / "last.pt"
            if number is not None and last.exists() and last_checkpoint(last.parents[1])["step"] > 0:
                break
            time.sleep(0.2)
        argv = _argv_of(hosts)  # ps at the fault: both hosts, every process
        step_at_fault = last_checkpoint(last.parents[1])["step"]
        b.kill_all()
        killed_at = time.time()
        # The same trial without a fault, from the config it ran with, while A goes on.
        reference = subprocess.Popen([sys.executable, "-m", "nin_dist.train", "--config",
                                      str(folder / f"trial-{number}" / "config.yaml"), f"run.out_dir={tmp_path}/ref",
                                      "tracking.enabled=false", "run.resume=false"], cwd=tmp_path, env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert worker_a.wait(timeout=600) == 0, (tmp_path / "worker-sa.log").read_text()[-5000:]
        ref_out = reference.communicate(timeout=300)[0]
        assert reference.returncode == 0, ref_out[-3000:]

        check = subprocess.run(in_ns(a, [sys.executable, "-c", CHECK]), env=secrets | {"CHECK_URI": uri},
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stderr[-3000:]
        seen = json.loads(check.stdout.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pg.stop()

    worker_log = (tmp_path / "worker-sa.log").read_text()
    assert f"trial {number} of worker " in worker_log and "taking it over" in worker_log, worker_log[-3000:]
    trial_log = (folder / f"trial-{number}.log").read_text()
    resumed = [line for line in trial_log.splitlines() if "resuming from" in line]
    assert resumed and f"step {step_at_fault}" in resumed[-1], trial_log[-3000:]  # the checkpoint at the fault
    again_s = _log_time(resumed[-1], datetime.fromtimestamp(killed_at)) - killed_at

    trials = seen["trials"]
    assert [t[1] for t in trials] == ["COMPLETE"] * TRIALS, trials
    assert trials[number][5].split(":")[0] == trials[(number + 1) % TRIALS][5].split(":")[0]  # ended on A's host

    worst, where = max_rel_diff(torch.load(folder / f"trial-{number}" / "checkpoints" / "last.pt",
                                           weights_only=True)["model"], last_checkpoint(tmp_path / "ref")["model"])
    assert worst < 1e-9, (worst, where)

    runs = seen["runs"]
    parents = [r for r in runs if r[3] is None]
    assert [p[1] for p in parents] == [seen["parent_run_id"]] and parents[0][2] == "FINISHED", runs
    children = [r for r in runs if r[3] == seen["parent_run_id"]]
    assert sorted(r[0] for r in children) == [f"trial-{n}" for n in range(TRIALS)], runs
    assert all(r[2] == "FINISHED" for r in children), runs
    assert [r[1] for r in children if r[0] == f"trial-{number}"] == [trials[number][4]]  # one run, taken over
    assert seen["alias_best"][1] == trials[seen["best_trial"]][4]  # @best on the best trial's run

    for secret in (PASSWORD, TRACKING_PASSWORD):
        assert not [line for line in argv if secret.encode() in line], "a password in ps"
        assert not [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    print(f"\nsweep over two hosts: grace {GRACE_S} s; B's trial {number} trained again on A {again_s:.0f} s after "
          f"the fault, from step {step_at_fault}; weights' largest relative difference {worst:.3g} ({where})")
    print("trials:", [(t[0], t[1], round(t[2], 4), t[5]) for t in trials])
    print("runs (name, status, parent, val/acc):", [(r[0], r[2], r[3], r[4]) for r in runs])
    print("@best: version", seen["alias_best"][0], "run", seen["alias_best"][1])
