"""Fashion-MNIST on first run: fetched from a real (loopback) HTTP mirror serving the real files,
verified before it lands, fetched once however many processes start together, and a bad mirror gives
one line, exit 2 and a data folder with nothing half-written in it."""

from __future__ import annotations

import collections
import gzip
import http.server
import struct
import threading
import time
from pathlib import Path

import pytest
from helpers import env, free_port, overrides, real_gz, run, torchrun_cmd

from nin_dist import data as data_module
from nin_dist import download as download_module
from nin_dist.data import FILES, read_idx
from nin_dist.errors import DataError
from nin_dist.train import main

NAMES = [idx.name + ".gz" for idx in FILES.values()]
TINY = {"data__train_limit": 32, "data__test_limit": 32, "train__batch_size": 16, "train__epochs": 1,
        "train__max_steps": 2, "train__precision": "fp32"}


class Mirror:
    """An HTTP server on 127.0.0.1 serving `files` (name -> bytes), counting the requests per name."""

    def __init__(self, files: dict[str, bytes], delay_s: float = 0.0):
        self.files, self.delay_s = files, delay_s
        self.requests: collections.Counter[str] = collections.Counter()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests[name] += 1
                time.sleep(mirror.delay_s)  # widens the window in which a second process could start a fetch
                body = mirror.files.get(name)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                try:
                    self.wfile.write(body or b"")
                except ConnectionError:
                    pass  # the client stopped reading (a response cut off on purpose)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fashion/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def real_files() -> dict[str, bytes]:
    return {idx.name + ".gz": real_gz(idx) for idx in FILES.values()}


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """A working folder with no copy of the data anywhere the search looks: no $NIN_DATA_DIR, an empty
    ./data, and the system location (Debian's dataset-fashion-mnist) pointed at an empty folder, so
    what this machine has installed does not decide whether a download is tested."""
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_module, "DEBIAN_ROOT", str(tmp_path / "no-system-copy"))
    return tmp_path


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("nin-train: error:")]


def _everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_first_run_downloads_into_data_verifies_and_trains(nowhere, real_files, capsys):
    with Mirror(real_files) as mirror:
        code = main(overrides(nowhere / "run", **TINY, data__mirror=mirror.url))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    raw = nowhere / "data" / "FashionMNIST" / "raw"
    assert _everything_under(nowhere / "data") == ["FashionMNIST", "FashionMNIST/raw", *sorted(
        f"FashionMNIST/raw/{name}" for name in NAMES)]  # no lock file, no staging folder
    assert all((raw / name).read_bytes() == body for name, body in real_files.items())
    assert dict(mirror.requests) == dict.fromkeys(NAMES, 1)
    assert f"downloaded and verified into {raw.resolve()}" in err
    assert f"data: Fashion-MNIST from {(nowhere / 'data').resolve()}, verified" in err

    with Mirror(real_files) as mirror:  # a second run finds the copy and fetches nothing
        assert main(overrides(nowhere / "run2", **TINY, data__mirror=mirror.url)) == 0
    assert not mirror.requests


@pytest.mark.parametrize("damage, problem", [
    (lambda body: body[: len(body) // 2], "truncated or corrupt gzip"),
    (lambda body: gzip.compress(gzip.decompress(body)[:-1] + b"\x01"), "checksum mismatch"),
    (None, "HTTP 404"),
])
def test_a_bad_mirror_file_is_one_line_and_leaves_nothing_behind(nowhere, real_files, capsys, damage, problem):
    files = dict(real_files)
    victim = "t10k-labels-idx1-ubyte.gz"  # fetched last: three good files are already staged by then
    if damage is None:
        del files[victim]
    else:
        files[victim] = damage(files[victim])
    with Mirror(files) as mirror:
        code = main(overrides(nowhere / "run", **TINY, data__mirror=mirror.url))
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert f"{mirror.url}{victim}: {problem}" in errors[0], errors[0]
    assert not (nowhere / "data").exists(), _everything_under(nowhere / "data")  # the folders it made, gone
    assert not (nowhere / "run").exists()


def test_a_given_root_is_filled_and_an_unreachable_mirror_names_the_debian_package(nowhere, capsys):
    root = nowhere / "given" / "root"
    root.parent.mkdir()
    code = main(overrides(nowhere / "run", **TINY, data__root=root,
                          data__mirror=f"http://127.0.0.1:{free_port()}/"))  # nothing listens there
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert "Connection refused" in errors[0] and "apt-get install dataset-fashion-mnist" in errors[0]
    assert _everything_under(nowhere / "given") == []  # the folder it was given stays; what it made goes


@pytest.mark.slow
def test_two_processes_on_an_empty_root_download_once(tmp_path, real_files):
    root = tmp_path / "shared-root"
    with Mirror(real_files, delay_s=0.5) as mirror:
        args = overrides(tmp_path / "run", **TINY, data__root=root, data__mirror=mirror.url)
        code, out = run(torchrun_cmd(["--standalone", "--nproc_per_node=2"], args), timeout=240,
                        env=env(NIN_DATA_DIR=str(tmp_path / "empty")), cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert dict(mirror.requests) == dict.fromkeys(NAMES, 1), mirror.requests
    assert all((root / "FashionMNIST" / "raw" / name).read_bytes() == body for name, body in real_files.items())


def test_an_endless_response_is_cut_off(nowhere, real_files, monkeypatch, capsys):
    monkeypatch.setattr(download_module, "MAX_DOWNLOAD_BYTES", 10_000)  # the two label files are smaller
    with Mirror(real_files) as mirror:
        assert main(overrides(nowhere / "run", **TINY, data__mirror=mirror.url)) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "train-images-idx3-ubyte.gz: more than 10,000 bytes" in errors[0]
    assert not (nowhere / "data").exists()


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    bomb = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels = FILES[("test", "labels")]
    header = struct.pack(">II", labels.magic, labels.count)  # a valid header, then 200 MB of zeros
    bomb.write_bytes(gzip.compress(header + b"\0" * 200_000_000, compresslevel=1))
    with pytest.raises(DataError, match=r"truncated or padded \(10009 bytes, expected 10008\)"):
        read_idx(bomb, labels)


def test_the_mirror_must_be_an_http_or_file_url(tmp_path, capsys):
    code = main(overrides(tmp_path / "run", data__mirror="ftp://example.org/fashion/"))
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and "data.mirror='ftp://example.org/fashion/' is not allowed" in errors[0]
