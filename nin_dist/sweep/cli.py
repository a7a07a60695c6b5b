"""`nin-sweep`: an Optuna study of nin-train jobs, one nested MLflow run per trial under a parent run.

    nin-sweep --config configs/cpu.yaml --trials 20                       # the config's sweep: or the default space
    nin-sweep --config CFG --trials 20 --nproc-per-node 2 train.epochs=3  # each trial under torchrun
    nin-sweep --config CFG --trials 20 --register nin-fashion             # versions of a registered model, @best
    nin-sweep --config CFG --trials 64 --workers 4                        # 4 trials at once (a GPU each, or cores/4)
    NIN_SWEEP_STORAGE=postgresql+psycopg://user@db/optuna nin-sweep ...  # the same on every machine: one study

The overrides (`key=value`) fix keys for every trial; `run.out_dir` is the sweep's folder (default
runs/sweep-<study>), each trial's run folder below it. Running the same command again, here or on
another machine, joins the study (`nin_dist.sweep.study`): a killed worker loses no trial. Exit
codes: 0 done, 2 user error (one line, nothing started), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
from pathlib import Path

from nin_dist.config import SWEEP_SECTION, load_config, model_relevant
from nin_dist.errors import ConfigError, UserError, report
from nin_dist.logs import init_logging
from nin_dist.sweep.space import check_values, default_space, describe, parse_space
from nin_dist.sweep.storage import ENV as STORAGE_ENV
from nin_dist.typed_yaml import read_yaml

log = logging.getLogger("nin_dist.sweep")

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # also the folder name runs/sweep-<study>


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nin-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config; its sweep: section is the search space")
    parser.add_argument("--trials", type=int, required=True,
                        help="trials in all, over every worker of every machine: exactly this many")
    parser.add_argument("--study", help="study name (default: the config file's name)")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="K",
                        help="run each trial as torchrun --standalone --nproc_per_node=K (default 1: nin-train)")
    parser.add_argument("--workers", type=int, metavar="K", help="trials at once on this machine (default: the "
                        "visible GPUs / --nproc-per-node, else 1); the same command on other machines joins the study")
    parser.add_argument("--storage", metavar="URL", help=f"the study's storage, shared by every worker: e.g. "
                        f"postgresql+psycopg://user@host/db (default: ${STORAGE_ENV}, else a journal file in the "
                        f"sweep folder); a password is better in ${STORAGE_ENV}, PGPASSWORD or ~/.pgpass")
    parser.add_argument("--heartbeat", type=float, default=10.0, metavar="S",
                        help="seconds between a worker's heartbeats (default 10)")
    parser.add_argument("--grace", type=float, default=60.0, metavar="S", help="seconds without a heartbeat after "
                        "which another worker takes a trial over (default 60)")
    parser.add_argument("--register", metavar="NAME", help="each finished trial's model becomes a version of the "
                        "registered model NAME (tracking.register_model); the best gets alias @best")
    parser.add_argument("--seed", type=int, help="sampler seed (default: the config's seed)")
    parser.add_argument("--startup-trials", type=int, default=3, help="completed trials before pruning starts")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="epochs of each trial never pruned")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for every trial")
    return parser.parse_args(argv)


def _check_args(args) -> str:
    """The study's name, once every argument is one nin-sweep can work with."""
    for flag, value, least in (("--trials", args.trials, 1), ("--nproc-per-node", args.nproc_per_node, 1),
                               ("--workers", 1 if args.workers is None else args.workers, 1),
                               ("--startup-trials", args.startup_trials, 0),
                               ("--warmup-epochs", args.warmup_epochs, 0)):
        if value < least:
            raise ConfigError(f"{flag}={value} is not allowed: at least {least}")
    if not 0 < args.heartbeat < args.grace:
        raise ConfigError(f"--heartbeat={args.heartbeat:g} --grace={args.grace:g} is not allowed: "
                          f"0 < heartbeat < grace")
    study = args.study or Path(args.config).stem
    if not STUDY_NAME.fullmatch(study):
        raise ConfigError(f"--study {study!r} is not allowed: 1 to 100 letters, digits, '.', '_' or '-', starting "
                          f"with a letter or digit")
    return study


def prepare(args):
    """Everything checked before any work: (study name, config, fixed overrides, space)."""
    study = _check_args(args)
    overrides = [*args.overrides, *([f"tracking.register_model={args.register}"] if args.register else [])]
    cfg = load_config(args.config, overrides)
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled=false is not allowed for nin-sweep: the trials nest in MLflow runs")
    section = read_yaml(args.config).get(SWEEP_SECTION, ...)
    fixed = {item.partition("=")[0].strip() for item in overrides}
    space = {key: dist for key, dist in default_space(cfg).items() if key not in fixed} if section is ... \
        else parse_space(section, overrides)
    if not space:
        raise ConfigError("every key of the default search space is fixed by an override: give a sweep: section")
    if "data.val_size" in space:
        raise ConfigError(f"{SWEEP_SECTION}.data.val_size is not allowed: every trial is scored on the same split")
    check_values(args.config, overrides, space)
    return study, cfg, overrides, space


