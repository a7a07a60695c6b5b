"""`nin-sweep`: hyperparameter sweeps of nin-train jobs with Optuna, tracked as nested MLflow runs.

One parent MLflow run per study, one child run per trial (each a real nin-train job, or a torchrun
job with `--nproc-per-node K`), trials pruned on their per-epoch validation accuracy, the study in
sqlite beside the MLflow store so that running the same command again continues it.

The modules, one job each:

- `cli`: the command line, the checks before any work, the start and the end of a sweep;
- `space`: the search space from the config's `sweep:` section (or the default), checked;
- `study`: the Optuna study (storage, resume, the loop of trials, pruning);
- `trial`: one trial as a process: its command, start, stop;
- `progress`: what a trial's folder says (epochs.jsonl while it runs, metrics.json at the end), untrusted;
- `parent`: the MLflow side: the parent run, the children's states, the best trial, the @best alias.
"""
