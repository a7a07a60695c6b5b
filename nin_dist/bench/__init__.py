"""`nin-bench` (`python -m nin_dist.bench`): benchmarks that print a table and write JSON.

Not tests: numbers, side by side. One module per benchmark (`data`, `kernels`, `train`, `scaling`,
`tta`, `ablate`, ...), each with `add_arguments(parser)` and `run(args) -> int`; `common` holds what
they share (the machine, tables, medians of repeats, means ± sd over seeds, JSON), `jobs` the
`nin-train` subprocess the whole-run benchmarks start and the folder their runs go to, `seed` the
seed's own data pipeline and network, the baselines. `__main__` is the command line. `gpu` plans a
GPU visit; its steps `kernel_rows` and `tile_sweep` (run as modules) and the pytest plugin
`pytest_rows` write JSON lines through `rows`; `peaks` has the cards' datasheet peaks.
"""
