"""nin-sweep: the search space's checks, and a real sweep of two worker processes, one killed mid-trial.

The sweep (tests/tracking/sweeps.py, the session fixture `resumed_sweep`) runs real nin-train
subprocesses into a real sqlite MLflow store, and is read back here with MlflowClient and Optuna's
own storage.
"""

from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient
from sweeps import TRIALS, config_file

from nin_dist.config import load_config
from nin_dist.errors import ConfigError
from nin_dist.sweep.cli import main, parse_args, prepare
from nin_dist.sweep.trial import command


@pytest.mark.parametrize(("section", "message"), [
    ("sweep:\n  optim.lrr: {type: float, low: 0.1, high: 1}\n", "sweep.optim.lrr: unknown config key; did you mean"),
    ("sweep:\n  optim.lr: {type: gauss, low: 0.1, high: 1}\n", "type='gauss' is not allowed: float, int or"),
    ("sweep:\n  optim.lr: {type: float, low: 1, high: 0.1}\n", "low=1.0, high=0.1 is not allowed: low below high"),
    ("sweep:\n  optim.lr: {type: float, low: 0, high: 1, log: true}\n", "not allowed with log: true"),
    ("sweep:\n  optim.lr: {type: float, lo: 0.1, high: 1}\n", "unknown field 'lo' of a float distribution"),
    ("sweep:\n  run.name: [a, b]\n", "sweep.run.name is not allowed: nin-sweep sets run.* and tracking.*"),
    ("sweep:\n  optim.lr: {type: float, low: 0.0, high: 1}\n", "sweep.optim.lr reaches 0.0, which the config refuses"),
    ("sweep:\n  model.batchnorm: [true, true]\n", "each choice once"),
    ("sweep: 3\n", "sweep must be a mapping of config keys to distributions"),
    ("sweep:\n  model.kernels: ['5,3,3', '5,4,3']\n",
     "sweep.model.kernels reaches '5,4,3', which the config refuses: model.kernels=[5, 4, 3] is not allowed: odd"),
    ("sweep:\n  model.widths: ['32,96,192', '32,96']\n",  # cpu.yaml's model.width=0.5 is refused with any
     "sweep.model.widths reaches '32,96,192', which the config refuses: model.widths=[32, 96, 192] and model.width"),
])
def test_a_bad_search_space_is_one_line_and_exit_2(tmp_path, capsys, section, message):
    folder = tmp_path / "sweep"
    code = main(["--config", str(config_file(tmp_path, section)), "--trials", "2", f"run.out_dir={folder}",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not folder.exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_a_searched_key_fixed_by_an_override_and_bad_flags_are_refused(tmp_path, capsys):
    cfg = str(config_file(tmp_path))
    assert main(["--config", cfg, "--trials", "2", "optim.lr=0.1"]) == 2
    assert "optim.lr is both searched and fixed by an override" in capsys.readouterr().err
    assert main(["--config", cfg, "--trials", "0"]) == 2
    assert "--trials=0 is not allowed" in capsys.readouterr().err
    assert main(["--config", cfg, "--trials", "1", "--register", "a/b"]) == 2
    assert "tracking.register_model='a/b' is not allowed" in capsys.readouterr().err
    for flag, value in (("--nproc-per-node", "0"), ("--startup-trials", "-1"), ("--warmup-epochs", "-1")):
        assert main(["--config", cfg, "--trials", "1", flag, value]) == 2
        assert f"{flag}={value} is not allowed" in capsys.readouterr().err
    assert main(["--config", cfg, "--trials", "1", "--study", "../up"]) == 2
    assert "--study '../up' is not allowed" in capsys.readouterr().err


def test_nin_train_skips_the_sweep_section_and_refuses_sweep_keys(tmp_path):
    cfg = load_config(config_file(tmp_path))
    assert cfg.optim.lr == 0.05  # cpu.yaml's: the section is the sweep's, not the run's
    with pytest.raises(ConfigError, match="unknown config key sweep.optim.lr"):
        load_config(config_file(tmp_path), ["sweep.optim.lr=0.1"])


def test_widths_and_kernels_are_swept_as_text_and_a_trial_builds_its_choice(tmp_path):
    """Optuna's choices are scalars: a network's widths and kernels are swept as text ("32,96,192"),
    which nin-train reads as the list it is. Every choice is checked before any work, and a trial's
    command line gives the config of its choice."""
    section = ("sweep:\n  model.widths: ['32,96,192', '16,48,96']\n"
               "  model.kernels: {type: categorical, choices: ['5,3,3', '3,3,1']}\n")
    args = parse_args(["--config", str(config_file(tmp_path, section)), "--trials", "2", "model.width=1"])
    _, _, overrides, space = prepare(args)
    assert space["model.widths"].choices == ("32,96,192", "16,48,96")
    trial = optuna.trial.FixedTrial({"model.widths": "16,48,96", "model.kernels": "3,3,1"})
    values = {key: dist.suggest(trial, key) for key, dist in space.items()}
    argv = command(args.config, overrides, values, tmp_path / "trial-0", "trial-0", "0" * 32, nproc=1)
    at = argv.index("--config")
    cfg = load_config(argv[at + 1], argv[at + 2:])
    assert (cfg.model.block_widths, cfg.model.kernels) == ((16, 48, 96), (3, 3, 1))


@pytest.mark.slow
def test_two_workers_one_killed_end_the_study_with_exactly_n_trials(resumed_sweep):
    """A (two workers) and B (one, SIGKILLed mid-trial) share the journal study: B's trial is taken over in
    place after the grace period and resumed from its checkpoint, or pruned without a restart when the
    epoch it scored before the kill is below the median by then; exactly N trials, one parent run."""
    number = resumed_sweep.taken_over
    assert f"trial {number} of worker " in resumed_sweep.output and "taking it over" in resumed_sweep.output
    log = (resumed_sweep.folder / "sweep" / f"trial-{number}.log").read_text()
    study = resumed_sweep.study()
    attempts = [line for line in log.splitlines() if line.startswith("$ ")]
    if len(attempts) == 1:  # A pruned it on the epoch B's attempt had scored, without starting it again
        assert study.trials[number].state == optuna.trial.TrialState.PRUNED, log[-3000:]
        assert f"trial-{number} pruned after epoch 1" in resumed_sweep.output
    else:  # A resumed it from its checkpoint, not from step 0
        assert len(attempts) == 2 and f"at epoch 2, step {resumed_sweep.step_at_kill}" in log, log[-3000:]

    states = [t.state for t in study.trials]
    assert len(states) == TRIALS and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                         for s in states), states
    assert len({t.params["optim.lr"] for t in study.trials}) == TRIALS  # none lost, none doubled
    owners = {t.system_attrs["nin.worker"].rsplit(":", 2)[0] for t in study.trials}
    assert len(owners) == 1, owners  # every trial ended on worker A's process (B's was taken over)
    assert len({t.system_attrs["nin.worker"] for t in study.trials}) == 2  # ... by both of its workers
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [(t.params, t.intermediate_values) for t in study.trials]

    client = MlflowClient(resumed_sweep.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [study.user_attrs["parent_run_id"]]  # the same parent, once
    parent = parents[0]
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(kids) == [f"trial-{n}" for n in range(TRIALS)] and len(runs) == TRIALS + 1
    assert kids[f"trial-{number}"].info.run_id == study.trials[number].user_attrs["mlflow_run_id"]  # one run
    for trial in study.trials:
        kid = kids[f"trial-{trial.number}"]
        assert float(kid.data.params["optim.lr"]) == trial.params["optim.lr"]
        assert kid.data.tags["sweep.state"] == trial.state.name and kid.data.tags["sweep.trial"] == str(trial.number)
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert kid.info.status == "KILLED" and "test/acc" not in kid.data.metrics
        else:
            assert kid.info.status == "FINISHED" and kid.data.metrics["val/acc"] == trial.value

    best = study.best_trial
    best_run = kids[f"trial-{best.number}"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best.optim.lr"] == best_run.data.params["optim.lr"]
    assert parent.data.params["best.trial"] == str(best.number)
    assert parent.data.params["best.run_id"] == best_run.info.run_id
    assert parent.data.metrics["best/val/acc"] == best_run.data.metrics["val/acc"] == best.value
    assert parent.data.metrics["best/test/acc"] == best_run.data.metrics["test/acc"]
    assert "sweep.storage" in parent.data.tags
