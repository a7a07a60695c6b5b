"""Config: YAML + dotted overrides, typed conversion, and one-line errors (exit 2) before any work."""

import os
import re
from pathlib import Path

import pytest
import torch

from nin_dist.config import (
    MAX_EPOCHS,
    MAX_STEPS,
    SEED_LIMIT,
    TEST_IMAGES,
    TRAIN_IMAGES,
    Config,
    ModelConfig,
    all_keys,
    config_hash,
    default_dist_timeout_s,
    dump_yaml,
    flatten,
    load_config,
    model_relevant,
)
from nin_dist.errors import ConfigError
from nin_dist.shapes import parameter_count
from nin_dist.train import main

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = ("configs/d2l.yaml", "configs/cpu.yaml", "configs/fast.yaml", "configs/quick.yaml", "configs/best.yaml")
FLOAT_KEYS = [key for key, value in flatten(Config()).items() if isinstance(value, float)]


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
    # How long a lost peer takes to find does not change the weights: a restart may set another.
    assert config_hash(cfg) == config_hash(load_config(None, ["train.dist_timeout_s=30"]))
    assert config_hash(cfg) != config_hash(load_config(None, ["optim.lr=0.2"]))


def test_widths_and_kernels_from_the_command_line_or_yaml_build_that_network(tmp_path):
    from nin_dist.model import NiN

    cli = load_config(None, ["model.widths=32,96,192", "model.kernels=[3, 7,1]"])
    assert (cli.model.widths, cli.model.kernels, cli.model.block_widths) == ((32, 96, 192), (3, 7, 1), (32, 96, 192))
    blocks = [NiN(cli.model)[i][0] for i in (0, 2, 4, 7)]
    assert [(b.out_channels, b.kernel_size[0]) for b in blocks] == [(32, 11), (96, 3), (192, 7), (10, 1)]
    (tmp_path / "c.yaml").write_text("model:\n  widths: [32, 96, 192]\n  kernels: [3, 7, 1]\n")
    assert load_config(tmp_path / "c.yaml") == cli
    (tmp_path / "run.yaml").write_text(dump_yaml(cli))  # a run's config.yaml reads back to the same network
    assert load_config(tmp_path / "run.yaml") == cli
    assert load_config(None, ["model.widths=null"]).model.widths is None
    assert load_config(None, ["model.width=0.5"]).model.block_widths == (48, 128, 192)  # model.width's rule
    for bad in ("widths: 32", "widths: [32, true, 192]", "widths: [32, [96], 192]", "kernels: {a: 1}"):
        (tmp_path / "bad.yaml").write_text(f"model:\n  {bad}\n")
        with pytest.raises(ConfigError, match=r"^model\.(widths|kernels)=.* has the wrong type: expected a list of"):
            load_config(tmp_path / "bad.yaml")


def test_the_new_model_keys_at_the_seeds_values_keep_existing_hashes():
    """A config that leaves the later keys (model.widths, model.kernels) at what earlier runs
    computed hashes as those runs' configs did (their checkpoints resume, a sweep's study takes its
    worker back); any other value is a different run."""
    seed = load_config(None, [])
    later = {"model.widths", "model.kernels"}
    assert not later & set(model_relevant(seed))
    # The hashes the code before these keys computed (git 2ed6483) for the defaults, cpu.yaml and fast.yaml.
    assert [config_hash(seed), config_hash(load_config(REPO / "configs/cpu.yaml")),
            config_hash(load_config(REPO / "configs/fast.yaml"))] == ["bc9195625aef0b08", "e3ad45323b10f698",
                                                                      "21cd2abb281b59d9"]
    assert config_hash(load_config(None, ["model.kernels=5,3,3"])) == config_hash(seed)
    assert config_hash(load_config(None, ["model.widths=96,256,384"])) != config_hash(seed)
    assert config_hash(load_config(None, ["model.kernels=5,3,1"])) != config_hash(seed)


