"""Fetch Fashion-MNIST's four `.gz` files from a mirror into `<root>/FashionMNIST/raw`, verified first.

Files arrive in a temporary folder beside their target and are checked as local copies are (gzip, size,
IDX magic, SHA-256: `nin_dist.data.read_idx`); only when every missing file has passed are they moved
into place, so a root never holds a half-downloaded or unverified file. The processes of a job that
share a root (the ranks of a node, or every node on shared storage) take turns on a lock file there:
the first downloads, the others wait and then find the files. Without the lock (a filesystem that
refuses it) two downloads stay correct, since each stages its own files and the last rename wins.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nin_dist.errors import DataError

log = logging.getLogger(__name__)

# torchvision's `FashionMNIST.mirrors`, then the files in the dataset's own repository
# (github.com/zalandoresearch/fashion-mnist, data/fashion/).
DEFAULT_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# The largest upstream file is 26.4 MB; a mirror that sends more is not serving Fashion-MNIST.
MAX_DOWNLOAD_BYTES = 64 << 20
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60  # per connection and per read: a stalled mirror fails instead of hanging the job
DEBIAN_HINT = "offline, `apt-get install dataset-fashion-mnist` puts a copy in /usr/share/datasets/fashion-mnist"


def raw_folder(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def download(root: Path, missing: Callable[[], list], mirrors: tuple[str, ...],
             verify: Callable[[Path, Any], None]) -> None:
    """Fetch the files `missing()` names (IdxFile records) into `root`; `verify(path, idx)` raises DataError."""
    raw = raw_folder(root)
    made = _make_folders(raw)
    try:
        with _turn(raw):
            if wanted := missing():  # else another process fetched them while this one waited
                _fetch_all(raw, wanted, mirrors, verify)
    except BaseException:
        _remove_empty(made)
        raise


def _fetch_all(raw: Path, missing: list, mirrors: tuple[str, ...], verify) -> None:
    raw.mkdir(parents=True, exist_ok=True)  # a process that failed before this one may have removed it
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=raw))
    try:
        for idx in missing:
            name = idx.name + ".gz"
            errors = []
            for mirror in mirrors:
                url = urllib.parse.urljoin(mirror, name)
                try:
                    size = _fetch(url, staging / name)
                    verify(staging / name, idx)
                except (DataError, OSError, ValueError) as err:
                    errors.append(f"{url}: {_reason(err, staging / name)}")
                    continue
                log.info("data: fetched %s (%s bytes) from %s", name, f"{size:,}", mirror)
                break
            else:
                raise DataError(f"data.download: could not fetch {name} ({'; '.join(errors)}); "
                                f"set data.mirror=URL or data.root=DIR, or {DEBIAN_HINT}")
        for path in staging.iterdir():
            os.replace(path, raw / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("data: Fashion-MNIST downloaded and verified into %s", raw.resolve())


def _fetch(url: str, path: Path) -> int:
    """Stream `url` into `path`; the byte count. Raises OSError (network) or DataError (too large)."""
    written = 0
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, path.open("wb") as out:
        while chunk := response.read(CHUNK_BYTES):
            written += len(chunk)
            if written > MAX_DOWNLOAD_BYTES:
                raise DataError(f"more than {MAX_DOWNLOAD_BYTES:,} bytes; not a Fashion-MNIST file")
            out.write(chunk)
    return written


def _reason(err: Exception, staged: Path) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err).removeprefix(f"{staged}: ")  # read_idx names the temporary file; the URL says more


def is_mirror_url(url: str) -> bool:
    """An http(s) URL with a host, or a file URL: what `data.mirror` may be."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) or parts.scheme == "file"


@contextlib.contextmanager
def _turn(raw: Path):
    """Hold the root's download lock; removed by its last holder, so a finished root has no lock file."""
    lock = raw / ".download.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise DataError(f"data.download: cannot write into {raw} ({err.strerror}); "
                        f"set data.root to a writable folder, or {DEBIAN_HINT}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                raise
            log.warning("data: %s does not support locks; processes may download in parallel", raw)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _make_folders(raw: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest first), so a failure can take them back."""
    made = []
    for folder in (raw, *raw.parents):
        if folder.exists():
            break
        made.append(folder)
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.download: cannot create {raw} ({err.strerror}); set data.root to a writable "
                        f"folder, or {DEBIAN_HINT}") from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: another process may have put files there meanwhile
