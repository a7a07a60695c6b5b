"""nin-sweep's storage and workers without a trial: what is refused before any work (one line, exit 2,
nothing started), which storage a sweep takes up, a study made with another search space, the
claim of trial numbers by racing workers, a worker that finds its trial taken over, and each worker's
share of the machine."""

from __future__ import annotations

import signal
import threading
import time

import optuna
import pytest
from postgres import PASSWORD as PG_PASSWORD
from sweeps import config_file

from nin_dist.errors import ConfigError
from nin_dist.sweep.cli import main
from nin_dist.sweep.storage import JOURNAL, SQLITE_DB, Storage, StorageError, owner_of, resolve
from nin_dist.sweep.study import Plan, TakenOver, Worker, open_study
from nin_dist.sweep.trial import TrialProcess
from nin_dist.sweep.workers import shares

PASSWORD = "pw-77d0-storage"


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "--workers=0 is not allowed: at least 1"),
    (["--heartbeat", "5", "--grace", "5"], "--heartbeat=5 --grace=5 is not allowed: 0 < heartbeat < grace"),
    (["--storage", f"postgresql+psycopg://nin:{PASSWORD}@127.0.0.1:1/db"],
     "--storage postgresql+psycopg://nin:***@127.0.0.1:1/db cannot be reached: "),
    (["--storage", "postgresql+pg8000://nin@127.0.0.1:1/db"],
     "needs the driver pg8000, which is not installed: pip install 'pg8000'"),
    (["--storage", "redis://127.0.0.1/0"], "is not allowed: postgresql://, mysql:// or sqlite:///"),
    (["--storage", "sqlite:///{tmp}/o.db", "--workers", "2"], "sqlite takes one worker"),
])
def test_bad_workers_or_storage_is_one_line_and_exit_2_nothing_started(tmp_path, capsys, flags, message):
    pytest.importorskip("psycopg")  # the driver of the dev install; without it the first case reads differently
    folder = tmp_path / "sweep"
    code = main(["--config", str(config_file(tmp_path)), "--trials", "2", *[f.format(tmp=tmp_path) for f in flags],
                 f"run.out_dir={folder}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert PASSWORD not in err
    assert not folder.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o.db").exists()


def test_storage_from_the_environment_keeps_its_password_off_the_screen(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NIN_SWEEP_STORAGE", f"postgresql+psycopg://nin:{PASSWORD}@127.0.0.1:1/db")
    pytest.importorskip("psycopg")
    code = main(["--config", str(config_file(tmp_path)), "--trials", "2", f"run.out_dir={tmp_path}/sweep"])
    err = capsys.readouterr().err
    assert code == 2 and "postgresql+psycopg://nin:***@127.0.0.1:1/db cannot be reached" in err and PASSWORD not in err


def test_the_default_storage_is_a_journal_and_an_older_sqlite_study_is_taken_up(tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve(None, tmp_path / "sweep", tracking, "lr") == f"journal:{tmp_path / 'sweep' / JOURNAL}"
    old = f"sqlite:///{tmp_path / SQLITE_DB}"  # where sweeps kept their study beside an sqlite MLflow store
    optuna.create_study(study_name="lr", storage=old)
    assert resolve(None, tmp_path / "sweep", tracking, "lr") == old
    assert resolve(None, tmp_path / "sweep", tracking, "other").startswith("journal:")  # not this study's file
    assert resolve("postgresql://db/x", tmp_path, tracking, "lr") == "postgresql://db/x"


def test_a_study_made_with_another_search_space_is_refused(tmp_path):
    storage = Storage(f"journal:{tmp_path / JOURNAL}", 5)
    open_study(storage, "lr", {"search_space": "optim.lr: float 0.001..0.1"}, 1)
    with pytest.raises(ConfigError, match="was made with another search space .optim.lr: float 0.001..0.1."):
        open_study(storage, "lr", {"search_space": "optim.lr: float 0.01..1"}, 1)


def race(url: str) -> None:
    """Three workers, each with storage objects of its own (its own lock file handle, or database
    connection), open the study and ask for trials as fast as they can: the study is made once and ends
    with exactly N trials, every number once. Without the claim lock: 11 of 9 here. Threads, not
    processes: the same race on the storage, without seconds of start-up per process."""
    def worker(took: list[int]) -> None:
        storage = Storage(url, 5)
        study = open_study(storage, "race", {}, 1)  # the first makes it (and a database's tables)
        while True:
            with storage.claim("race"):
                if len(study.get_trials(deepcopy=False)) >= 9:
                    return
                study.ask()
                took.append(1)

    took: list[int] = []
    threads = [threading.Thread(target=worker, args=(took,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    trials = optuna.load_study(study_name="race", storage=Storage(url, 5).open()).trials
    assert len(took) == 9 and sorted(t.number for t in trials) == list(range(9)), len(took)


def test_racing_workers_make_exactly_n_trials_under_the_claim_lock(tmp_path):
    race(f"journal:{tmp_path / JOURNAL}")


def test_on_postgresql_the_tables_the_study_and_the_trials_are_made_once(postgres, monkeypatch):
    """The same race on a new PostgreSQL database: its tables and the study made by one process only
    (optuna#1092), the password from PGPASSWORD alone."""
    url = postgres.create_db("race")
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    race(url)


def test_each_worker_gets_its_gpus_or_its_share_of_the_cores():
    two = shares(None, 2, False, gpus=["0", "1", "2", "3"], cores=16)  # K = 4 GPUs / 2 per trial
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in two] == ["0,1", "2,3"]
    assert [s.overrides for s in two] == [["train.threads=4"]] * 2
    cpu = shares(2, 1, False, gpus=[], cores=2)
    assert [s.env for s in cpu] == [{}, {}] and [s.overrides for s in cpu] == [["train.threads=1"]] * 2
    assert shares(None, 1, False, gpus=[], cores=8)[0].overrides == ["train.threads=8"]  # K = 1 without GPUs
    assert shares(2, 1, True, gpus=[], cores=8)[0].overrides == []  # train.threads given: left alone
    with pytest.raises(ConfigError, match="--workers 3 x --nproc-per-node 1 is not allowed: 2 GPUs are visible"):
        shares(3, 1, False, gpus=["0", "1"], cores=8)



def test_an_sqlite_study_with_a_trial_running_on_another_host_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / SQLITE_DB}"
    storage = Storage(url, 5)
    study = open_study(storage, "lr", {}, 1)
    trial = study.ask()
    storage.beat(trial._trial_id, "node-7:4242:0")  # a worker of another machine, sharing the file over NFS
    with pytest.raises(StorageError, match=f"the sqlite study {url} has trial 0 running on host node-7: workers on "
                                           "several machines need --storage postgresql://"):
        open_study(Storage(url, 5), "lr", {}, 1)


def test_a_worker_back_after_its_trial_was_taken_over_stops_its_copy_at_once(tmp_path):
    """A worker whose heartbeats stopped reaching the study (its machine cut off past the grace period)
    finds, at its next beat, that another worker owns its trial: it SIGKILLs its trial process (the
    folder and the MLflow run are the new owner's now) and lets the trial go."""
    storage = Storage(f"journal:{tmp_path / JOURNAL}", 5)
    study = open_study(storage, "back", {}, 1)
    plan = Plan(storage, "back", {}, None, tmp_path, "cfg.yaml", [], "val_acc", 2, 1, 1, 0, 1, 0, 0.2, 1.0, None, {})
    worker = Worker(plan, 0, {}, [])
    with storage.claim("back"):
        trial, resumed = worker._take(study.get_trials(deepcopy=False))
    assert not resumed and owner_of(study.trials[0]) == worker.owner
    proc = TrialProcess(["sleep", "60"], tmp_path / "trial-0.log")
    storage.beat(trial._trial_id, "node-9:77:0")  # taken over elsewhere
    started = time.monotonic()
    with pytest.raises(TakenOver):
        worker._watch(trial, proc, tmp_path / "trial-0")
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - started < 5
    assert owner_of(study.trials[0]) == "node-9:77:0"  # still the new owner's


class _ParentRecord:
    """The parent run's calls, recorded: which end each child got (its MLflow side is the shared sweep's)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.mark.parametrize("reported_before", [False, True], ids=["scored-only", "scored-and-reported"])
def test_a_taken_over_trial_below_the_median_is_pruned_without_starting_it_again(tmp_path, reported_before):
    """A trial whose worker died after it scored epoch 1 (in its epochs.jsonl, and maybe reported to the
    study) is taken over once two trials have done better there: the pruner stops it on that epoch, and
    no process is started for it (no trial-2.log)."""
    storage = Storage(f"journal:{tmp_path / JOURNAL}", 5)
    study = open_study(storage, "median", {}, 1)
    parent = _ParentRecord()
    plan = Plan(storage, "median", {}, parent, tmp_path, "cfg.yaml", [], "val_acc", 2, 1, 3, 0, 1, 0, 0.2, 1.0,
                None, {})
    for acc in (0.8, 0.9):
        done = study.ask()
        done.report(acc, 1)
        study.tell(done, acc)
    dead = study.ask()
    storage.beat(dead._trial_id, "node-9:77:0")
    if reported_before:
        dead.report(0.1, 1)
    (tmp_path / "trial-2").mkdir()
    (tmp_path / "trial-2" / "epochs.jsonl").write_text('{"epoch": 1, "val_acc": 0.1}\n')
    worker = Worker(plan, 0, {}, [])
    storage.beat(dead._trial_id, worker.owner)
    worker.run_trial(optuna.trial.Trial(worker.study, dead._trial_id), resumed=True)
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED and study.trials[2].intermediate_values == {1: 0.1}
    assert not (tmp_path / "trial-2.log").exists()  # never started again
    assert ("child_ended", None, "PRUNED", 1) in parent.calls