def _error_lines(stderr: str) -> list[str]:
    """The `nin-train: error:` lines (torch's own warnings may share stderr); no traceback allowed."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("nin-train: error: ")]


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key train.epoch; did you mean train.epochs?"),
    ("train.epochs=three", "train.epochs='three' has the wrong type: expected int"),
    ("data.resize=64", "data.resize=64 is too small for the network"),
    ("model.widths=32,96", "model.widths=[32, 96] is not allowed: null or three channel counts, of blocks 1-3"),
    ("model.widths=32,96,192,384", "model.widths=[32, 96, 192, 384] is not allowed: null or three channel counts"),
    ("model.widths=32,x,192", "model.widths='32,x,192' has the wrong type: expected a list of int"),
    ("model.widths=32,96.5,192", "model.widths='32,96.5,192' has the wrong type: expected a list of int"),
    ("model.widths=0,96,192", "model.widths=[0, 96, 192] is not allowed: channel counts from 1 to 6144"),
    ("model.widths=32,96,6145", "model.widths=[32, 96, 6145] is not allowed: channel counts from 1 to 6144"),
    ("model.width=0.5 model.widths=32,96,192",
     "model.widths=[32, 96, 192] and model.width=0.5 both set the channels: set one of them"),
    ("model.kernels=5,3", "model.kernels=[5, 3] is not allowed: three kernel sizes, of blocks 2-4"),
    ("model.kernels=5,4,3", "model.kernels=[5, 4, 3] is not allowed: odd kernel sizes from 1 to 31"),
    ("model.kernels=5,3,33", "model.kernels=[5, 3, 33] is not allowed: odd kernel sizes from 1 to 31"),
    ("model.kernels=-1,3,3", "model.kernels=[-1, 3, 3] is not allowed: odd kernel sizes from 1 to 31"),
    ("model.kernels=null", "model.kernels cannot be null: expected a list of int"),
    ("model.kernels=,", "model.kernels=',' has the wrong type: expected a list of int"),
])
def test_cli_config_errors_exit_2_with_one_line_before_reading_data(override, message, capsys, tmp_path):
    # data.root points nowhere: a data error would show if the config were not checked first.
    # `override` may hold several, space-separated.
    code = main(["--config", str(REPO / "configs/d2l.yaml"), *override.split(" "), f"data.root={tmp_path / 'nowhere'}",
                 "data.download=false", "tracking.enabled=false", f"run.out_dir={tmp_path / 'run'}"])
    err = _error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Fashion-MNIST" not in err[0]


# --------------------------------------------------------------------------- hostile input

def _big_int_text() -> str:
    return "1" + "0" * 5000


@pytest.mark.parametrize("content, message", [
    (b"1: 2\n", "config key 1 is not a name (int)"),
    (b"train: {3: 4}\n", "config key 3 in section train is not a name (int)"),
    (b"~: 1\n", "config key None is not a name (NoneType)"),
    (b"\xff\xfe\x00t\x00r", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"seed: \xe9\n", "not UTF-8 text (byte 0xe9 at offset 6)"),
    (b"- 1\n- 2\n", "expected a mapping of config keys at the top level, not list [1, 2]"),
    (b"42\n", "expected a mapping of config keys at the top level, not int 42"),
    (b"train: [1, 2]\n", "train must be a mapping of keys, not list [1, 2]"),
    (b"model: 0.5\n", "model must be a mapping of keys, not float 0.5"),
    (b"train: {epochs: [1]}\n", "train.epochs=[1] has the wrong type: expected int"),
    (b"seed: 2020-13-01\n", "YAML holds a value that cannot be read (month must be in 1..12)"),
    (b"seed: " + _big_int_text().encode() + b"\n", "YAML holds a value that cannot be read"),
    (b"model: {width: 1" + b"0" * 400 + b"}\n", "is not allowed: a finite number"),
    (b"a: &a [*a]\nseed: *a\n", "unknown config key a"),
    (b"seed: [[[[[[[[[[1]]]]]]]]]]\n", "seed=[[[...]]] has the wrong type"),
    (b"data: {root: \"a\\0b\"}\n", "data.root='a\\x00b' is not allowed: text without NUL"),
    (b"train: {epochs: 2\n", "not valid YAML"),
])
def test_bad_yaml_is_one_config_error(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_empty_yaml_and_empty_sections_are_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    (tmp_path / "sections.yaml").write_text("train:\nmodel:\n")
    assert load_config(tmp_path / "empty.yaml") == load_config(tmp_path / "sections.yaml") == Config()
    assert load_config(tmp_path / "sections.yaml", ["train.epochs=2"]).train.epochs == 2


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "c.yaml"


def _unreadable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root reads a file without read permission")
    path = tmp_path / "secret.yaml"
    path.write_text("seed: 1\n")
    path.chmod(0)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp, "is a folder, not a YAML file"),
    (lambda tmp: tmp / "missing.yaml", "no such file"),
    (_under_a_file, "cannot read it (Not a directory)"),
    (_unreadable, "cannot read it (Permission denied)"),
])
def test_unreadable_config_path_is_one_config_error(tmp_path, make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(make(tmp_path))


def test_the_dist_timeout_default_follows_what_a_step_does():
    """null: two minutes for an eager step on a CPU, ten on a GPU (Triton JIT, nccl set-up), half an hour
    where the first step waits for the slowest rank's cold torch.compile (on a CPU alone it can pass 120 s)."""
    assert default_dist_timeout_s(compile=False, device_type="cpu") == 120
    assert default_dist_timeout_s(compile=False, device_type="cuda") == 600
    assert default_dist_timeout_s(compile=True, device_type="cpu") == default_dist_timeout_s(True, "cuda") == 1800
    assert load_config(None, []).train.dist_timeout_s is None  # resolved at start-up, once the device is known


