"""One node's torchrun, supervised: what `launch/multinode.sh` runs in its place.

    python -m nin_dist.node_supervisor --host HOST --port PORT --cut-off-s SECONDS -- torchrun ARGS...

A node cut off from the network hangs: its workers wait out `train.dist_timeout_s`, and its torchrun
blocks in a call to the unreachable rendezvous store (its heartbeat holds a lock that the monitoring
loop waits for) until TCP gives up, many minutes later; it does not even notice that its workers
have ended. Only something outside torchrun can end it, so this process, which starts it, watches:
once the rendezvous has answered, `--cut-off-s` seconds without reaching it end torchrun and every
process under it with SIGKILL, and this process exits 1. It says once, at the start, whether the
watch is armed.

"Every process under it" holds however deep and however late they start, because this process is
a child subreaper (Linux `PR_SET_CHILD_SUBREAPER`): a worker whose torchrun has died is re-parented
here, not to init, so `psutil.Process().children(recursive=True)` still finds it, and torchrun is
killed first, so no restart starts a worker after the list is read. (SIGTERM would not do: torchrun
takes it only between its store calls, and its workers run in sessions of their own.)

The other way round, torchrun must not outlive this process: it gets SIGTERM when this process dies,
even by SIGKILL (`PR_SET_PDEATHSIG`; SLURM and Kubernetes escalate to SIGKILL), and stops its workers
as on any SIGTERM. SIGTERM, SIGINT and SIGHUP sent to this process are passed on to torchrun, which
runs in a process group of its own so that a terminal's Ctrl-C reaches it once, through here.
Exit code: torchrun's (128 + the signal that ended it), 1 when this node was cut off, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

PROG = "multinode.sh"  # the command the user ran: messages carry its name
PROBE_S = 2.0  # seconds between probes of the rendezvous, and each one's limit
POLL_S = 0.2  # how often torchrun's exit is looked for
END_WITHIN_S = 10.0  # processes still left after this long are named, not waited for
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # looked up here, not in a forked child


def _prctl(option: int, value: int) -> bool:
    """prctl(2); False where there is none (not Linux) or it fails."""
    return _PRCTL is not None and _PRCTL(option, value, 0, 0, 0) == 0


def _in_agent_before_exec(parent: int) -> None:
    """In torchrun's process, between fork and exec: its own process group, and SIGTERM when we die."""
    os.setpgid(0, 0)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # we died before the line above took effect
        os._exit(128 + signal.SIGTERM)


class RendezvousWatch:
    """Whether this node is cut off: the rendezvous answered once, then not for `cut_off_s` seconds."""

    def __init__(self, host: str, port: int, cut_off_s: float):
        self.host, self.port, self.cut_off_s = host, port, cut_off_s
        self.addresses: list[tuple] = []  # resolved once, when first possible: no name lookup on a cut-off node
        self.last_reached: float | None = None
        self.next_probe = 0.0

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _reachable(self) -> bool:
        """A TCP connection to the rendezvous store, opened and closed."""
        if not self.addresses:
            with contextlib.suppress(OSError):
                self.addresses = [info[4] for info in socket.getaddrinfo(self.host, self.port,
                                                                         type=socket.SOCK_STREAM)]
        for address in self.addresses:
            family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(PROBE_S)
                sock.connect(address)
                return True
        return False

    def silent_for(self) -> float | None:
        """Seconds the rendezvous has not answered, once that is `cut_off_s` or more; else None."""
        now = time.monotonic()
        if self.cut_off_s <= 0 or now < self.next_probe:
            return None
        self.next_probe = now + PROBE_S
        if self._reachable():
            self.last_reached = time.monotonic()
        elif self.last_reached is not None and now - self.last_reached >= self.cut_off_s:
            return now - self.last_reached
        return None


def end_all(agent: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun, then every process below this one until none is left; the pids still there
    after END_WITHIN_S (none, unless the kernel cannot end them)."""
    agent.kill()  # first: a torchrun that is gone restarts no worker after the list below is read
    agent.wait()
    me, deadline = psutil.Process(), time.monotonic() + END_WITHIN_S
    while True:
        left = [p for p in me.children(recursive=True) if _alive(p)]
        if not left or time.monotonic() > deadline:
            return [p.pid for p in left]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _reap(agent)
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(agent: subprocess.Popen) -> None:
    """Collect the exit of every orphan re-parented here (we are their subreaper), so none stays a
    zombie for the job's life; torchrun's own exit is left to `agent`, which reads its code."""
    for child in psutil.Process().children():
        if child.pid != agent.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, os.WNOHANG)


def say(message: str) -> None:
    # One write of the whole line: print's message and newline are two writes on an unbuffered stderr
    # (PYTHONUNBUFFERED), and torchrun's own output, on the same pipe, could land between them.
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def supervise(cmd: list[str], watch: RendezvousWatch) -> int:
    subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    parent = os.getpid()
    # Said before torchrun starts, so the line stands apart from torchrun's output.
    if watch.cut_off_s <= 0:
        say(f"the watch is off (CUT_OFF_S=0): if this node is cut off from {watch.endpoint}, torchrun may hang "
            "for many minutes")
    else:
        say(f"the watch is armed: once the rendezvous {watch.endpoint} has answered, {watch.cut_off_s:g} s "
            f"without reaching it end this node's torchrun and workers (probed every {PROBE_S:g} s)"
            + ("" if subreaper else "; no child subreaper here (not Linux): workers whose torchrun died may "
               "be missed"))
    # The handlers go in before torchrun starts: a signal that lands while it starts (it may already
    # be printing) is kept and passed on once it runs, instead of ending this process by default.
    received: list[int] = []
    agent: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        if agent is None:
            received.append(signum)
        else:
            agent.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    agent = subprocess.Popen(cmd, preexec_fn=lambda: _in_agent_before_exec(parent))  # noqa: PLW1509 (one thread)
    for signum in received:
        agent.send_signal(signum)
    next_reap = 0.0
    while agent.poll() is None:
        if time.monotonic() >= next_reap:
            next_reap = time.monotonic() + PROBE_S
            _reap(agent)
        silent = watch.silent_for()
        if silent is not None:
            say(f"error: the rendezvous {watch.endpoint} was unreachable for {silent:.0f} s "
                f"(CUT_OFF_S={watch.cut_off_s:g}); this node left the job: torchrun (pid {agent.pid}) and its "
                "workers ended")
            if left := end_all(agent):
                say(f"error: processes {left} did not end within {END_WITHIN_S:g} s of SIGKILL")
            return 1
        time.sleep(POLL_S)  # a forwarded signal is passed on at once: its handler runs during the sleep
    code = agent.returncode
    if left := [p.pid for p in psutil.Process().children(recursive=True) if _alive(p)]:
        say(f"torchrun exited ({code}) leaving processes {left}: ending them")
        end_all(agent)
    return 128 - code if code < 0 else code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nin_dist.node_supervisor", description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True, help="the rendezvous host (a name or an address)")
    parser.add_argument("--port", type=int, required=True, help="the rendezvous port")
    parser.add_argument("--cut-off-s", type=float, default=120.0,
                        help="seconds without reaching the rendezvous (once it has answered) that end this node; "
                             "0 = never")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- torchrun ARGS...")
    args = parser.parse_args(argv)
    args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not args.cmd:
        parser.error("no command to run after --")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return supervise(args.cmd, RendezvousWatch(args.host, args.port, args.cut_off_s))


if __name__ == "__main__":
    sys.exit(main())
