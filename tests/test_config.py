"""Config: YAML + dotted overrides, typed conversion, and one-line errors (exit 2) before any work."""

from pathlib import Path

import pytest

from nin_dist.config import Config, all_keys, config_hash, flatten, load_config
from nin_dist.errors import ConfigError
from nin_dist.train import main

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = ("configs/d2l.yaml", "configs/cpu.yaml", "configs/fast.yaml")


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_repo_configs_load(path):
    if not (REPO / path).exists():
        pytest.fail(f"{path} missing")
    assert isinstance(load_config(REPO / path), Config)


def test_d2l_config_is_the_seeds_run():
    cfg = load_config(REPO / "configs/d2l.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.schedule) == (0.1, 0.0, 0.0,
                                                                                              "constant")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.resize) == (10, 128, 224)
    assert not cfg.data.normalize and not cfg.model.batchnorm and cfg.model.width == 1.0
    assert (cfg.model.stem_kernel, cfg.model.stem_stride, cfg.model.stem_padding) == (11, 4, 0)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.05", "data.flip=true", "data.train_limit=null",
                             "seed=7", "tracking.uri=sqlite:///x.db"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.data.flip is True
    assert cfg.data.train_limit is None and cfg.seed == 7 and cfg.tracking.uri == "sqlite:///x.db"


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key train\.epoch; did you mean train\.epochs\?"):
        load_config(None, ["train.epoch=3"])


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


@pytest.mark.parametrize("override, expected", [("train.epochs=abc", "expected int"),
                                                ("optim.lr=fast", "expected float"),
                                                ("data.normalize=maybe", "expected bool"),
                                                ("train.max_steps=x", "expected int or null")])
def test_wrong_type_names_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_impossible_values_name_what_is_allowed():
    with pytest.raises(ConfigError, match="model.kernel='cuda' is not allowed: auto, triton or torch"):
        load_config(None, ["model.kernel=cuda"])
    with pytest.raises(ConfigError, match=r"data\.resize=32 is too small .* is 67"):
        load_config(None, ["data.resize=32"])


def test_flatten_covers_every_key_and_hash_ignores_bookkeeping():
    cfg = load_config(None, [])
    assert sorted(flatten(cfg)) == sorted(all_keys())
    assert config_hash(cfg) == config_hash(load_config(None, ["train.progress=false", "run.name=x"]))
    assert config_hash(cfg) != config_hash(load_config(None, ["optim.lr=0.2"]))


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key train.epoch; did you mean train.epochs?"),
    ("train.epochs=three", "train.epochs='three' has the wrong type: expected int"),
    ("data.resize=64", "data.resize=64 is too small for the network"),
])
def test_cli_config_errors_exit_2_with_one_line_before_reading_data(override, message, capsys, tmp_path):
    # data.root points nowhere: a data error would show if the config were not checked first.
    code = main(["--config", str(REPO / "configs/d2l.yaml"), override, f"data.root={tmp_path / 'nowhere'}",
                 "tracking.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Fashion-MNIST" not in err
