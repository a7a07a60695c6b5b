"""`nin-sweep`: hyperparameter sweeps of nin-train jobs with Optuna, tracked as nested MLflow runs.

One parent MLflow run per study, one child run per trial (each a real nin-train job, or a torchrun
job with `--nproc-per-node K`), trials pruned on their per-epoch validation accuracy. Any number of
workers (`--workers K` per process, any number of processes and machines) share one study; a dead
worker's trial is taken over in place from its checkpoint.

The modules, one job each:

- `cli`: the command line, the checks before any work, the start and the end of a sweep;
- `space`: the search space from the config's `sweep:` section (or the default), checked;
- `storage`: where the study lives (journal file, PostgreSQL, an older sqlite), its claim lock, heartbeats;
- `study`: the Optuna study and the loop each worker runs (take a trial, run it, tell it; take-overs);
- `workers`: `--workers K`: each worker's GPUs and threads, the worker threads;
- `trial`: one trial as a process: its command, start, stop;
- `progress`: what a trial's folder says (epochs.jsonl while it runs, metrics.json at the end), untrusted;
- `parent`: the MLflow side: the parent run, the children's states, the best trial, the @best alias.
"""