DIST_TIMEOUT_RANGE = "null (120 s on a CPU, 600 s on a GPU, 1800 s with train.compile) or 1 to 86400 seconds"


@pytest.mark.parametrize("override, allowed", [
    *[(f"{key}={value}", "a finite number") for key in FLOAT_KEYS for value in ("inf", "-inf", "nan", "1e400")],
    ("model.width=1e9", "a positive multiplier up to 16"),
    ("model.width=0", "a positive multiplier"),
    ("data.resize=100000", "1 to 2048 pixels"),
    (f"seed={10**20}", "an integer from 0 to 2**63 - 1"),
    (f"seed={2**63}", "an integer from 0 to 2**63 - 1"),
    ("seed=-1", "an integer from 0 to 2**63 - 1"),
    ("tracking.timeout_s=0", "a positive number of seconds up to 3600"),
    ("tracking.timeout_s=-1", "a positive number of seconds up to 3600"),
    ("tracking.timeout_s=86400", "a positive number of seconds up to 3600"),
    ("tracking.experiment=", "a non-empty name"),
    (f"train.epochs={10**30}", "at least 1 (at most 1000000)"),
    (f"train.max_steps={10**13}", "null or 1 to 1e+12"),
    (f"train.log_every={10**13}", "at most 1e+12"),
    (f"train.checkpoint_every={10**13}", "up to 1e+12"),
    (f"train.eval_batch_size={10**30}", "a batch from 1 to 60000"),
    (f"train.threads={2**31}", "null or 1 to 1024"),
    ("train.bucket_cap_mb=1e300", "a positive size in MiB up to 65536"),
    ("train.dist_timeout_s=0", DIST_TIMEOUT_RANGE),
    ("train.dist_timeout_s=0.5", DIST_TIMEOUT_RANGE),
    ("train.dist_timeout_s=-1", DIST_TIMEOUT_RANGE),
    ("train.dist_timeout_s=1e6", DIST_TIMEOUT_RANGE),
    ("train.dist_timeout_s=inf", "a finite number"),
    (f"data.train_limit={10**30}", "null or a count from 1 to 60000"),
    ("data.test_limit=10001", "null or a count from 1 to 10000"),
    ("model.stem_kernel=100000", "a kernel size from 1 to 2048"),
    ("model.stem_stride=100000", "a stride from 1 to 2048"),
    ("model.stem_padding=11", "0 to model.stem_kernel - 1 = 10 pixels"),
    ("optim.momentum=1", "in [0, 1)"),
    ("optim.warmup_epochs=11", "at most train.epochs=10"),
    ("data.val_size=60000", "0 to 59999 images"),
    ("data.val_size=-1", "0 to 59999 images"),
    ("data.translate=15", "0 to 14 pixels"),
    ("data.erase=1.5", "a probability in [0, 1]"),
    ("train.ema_decay=1", "in [0, 1) (0 = off)"),
    ("tracking.parent_run_id=../x", "null or an MLflow run id"),
    ("tracking.register_model=a@b", "null or a model name"),
    ("train.progress=fancy", "auto, bar, lines or off (true = auto, false = off)"),
])
def test_every_value_is_range_checked(override, allowed):
    with pytest.raises(ConfigError, match=re.escape(allowed)) as err:
        load_config(None, [override])
    assert str(err.value).startswith(override.partition("=")[0] + "=")


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=60001"], "train.batch_size=60001 is larger than the 60000 training images"),
    (["data.train_limit=100", "train.batch_size=128"],
     "train.batch_size=128 is larger than the 100 training images (data.train_limit=100)"),
    (["model.width=16", "model.stem_kernel=1024", "model.stem_padding=0", "data.resize=2048"],
     "model.width=16.0 is not allowed: a network of at most 1e+09 parameters"),
    (["model.stem_kernel=2048", "model.stem_stride=2048"], "no input up to 2048 pixels fits this stem"),
    (["model.widths=6144,6144,6144", "model.kernels=31,31,31"],
     "model.widths=[6144, 6144, 6144] is not allowed: a network of at most 1e+09 parameters"),
    (["tracking.log_model=false", "tracking.register_model=m"], "null when tracking.log_model=false"),
])
def test_cross_field_bounds(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_largest_values_allowed_load():
    cfg = load_config(None, [f"seed={SEED_LIMIT - 1}", "model.width=16", "data.resize=2048", "train.epochs=1000000",
                             "train.batch_size=60000", "train.threads=1024", "tracking.timeout_s=3600",
                             "train.dist_timeout_s=86400",
                             "optim.warmup_epochs=1000000", f"train.max_steps={MAX_STEPS}"])
    assert cfg.seed == SEED_LIMIT - 1 and cfg.model.width == 16.0


def test_seed_bound_fits_torch_generators():
    # The largest seed, epoch and step the config allows still give seeds torch accepts.
    from nin_dist.data import epoch_order
    from nin_dist.layers import dropout_seed

    epoch_order(10, SEED_LIMIT - 1, MAX_EPOCHS)
    torch.Generator().manual_seed(dropout_seed(SEED_LIMIT - 1, MAX_STEPS))


def test_split_sizes_and_parameter_count_match_the_real_ones():
    from nin_dist.data import FILES
    from nin_dist.model import NiN

    assert (FILES[("train", "labels")].count, FILES[("test", "labels")].count) == (TRAIN_IMAGES, TEST_IMAGES)
    for model in (ModelConfig(), ModelConfig(width=0.3, batchnorm=True, stem_kernel=5, stem_stride=1, stem_padding=2),
                  ModelConfig(widths=(20, 52, 100), kernels=(7, 1, 5), batchnorm=True, stem_kernel=3)):
        expected = sum(p.numel() for p in NiN(model).parameters())
        assert parameter_count(model.block_widths, model.kernels, model.stem_kernel, model.batchnorm) == expected


@pytest.mark.parametrize("yaml_text, override", [
    ("1: 2\n", None),
    ("train: {3: 4}\n", None),
    (None, "model.width=inf"),
    (None, f"seed={10**20}"),
    (None, "optim.warmup_epochs=inf"),
    (None, "tracking.timeout_s=nan"),
    (None, "train.dist_timeout_s=0"),
])
def test_cli_hostile_input_exits_2_with_one_line(tmp_path, capsys, yaml_text, override):
    argv = [f"data.root={tmp_path / 'nowhere'}", "data.download=false", "tracking.enabled=false",
            f"run.out_dir={tmp_path / 'run'}"]
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    code = main(argv + ([override] if override else []))
    err = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "Fashion-MNIST" not in err[0]
