"""A real browser for the tests: Debian's headless Chromium, installed with apt when missing.

`render` loads a page the way a user's browser does (JavaScript, XHR to the server and all) and
returns the text a person would read on it, one string per text node, in page order. It uses
`chromium --headless --dump-dom` with a virtual-time budget: Chromium runs the page's timers on a
virtual clock that stands still while a network fetch is pending, so a single-page app has fetched
and drawn its data by the time the budget is spent, however slow the machine. Each Chromium gets a
profile and a home folder of its own under the test's tmp folder, and its whole process group is
killed when it returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

PACKAGES = ["chromium"]
COMMANDS = ("chromium", "chromium-browser")
APT_TIMEOUT_S = 900


def find_chromium() -> str | None:
    return next((path for name in COMMANDS if (path := shutil.which(name))), None)


def _apt(*args: str) -> subprocess.CompletedProcess | str:
    """apt-get ARGS (waiting for another apt's lock rather than failing); why it could not run, on a timeout."""
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    try:
        return subprocess.run(cmd, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"}, capture_output=True,
                              text=True, timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)} took over {APT_TIMEOUT_S} s"


def install_chromium() -> str:
    """The path of `chromium`, apt-installed when missing; the test is skipped, saying why, only where apt cannot.

    The package lists are refreshed only when an install from the lists at hand fails (absent or stale).
    """
    if found := find_chromium():
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt needs root to install it")
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    done = _apt(*install)
    if isinstance(done, str) or done.returncode != 0:
        for args in (("update",), install):
            done = _apt(*args)
            if isinstance(done, str):
                pytest.skip(f"apt cannot install chromium: {done}")
            if done.returncode != 0:
                pytest.skip(f"apt cannot install chromium: apt-get {' '.join(args)} exited {done.returncode}: "
                            f"{(done.stdout + done.stderr)[-1500:]}")
    if (found := find_chromium()) is None:
        pytest.skip(f"apt installed {PACKAGES} but none of {COMMANDS} is on PATH")
    return found


class _VisibleText(HTMLParser):
    """The text nodes of a document outside <script>, <style> and <noscript>, stripped, empty ones left out."""

    HIDDEN = {"script", "style", "noscript", "template"}

    def __init__(self):
        super().__init__()
        self.texts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in self.HIDDEN

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.texts.append(data.strip())


def visible_text(html: str) -> list[str]:
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    return parser.texts


def dump_dom(chromium: str, url: str, folder: Path, budget_ms: int, timeout_s: float = 120) -> str:
    """The page's DOM as Chromium serialises it once `budget_ms` of virtual time have run."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-dev-shm-usage", f"--user-data-dir={folder / 'profile'}",
           "--window-size=1600,1200", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    # Its home is the folder too: Chromium keeps a certificate store and caches there.
    env = os.environ | {"HOME": str(folder), "XDG_CONFIG_HOME": str(folder / "config"),
                        "XDG_CACHE_HOME": str(folder / "cache")}
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {timeout_s} s"
    finally:  # the browser's helpers (zygote, renderer, GPU process) go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0 or not out.strip():
        pytest.fail(f"chromium --dump-dom {url} exited {proc.returncode}: {err[-3000:]}")
    (folder / "page.html").write_text(out)  # kept beside the profile, to read when a check fails
    return out


def render(chromium: str, url: str, folder: Path, until: str, budget_ms: int = 8000, tries: int = 3) -> list[str]:
    """The visible text of `url` once it shows `until` (a text node equal to it): each try doubles the budget.

    The pages that never show it fail the test with the text they did show.
    """
    texts: list[str] = []
    for attempt in range(tries):
        texts = visible_text(dump_dom(chromium, url, folder / f"try-{attempt}", budget_ms << attempt))
        if until in texts:
            return texts
    pytest.fail(f"{url} never showed {until!r} in {tries} tries; it showed: {texts}")
