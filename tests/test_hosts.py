"""Hosts that come and go: two real hosts, a lost one found in seconds, a job that shrinks and grows.

Each host is a Linux network namespace with one 10.x address on a veth pair whose other end is a
port of a bridge in a third namespace (the switch). The addresses exist only inside these
namespaces: no packet leaves them. Each host resolves the other's name through a hosts file of its
own (`ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts). On each host `launch/multinode.sh`
runs one process of an elastic job (NNODES=1:2, the c10d rendezvous on host A, which stays up), fp64
and tiny (200 steps of 16 images, a checkpoint every 5 steps). Two jobs cover the three faults:

- (a) every process of host B is SIGKILLed after a checkpoint: A finds the closed connection at
  once and trains on alone; then (c) B is started again and the job grows back to two hosts. The
  job is tracked in MLflow: one run, FINISHED, the world size over steps going 2, 1, 2. Its
  RDZV_ENDPOINT is host A's name, and LOCAL_ADDR each host's address: A hosts the rendezvous.
- (b) B's port on the switch goes down: A finds the silent peer after `train.dist_timeout_s` and
  trains on alone; on B, multinode.sh ends B's processes after CUT_OFF_S.

Each restart resumes from the checkpoint that was the newest at the fault (so at most
train.checkpoint_every steps are redone), and both jobs end on the weights of one uninterrupted
process (fp64, relative difference <= 1e-9): the world's size never changes what is computed. The
seconds from each fault until training runs again are printed (visible with pytest -s).

Needs root (network namespaces); skipped otherwise, saying why. Everything started is killed and the
namespaces deleted at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    REPO,
    env,
    last_checkpoint,
    local_rank,
    max_rel_diff,
    newest_checkpoint,
    overrides,
    train_in_process,
)

from nin_dist import checkpoint as ckpt

MULTINODE = REPO / "launch" / "multinode.sh"
NAME = f"nin{os.getpid()}"  # namespace names: unique per test process, so parallel workers never meet
SUBNET = "10.77.0"  # inside the namespaces only
RDZV_PORT = 29400
STEPS, CHECKPOINT_EVERY, FAULT_AFTER = 200, 5, 10  # steps in all, between checkpoints, before a fault
# cpu.yaml (BatchNorm, Nesterov, one-cycle) at a tenth of the seed's widths, dropout on, fp64.
RUN = {"data__train_limit": 16 * STEPS, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 1,
       "train__precision": "fp64", "model__width": 0.1, "model__dropout": 0.1,
       "train__checkpoint_every": CHECKPOINT_EVERY}
# Rendezvous: a host that stops its heartbeats (every second) is dropped after 3 s; a round waits 3 s
# for more hosts once one is in.
RDZV_CONF = "keep_alive_interval=1,last_call_timeout=3"
DIST_TIMEOUT_S = 10  # the link-cut job's train.dist_timeout_s (default 120): how long a silent peer takes to find
CUT_OFF_S = 10  # the link-cut job's CUT_OFF_S (default 120)
REL_TOL = 1e-9
NETNS_ETC = Path("/etc/netns")  # ip netns exec mounts NETNS_ETC/NS/hosts over /etc/hosts inside namespace NS


def ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Node:
    """One `launch/multinode.sh` on a host; its output is read as it comes, each line with its arrival time."""

    def __init__(self, host: Host, args: list[str], cwd: Path, endpoint: str, **variables: str):
        node_env = env(NNODES="1:2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, LOCAL_ADDR=host.addr,
                       GLOO_SOCKET_IFNAME="eth0", RDZV_CONF=RDZV_CONF, LOGLEVEL="INFO", **variables)
        node_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), node_env.get("PYTHONPATH")]))
        self.host, self.lines, self._lock = host, [], threading.Lock()
        self.log = cwd / f"host-{host.name}.log"
        # cwd: MLflow's sqlite store puts artifacts in ./mlruns of the process that logs them.
        self.proc = subprocess.Popen(["ip", "netns", "exec", host.ns, "bash", str(MULTINODE), *args], cwd=cwd,
                                     env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "a") as log:  # kept with the test's files: pytest shows only a failure's tail
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._lock:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def tail(self, chars: int = 5000) -> str:
        return f"--- host {self.host.name}:\n{self.text[-chars:]}"

    def wait_for(self, pattern: str, since: float, timeout: float) -> tuple[float, re.Match]:
        """The arrival time and match of the first line after `since` that matches `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for seen, line in self.lines:
                    if seen >= since and (found := re.search(pattern, line)):
                        return seen, found
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                pytest.fail(f"host {self.host.name}: no line matching {pattern!r} within {timeout} s\n{self.tail()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"host {self.host.name}: multinode.sh still running after {timeout} s\n{self.tail()}")


class Host:
    """A network namespace with one address, on one port of the switch's bridge."""

    def __init__(self, name: str, addr: str):
        self.name, self.addr, self.ns, self.port = name, addr, f"{NAME}-{name}", f"port-{name}"
        self.hostname = f"host-{name}.{NAME}"  # in the hosts files of the namespaces only

    def start(self, args: list[str], cwd: Path, endpoint: str = f"{SUBNET}.1:{RDZV_PORT}", **variables: str) -> Node:
        return Node(self, args, cwd, endpoint, **variables)

    def pids(self) -> list[int]:
        return [int(pid) for pid in ip("netns", "pids", self.ns).split()]

    def kill_all(self, timeout: float = 10) -> None:
        """SIGKILL every process of the host, again until none is left (torchrun might start one meanwhile)."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def worker(self) -> int:
        """The pid of this host's training process (torchrun's worker: it has a LOCAL_RANK)."""
        workers = [pid for pid in self.pids() if local_rank(pid) is not None]
        assert len(workers) == 1, workers
        return workers[0]


class Network:
    """Hosts a and b, each on a veth pair to the bridge in the switch namespace."""

    def __init__(self):
        self.switch = f"{NAME}-switch"
        self.a, self.b = Host("a", f"{SUBNET}.1"), Host("b", f"{SUBNET}.2")
        self.hosts = (self.a, self.b)

    def build(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            ip("netns", "add", host.ns)
            # Made inside the namespaces: no interface name is taken in the machine's own namespace.
            ip("link", "add", "name", "eth0", "netns", host.ns, "type", "veth", "peer", "name", host.port,
               "netns", self.switch)
            ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            ip("-n", host.ns, "link", "set", "lo", "up")
        names = "".join(f"{host.addr} {host.hostname}\n" for host in self.hosts)
        for host in self.hosts:
            (NETNS_ETC / host.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.ns / "hosts").write_text(f"127.0.0.1 localhost\n{names}")

    def cut(self, host: Host, up: bool = False) -> None:
        """Unplug (or plug back) the host's cable at the switch: its own interface stays up, packets are lost."""
        ip("-n", self.switch, "link", "set", host.port, "up" if up else "down")

    def stop_all(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(RuntimeError):
                host.kill_all()

    def tear_down(self) -> None:
        """Kill every process in the namespaces, then delete them (their interfaces go with them); each
        step is tried even when one before it failed, and the first failure is raised at the end."""
        existing, failures = ip("netns", "list").split(), []
        for host in self.hosts:
            if host.ns in existing:
                for step in (host.kill_all, lambda ns=host.ns: ip("netns", "del", ns)):
                    try:
                        step()
                    except (OSError, RuntimeError) as err:
                        failures.append(err)
        if self.switch in existing:
            try:
                ip("netns", "del", self.switch)
            except (OSError, RuntimeError) as err:
                failures.append(err)
        for host in self.hosts:
            shutil.rmtree(NETNS_ETC / host.ns, ignore_errors=True)
        with contextlib.suppress(OSError):  # the folder, where no other namespace has files in it
            NETNS_ETC.rmdir()
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("needs root: the hosts are network namespaces made with ip netns")
    with built(Network()) as network:
        yield network


@contextlib.contextmanager
def built(network: Network) -> Iterator[Network]:
    """`network` built for the block and torn down after it; the test skips where it cannot be built."""
    try:
        network.build()
    except (OSError, RuntimeError) as err:  # no ip, or no right to make namespaces here
        with contextlib.suppress(OSError, RuntimeError):
            network.tear_down()
        pytest.skip(f"cannot make network namespaces here: {err}")
    try:
        yield network
    finally:
        network.tear_down()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The weights of one uninterrupted process: what every job here must end on."""
    out = tmp_path_factory.mktemp("one-process")
    assert train_in_process(overrides(out, **RUN)) == 0
    return last_checkpoint(out)[ckpt.MODEL]


def running(*nodes: Node):
    """A check that the nodes' launch scripts still run."""
    def check() -> None:
        for node in nodes:
            assert node.proc.poll() is None, node.tail()
    return check


def newest_when_ended(out: Path, worker: int, timeout: float) -> int:
    """The step of `out`'s newest checkpoint once the training process `worker` has ended: that
    attempt saves nothing more, and the next one resumes from it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(worker).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() < deadline, f"the worker {worker} still runs after {timeout} s"
        time.sleep(0.02)
    return last_checkpoint(out)[ckpt.STEP]


def two_hosts_trained(out: Path, a: Node, b: Node) -> int:
    """The step of a checkpoint saved by both hosts together, at least FAULT_AFTER. (B may come too late
    for the first round; A then starts alone and restarts when B arrives.)"""
    _, first = a.wait_for(r"training: step (\d+) done in a world of 2", since=0, timeout=180)
    return newest_checkpoint(out, max(FAULT_AFTER, int(first[1]) - 1 + CHECKPOINT_EVERY), 120, running(a, b))


def when_gone(host: Host, node: Node, since: float) -> dict[str, float]:
    """Watch, in a thread, for the moment no process is left on `host`; the dict gets it as "seconds"."""
    found: dict[str, float] = {}

    def watch() -> None:
        while node.proc.poll() is None or host.pids():
            if time.monotonic() - since > 300:
                return
            time.sleep(0.1)
        found["seconds"] = time.monotonic() - since

    threading.Thread(target=watch, daemon=True).start()
    return found


def assert_lands_on_one_process(out: Path, reference: dict, what: str) -> None:
    """The job's final weights are one uninterrupted process's (fp64, REL_TOL); the difference is printed."""
    final = last_checkpoint(out)
    assert final[ckpt.STEP] == STEPS
    diff = max_rel_diff(final[ckpt.MODEL], reference)
    print(f"\n{what} vs one process, fp64: max relative parameter difference {diff[0]:.2e} ({diff[1]})")
    assert diff[0] <= REL_TOL, diff


def compressed(values: list[float]) -> list[float]:
    """The values with each run of equal neighbours kept once: [2, 2, 1, 2, 2] -> [2, 1, 2]."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def report(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.1f} s")


@pytest.mark.slow
def test_a_host_killed_and_started_again_shrinks_and_grows_the_job_onto_the_same_weights(net, reference, tmp_path):
    out = tmp_path / "run"
    tracking = {"tracking__enabled": True, "tracking__uri": f"sqlite:///{tmp_path}/mlflow.db",
                "tracking__system_metrics": False, "tracking__log_model": False}
    args = overrides(out, **RUN, **tracking)
    # The rendezvous by host A's name, each host's LOCAL_ADDR an address: A must see that it hosts it.
    job = {"RDZV_ID": f"{NAME}-kill", "endpoint": f"{net.a.hostname}:{RDZV_PORT}"}
    a, b = net.a.start(args, tmp_path, **job), net.b.start(args, tmp_path, **job)
    try:
        step = two_hosts_trained(out, a, b)
        print()
        for node, says in ((a, "this node hosts the rendezvous"), (b, "this node joins the rendezvous")):
            _, line = node.wait_for(rf"multinode.sh: {says} .*", since=0, timeout=1)
            print(f"host {node.host.name}: {line[0]}")
        assert f"LOCAL_ADDR={net.a.addr} is {net.a.hostname}" in a.text, a.tail()

        # (a) Host B gone at once, every process of it: A's all-reduce fails, A trains on alone. The
        # newest checkpoint at the fault is the one seen before it, or one that A's step in flight
        # saved (its all-reduce done before the kill): known once A's worker has ended.
        worker = net.a.worker()
        fault = time.monotonic()
        net.b.kill_all()
        at_fault = newest_when_ended(out, worker, timeout=120)
        _, resumed = a.wait_for(r"resuming from .* step (\d+)", since=fault, timeout=120)
        assert step <= at_fault == int(resumed[1]), (at_fault, a.tail())
        alone, _ = a.wait_for(r"training: step \d+ done in a world of 1 on 1 node \(restart 1\)", since=fault,
                              timeout=120)
        report("(a) every process of host B SIGKILLed -> A trains again, alone", alone - fault)

        # (c) B comes back once A has saved a checkpoint of its own. A's worker is held still meanwhile
        # (SIGSTOP), so the test does not race B's start-up against the steps A has left.
        saved = newest_checkpoint(out, step + CHECKPOINT_EVERY, 120, running(a))
        worker = net.a.worker()
        os.kill(worker, signal.SIGSTOP)
        back = time.monotonic()
        b = net.b.start(args, tmp_path, **job)
        a.wait_for(r"Detected 1 new nodes", since=back, timeout=120)  # A's torchrun restarts its workers
        os.kill(worker, signal.SIGCONT)
        at_return = newest_when_ended(out, worker, timeout=120)
        _, regrown = a.wait_for(r"resuming from .* step (\d+)", since=back, timeout=120)
        assert saved <= at_return == int(regrown[1]), (at_return, a.tail())
        grown, _ = a.wait_for(r"training: step \d+ done in a world of 2 on 2 nodes", since=back, timeout=120)
        report("(c) host B started again -> the job trains again on both hosts", grown - back)

        assert a.wait(timeout=180) == 0, a.tail()
        assert b.wait(timeout=60) == 0, b.tail()
    finally:
        net.stop_all()

    assert_lands_on_one_process(out, reference, "shrink 2 -> 1 and grow 1 -> 2")

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one job, one run, through both restarts
    run = runs[0]
    assert run.info.status == "FINISHED"

    def history(key: str) -> list[tuple[int, float]]:
        """(step, value) in the order logged."""
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                  key=lambda m: (m.step, m.timestamp))]

    def changes(points: list[tuple[int, float]]) -> str:
        return ", ".join(f"{value:g} from step {step}" for i, (step, value) in enumerate(points)
                         if i == 0 or value != points[i - 1][1])

    print(f"\nMLflow run {run.info.run_id}: {run.info.status}; dist/world_size {changes(history('dist/world_size'))}; "
          f"dist/restarts {changes(history('dist/restarts'))}")
    worlds = [value for _, value in history("dist/world_size")]
    restarts = [value for _, value in history("dist/restarts")]
    assert compressed(worlds)[-3:] == [2, 1, 2]  # (a world of 1 before them: B late for the first round)
    assert compressed(restarts) == [0, 1]  # the loss of B is a failure; B's return (or late arrival) is not


@pytest.mark.slow
def test_a_host_cut_off_is_found_within_the_timeout_and_ends_its_own_processes(net, reference, tmp_path):
    out = tmp_path / "run"
    args = overrides(out, **RUN, train__dist_timeout_s=DIST_TIMEOUT_S)
    job = {"RDZV_ID": f"{NAME}-cut", "CUT_OFF_S": str(CUT_OFF_S)}
    a, b = net.a.start(args, tmp_path, **job), net.b.start(args, tmp_path, **job)
    try:
        step = two_hosts_trained(out, a, b)

        # (b) B's cable pulled: nothing tells A, whose all-reduce waits out train.dist_timeout_s.
        worker = net.a.worker()
        cut = time.monotonic()
        net.cut(net.b)
        b_gone = when_gone(net.b, b, since=cut)
        at_fault = newest_when_ended(out, worker, timeout=DIST_TIMEOUT_S + 120)
        _, resumed = a.wait_for(r"resuming from .* step (\d+)", since=cut, timeout=DIST_TIMEOUT_S + 120)
        assert step <= at_fault == int(resumed[1]), (at_fault, a.tail())
        alone, _ = a.wait_for(r"training: step \d+ done in a world of 1 on 1 node", since=cut,
                              timeout=DIST_TIMEOUT_S + 120)
        report(f"(b) host B's link cut -> A trains again, alone (train.dist_timeout_s={DIST_TIMEOUT_S})",
               alone - cut)

        # On B, cut off: multinode.sh ends torchrun and the worker itself, well within 5 minutes.
        assert b.wait(timeout=300 - (time.monotonic() - cut)) == 1, b.tail()
        deadline = cut + 300
        while "seconds" not in b_gone and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "seconds" in b_gone, (net.b.pids(), b.tail())
        report(f"(b) host B's link cut -> no process left on B (CUT_OFF_S={CUT_OFF_S})", b_gone["seconds"])
        assert re.search(rf"multinode.sh: error: the rendezvous {SUBNET}.1:{RDZV_PORT} was unreachable", b.text), \
            b.tail()

        assert a.wait(timeout=180) == 0, a.tail()
    finally:
        net.stop_all()
        net.cut(net.b, up=True)

    assert_lands_on_one_process(out, reference, "shrink 2 -> 1 (link cut)")
