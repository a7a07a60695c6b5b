"""Property tests: any YAML document and any dotted overrides give a Config or one ConfigError line.

The documents are Python objects dumped with yaml (config-shaped ones with valid and invalid keys,
and arbitrary nested values), raw text and raw bytes. The CLI entry gets the same inputs with
`data.root` pointing nowhere, tracking off and the run folder under the test's tmp folder, so a
config that passes stops at the data with a one-line DataError: nothing trains, and nothing lands
in the checkout. Examples are derandomized, so every CI run tries the same inputs.
"""

import contextlib
import io
import itertools
import logging

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nin_dist.config import Config, all_keys, load_config
from nin_dist.errors import ConfigError
from nin_dist.train import main

KEYS = all_keys()
SECTIONS = sorted({key.partition(".")[0] for key in KEYS if "." in key})
LEAVES = sorted({key.rpartition(".")[2] for key in KEYS})
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

numbers = st.one_of(st.integers(), st.integers(min_value=-2**70, max_value=2**70).map(lambda n: n * 10**20),
                    st.floats(allow_nan=True, allow_infinity=True))
# Values near the checks: bounds and one past them, words the choice keys take, YAML's special words.
edges = st.one_of(
    st.sampled_from([0, 1, -1, 2, 28, 67, 224, 2048, 2049, 10_000, 60_000, 60_001, 1024, 1025, 3600, 2**31, 2**32 - 1,
                     2**32, 2**63, 2**64, 10**30, 0.5, 0.999, 1.0, 16.0, 16.5, 1e-300, 1e300, -0.0]),
    st.sampled_from(["inf", "-inf", "nan", "null", "~", "true", "off", "1e400", "0x10", "1_000", " 3 ", "auto",
                     "cuda", "cpu", "torch", "cosine", "onecycle", "bf16", "fp64", "", " "]),
    st.integers(min_value=-5, max_value=300), st.floats(min_value=-2, max_value=20))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), edges)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
any_key = st.one_of(st.sampled_from(SECTIONS + LEAVES), st.text(max_size=10), st.integers(), st.booleans(),
                    st.none(), st.floats(allow_nan=False))


def _nest(pairs) -> dict:
    """[('train.epochs', 2), ...] -> {'train': {'epochs': 2}}: a document with valid keys only."""
    tree: dict = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


valid_documents = st.lists(st.tuples(st.sampled_from(KEYS), edges), max_size=5).map(_nest)
documents = st.one_of(
    valid_documents,
    valid_documents,
    st.lists(st.tuples(st.sampled_from(KEYS), scalars), max_size=5).map(_nest),
    st.dictionaries(st.sampled_from(SECTIONS + ["seed"]) | any_key,
                    st.dictionaries(st.sampled_from(LEAVES) | any_key, values, max_size=4) | values, max_size=4),
    values,  # a list or a scalar at the top level
)
raw_text = st.one_of(st.text(max_size=80),
                     st.lists(st.sampled_from(["train:", "  epochs: 2", "seed: &a 1", "x: *a", "- 1", "{", "]",
                                               "model: {width: .inf}", "? [1, 2]\n: 3", "!!binary x", "<<: 5",
                                               "data: !!set {a}", "%YAML 1.1", "---", "...", "\t", "seed: 1:2",
                                               "seed: 2020-13-01", "optim: {lr: 1e400}", "train: {3: 4}", "1: 2"]),
                              max_size=6).map("\n".join))
raw_bytes = st.binary(max_size=80)
override_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
valid_override = st.builds(lambda key, value: f"{key}={value}", st.sampled_from(KEYS), edges.map(str) | override_text)
overrides = st.one_of(st.lists(valid_override, max_size=4), st.lists(valid_override, max_size=4), st.lists(st.one_of(
    valid_override,
    st.builds(lambda key, value: f"{key}={value}", override_text, override_text),
    override_text,
), max_size=3))


def _dump(document) -> bytes:
    return yaml.safe_dump(document, allow_unicode=True).encode()


config_files = st.one_of(documents.map(_dump), documents.map(_dump), raw_text.map(str.encode), raw_bytes)


def _kind(message: str) -> str:
    """What an error is about, for the statistics (`--hypothesis-show-statistics`)."""
    for kind in ("not valid YAML", "not UTF-8", "top level", "is not a name", "unknown config key", "wrong type",
                 "finite", "is not allowed", "not key=value", "Fashion-MNIST"):
        if kind in message:
            return kind
    return "other"


def _check_loads(path, items) -> None:
    try:
        assert isinstance(load_config(path, items), Config)
        event("a Config")
    except ConfigError as err:
        assert len(str(err).splitlines()) == 1, str(err)
        event("ConfigError: " + _kind(str(err)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_runs = itertools.count()


@settings(FUZZ, max_examples=400)
@given(content=config_files, items=overrides)
def test_load_config_gives_a_config_or_one_config_error(folder, content, items):
    path = folder / "c.yaml"
    path.write_bytes(content)
    _check_loads(path, items)


@settings(FUZZ, max_examples=300)
@given(items=overrides)
def test_overrides_alone_give_a_config_or_one_config_error(items):
    _check_loads(None, items)


@contextlib.contextmanager
def _cli_state():
    """Keep what `main` changes in the process (threads, logging) as it was, and collect stderr."""
    threads, handlers, level = torch.get_num_threads(), logging.root.handlers[:], logging.root.level
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            yield stderr
    finally:
        torch.set_num_threads(threads)
        logging.root.handlers[:], logging.root.level = handlers, level


@settings(FUZZ, max_examples=200)
@given(content=config_files, items=overrides)
def test_cli_exits_2_with_one_error_line(folder, content, items):
    path = folder / "cli.yaml"
    path.write_bytes(content)
    nowhere = folder / "no-data"
    # After `--` every item is an override; the last four keep any passing config away from work
    # and from the working folder (the run folder is made and locked before the data is read).
    argv = ["--config", str(path), "--", *items, f"data.root={nowhere}", "data.download=false",
            "tracking.enabled=false", f"run.out_dir={folder / 'runs' / str(next(_runs))}"]
    with _cli_state() as stderr:
        code = main(argv)
    lines = stderr.getvalue().splitlines()
    errors = [line for line in lines if line.startswith("nin-train: error: ")]
    event("exit 2: " + _kind(errors[0]) if errors else "no error line")
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    assert not nowhere.exists()