def sweep(args) -> int:
    import hashlib
    import json

    import optuna
    from mlflow import MlflowClient

    from nin_dist.sweep.parent import ParentRun
    from nin_dist.sweep.storage import Storage, resolve
    from nin_dist.sweep.study import Plan, Worker, finished, open_study
    from nin_dist.sweep.workers import run_all, shares
    from nin_dist.tracking.redaction import quiet_run_links, run_link
    from nin_dist.tracking.store import check_reachable, resolve_uri

    name, cfg, overrides, space = prepare(args)
    quiet_run_links()  # MLflow's line at a run's end quotes the URI, password included (its trials inherit this)
    uri, source = resolve_uri(cfg.tracking.uri)
    folder = Path(cfg.run.out_dir or Path("runs") / f"sweep-{name}").resolve()
    workers = shares(args.workers, args.nproc_per_node, "train.threads" in space or any(
        item.partition("=")[0].strip() == "train.threads" for item in overrides))
    storage = Storage(resolve(args.storage, folder, uri, name), cfg.tracking.timeout_s)  # reached, or exit 2
    storage.check_workers(len(workers))
    # MLflow makes an sqlite store's tables on first use, and two processes doing it at once collide
    # ("duplicate column"): the workers of one machine take turns.
    with storage.claim(name) if uri.startswith("sqlite:") else contextlib.nullcontext():
        check_reachable(uri, source, cfg.tracking.timeout_s)
    base = {key: value for key, value in model_relevant(cfg).items() if key not in space}
    attrs = {"search_space": describe(space), "fixed_config": hashlib.sha256(
        json.dumps(base, sort_keys=True).encode()).hexdigest()[:16], "folder": str(folder)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, name, attrs, len(workers))
    client = MlflowClient(uri)
    with storage.claim(name):  # one parent run for the study, whichever worker comes first
        study = optuna.load_study(study_name=name, storage=storage.optuna)
        parent = ParentRun.open(client, cfg.tracking.experiment, cfg.run.name or f"sweep-{name}",
                                study.user_attrs.get("parent_run_id"),
                                {"sweep.study": name, "sweep.storage": storage.shown,
                                 "sweep.space": attrs["search_space"], "sweep.folder": str(folder)})
        study.set_user_attr("parent_run_id", parent.run_id)
    metric = "val_acc" if cfg.data.val_size else "test_acc"
    log.info("sweep: study %s in %s, %d of %d trials ended; %d worker(s) here; parent MLflow run %s; objective %s",
             name, storage.shown, finished(study), args.trials, len(workers), parent.run_id,
             metric.replace("_", "/"))
    # The tracking URI reaches the trials through the environment only (it may hold a password: argv is public).
    fixed = [item for item in overrides if item.partition("=")[0].strip() != "tracking.uri"]
    plan = Plan(storage, name, space, parent, folder, args.config, fixed, metric,
                cfg.train.epochs if "train.epochs" not in space else float("inf"), args.nproc_per_node, args.trials,
                cfg.seed if args.seed is None else args.seed, args.startup_trials, args.warmup_epochs, args.heartbeat,
                args.grace, args.register, {"MLFLOW_TRACKING_URI": uri})
    try:
        run_all([Worker(plan, i, share.env, [*fixed, *share.overrides]).run for i, share in enumerate(workers)],
                plan.stop)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: the running trials were stopped on the way out
        _end_if_alone(plan, "KILLED")
        raise
    except BaseException:
        _end_if_alone(plan, "FAILED")
        raise
    link = run_link(uri, client.get_run(parent.run_id).info.experiment_id, parent.run_id)
    if link:
        log.info("sweep: view the parent run at %s", link)
    return 0


def _end_if_alone(plan, status: str) -> None:
    """End the parent run `status` unless a worker of another process still runs a trial (the sweep goes on)."""
    from optuna.trial import TrialState

    from nin_dist.sweep.storage import owner_of

    try:
        import optuna

        study = optuna.load_study(study_name=plan.name, storage=plan.storage.optuna)
        others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if not (owner_of(t) or "").startswith(plan.process + ":")]
    except Exception:  # the storage is gone too: nothing tells that the sweep goes on
        others = []
    if not others:
        plan.parent.end(status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_logging(0)
    if threading.current_thread() is threading.main_thread():
        # As nin-train: SIGTERM exits through SystemExit, so the finally blocks stop the trial and end the runs.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return sweep(args)
    except UserError as err:
        return report("nin-sweep", err)


def cli() -> None:
    sys.exit(main())

