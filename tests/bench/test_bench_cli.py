"""`nin-bench` commands run and write their JSON (the numbers themselves live in BENCHMARKS.md)."""

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from nin_dist.bench.__main__ import main


def test_bench_data_prints_both_pipelines_and_the_ratio(tmp_path, data_root, capsys):
    out = tmp_path / "data.json"
    assert main(["data", "--batches", "2", "--workers", "0", "--resize", "64", "--root", str(data_root),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    seed, ours, augmented = result["rows"]
    assert seed["ratio"] == 1.0 and ours["ratio"] == pytest.approx(seed["seconds"] / ours["seconds"])
    assert augmented["ratio"] == pytest.approx(seed["seconds"] / augmented["seconds"])
    printed = capsys.readouterr().out
    assert "ours: device-resident" in printed and "ours + augmentation (translate 2, flip, erase 0.5)" in printed

    assert main(["data", "--batches", "2", "--workers", "0", "--resize", "64", "--root", str(data_root),
                 "--repeats", "2", "--json", str(out)]) == 0
    augmented = json.loads(out.read_text())["rows"][2]  # each repeat's ratio is to its own seed pipeline
    assert augmented["ratio"] == pytest.approx(sum(r["ratio"] for r in augmented["repeats"]) / 2)


@pytest.mark.slow
def test_bench_train_rows_are_ratios_to_the_seed_row(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    out = tmp_path / "train.json"
    assert main(["train", "--steps", "2", "--warmup", "1", "--workers", "0", "--rows", "seed,+device",
                 "--repeats", "2", "--json", str(out), "train.batch_size=64"]) == 0
    seed, device = json.loads(out.read_text())["rows"]
    assert (seed["row"], device["row"]) == ("seed", "+device")
    assert seed["step_ratio"] == 1.0
    # Each repeat against the seed row of the same repeat; the row shows the median (of 2: the mean).
    ratios = [d["step_img_per_s"] / s["step_img_per_s"] for s, d in zip(seed["repeats"], device["repeats"],
                                                                       strict=True)]
    assert [r["step_ratio"] for r in device["repeats"]] == pytest.approx(ratios)
    assert device["step_ratio"] == pytest.approx(sum(ratios) / 2)
    assert device["step_img_per_s"] == pytest.approx(sum(r["step_img_per_s"] for r in device["repeats"]) / 2)


@pytest.mark.slow
def test_bench_scaling_pairs_each_repeat_with_its_own_one_process_job(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    out = tmp_path / "scaling.json"
    assert main(["scaling", "--steps", "3", "--repeats", "2", "--bucket-mb", "0.5", "--json", str(out),
                 "train.batch_size=32", "data.train_limit=256", "data.test_limit=64"]) == 0
    one, two = json.loads(out.read_text())["rows"]
    assert (one["processes"], two["processes"], two["bucket_mb"]) == (1, 2, "0.5")
    speedups = [b["img_per_s"] / a["img_per_s"] for a, b in zip(one["repeats"], two["repeats"], strict=True)]
    assert [r["speedup"] for r in two["repeats"]] == pytest.approx(speedups)
    assert two["efficiency"] == pytest.approx(sum(speedups) / 2 / 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_kernels_without_cuda_is_one_line_and_exit_2(capsys):
    assert main(["kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_tta_runs_configs_interleaved_and_sums_each_runs_epoch_seconds(tmp_path, data_root, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    out, runs = tmp_path / "tta.json", tmp_path / "runs"
    base, slower = "configs/cpu.yaml", "configs/cpu.yaml optim.lr=0.02"  # the second with an override of its own
    assert main(["tta", "--config", base, "--config", slower, "--seeds", "0,1", "--target", "0.0,1.01", "--out",
                 str(runs), "--json", str(out), "data.train_limit=128", "data.test_limit=100", "train.epochs=2",
                 "train.batch_size=64"]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["config"], r["seed"]) for r in rows] == [(base, 0), (slower, 0), (base, 1), (slower, 1)]
    # Each run's own folder, told apart by the config it saved.
    history = {}
    for path in runs.glob("*/seed-*/metrics.json"):
        cfg = yaml.safe_load((path.parent / "config.yaml").read_text())
        history[(slower if cfg["optim"]["lr"] == 0.02 else base, cfg["seed"])] = json.loads(path.read_text())["history"]
    assert sorted(history) == sorted((r["config"], r["seed"]) for r in rows)
    # They ran in the rows' order, one at a time: each run's first evaluation came after the last one's.
    ran = [history[(r["config"], r["seed"])] for r in rows]
    assert all(earlier[-1]["time"] < later[0]["time"] for earlier, later in zip(ran, ran[1:], strict=False))
    for row in rows:
        evaluations = history[(row["config"], row["seed"])]
        assert len(evaluations) == 2
        reached = next(i for i, h in enumerate(evaluations) if h["test_acc"] >= 0.0)
        assert row["epoch@0.0"] == evaluations[reached]["epoch"] == 1
        # the epochs' training seconds up to the reaching one (not the second epoch, not evaluations)
        assert row["train_s@0.0"] == pytest.approx(sum(h["epoch_s"] for h in evaluations[:reached + 1]))
        assert 0 < row["train_s@0.0"] < row["tta_s@0.0"] < row["total_s"]
        assert row["train_s@1.01"] is None and row["tta_s@1.01"] is None  # never reached
    summary = {(s["config"], s["target"]): s for s in result["summary"]}
    assert [(s["config"], s["target"]) for s in result["summary"]] == [(base, 0.0), (slower, 0.0), (base, 1.01),
                                                                        (slower, 1.01)]
    for label in (base, slower):
        seconds = [r["train_s@0.0"] for r in rows if r["config"] == label]
        finals = [history[(label, seed)][-1]["test_acc"] for seed in (0, 1)]
        assert summary[(label, 0.0)]["train_s_mean"] == pytest.approx(statistics.mean(seconds))
        assert summary[(label, 0.0)]["train_s_sd"] == pytest.approx(statistics.stdev(seconds))
        assert summary[(label, 0.0)]["train_s_median"] == pytest.approx(statistics.median(seconds))
        assert summary[(label, 0.0)]["final_acc_mean"] == pytest.approx(statistics.mean(finals))
        assert summary[(label, 0.0)]["final_acc_sd"] == pytest.approx(statistics.stdev(finals))
        unreached = summary[(label, 1.01)]
        assert (unreached["reached"], unreached["train_s_mean"], unreached["train_s_median"]) == (0, None, None)
        assert unreached["note"] == "not reached by 2 of 2 seeds: the mean is undefined"
    assert summary[(base, 0.0)]["ratio_to_baseline"] == 1.0
    assert summary[(slower, 0.0)]["ratio_to_baseline"] == pytest.approx(
        summary[(slower, 0.0)]["train_s_median"] / summary[(base, 0.0)]["train_s_median"])
    assert result["machine"]["cpu_avx512_bf16"] == ("avx512_bf16" in cpuinfo_flags())
    printed = capsys.readouterr().out
    assert f"CPU: {result['machine']['cpu']} (avx512_bf16: " in printed and "not reached by 2 of 2" in printed


def cpuinfo_flags() -> set[str]:
    """The first CPU's flags, read here as a reference for the benchmark's own reading."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.split(":")[0].strip() in ("flags", "Features")), set())


def test_tta_training_seconds_stop_at_the_epoch_that_reached_the_target():
    from nin_dist.bench.tta import training_seconds

    history = [{"epoch": 1, "test_acc": 0.5, "epoch_s": 10.0, "time": 100.0},
               {"epoch": 2, "test_acc": 0.8, "epoch_s": 7.0, "time": 120.0},
               {"epoch": 3, "test_acc": 0.9, "epoch_s": 5.0, "time": 140.0}]
    assert training_seconds(history, "test", 0.8) == history[1] | {"train_s": 17.0}
    assert training_seconds(history, "test", 0.85)["train_s"] == 22.0
    assert training_seconds(history, "test", 0.95) is None
    assert training_seconds(history, "val", 0.1) is None  # no val scores in this history


@pytest.mark.slow
def test_bench_tta_split_val_times_the_held_out_images(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    assert main(["tta", "--split", "val", "--seeds", "0", "data.train_limit=256"]) == 2
    assert "--split val: configs/cpu.yaml holds no images out; add data.val_size=N" in capsys.readouterr().err
    out = tmp_path / "tta.json"
    assert main(["tta", "--split", "val", "--seeds", "0", "--target", "0.0", "--json", str(out),
                 "data.train_limit=320", "data.val_size=64", "data.test_limit=100", "train.epochs=2",
                 "train.batch_size=64"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["epoch@0.0"] == 1 and row["final_val_acc"] is not None and row["final_test_acc"] is not None


@pytest.mark.parametrize("times, median", [([30.0, None, 10.0], 30.0), ([None, 5.0, None], None),
                                           ([3.0, 1.0, 2.0], 2.0), ([4.0, None], None)])
def test_tta_median_counts_a_seed_that_never_reached_the_target_as_slowest(times, median):
    from nin_dist.bench.tta import median_time

    assert median_time(times) == median


@pytest.mark.slow
def test_bench_ablate_deltas_are_paired_by_seed_from_each_runs_metrics(tmp_path, data_root, monkeypatch, capsys):
    from nin_dist.bench.ablate import NOISE_RULE

    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    out, runs = tmp_path / "ablate.json", tmp_path / "runs"
    assert main(["ablate", "--seeds", "0,1", "--workers", "2", "--cores", "2", "--change",
                 "smoothing: optim.label_smoothing=0.1", "--markdown", "--out", str(runs), "--json", str(out),
                 "data.train_limit=320", "data.val_size=64", "data.test_limit=100", "train.epochs=1",
                 "train.batch_size=32"]) == 0
    result = json.loads(out.read_text())
    # Each run's own folder, told apart by the config it saved: (label_smoothing, seed) -> its metrics.
    val, test = {}, {}
    for path in runs.glob("*/seed-*/metrics.json"):
        cfg, metrics = yaml.safe_load((path.parent / "config.yaml").read_text()), json.loads(path.read_text())
        assert cfg["train"]["threads"] == 1  # the 2 cores shared by the 2 workers
        key = (cfg["optim"]["label_smoothing"], cfg["seed"])
        val[key], test[key] = metrics["val_acc"], metrics["test_acc"]
    assert sorted(val) == [(0.0, 0), (0.0, 1), (0.1, 0), (0.1, 1)]
    base, change = result["variants"]
    assert (base["variant"], change["variant"], change["overrides"]) == ("base", "smoothing",
                                                                         ["optim.label_smoothing=0.1"])
    base_val = [val[(0.0, seed)] for seed in (0, 1)]
    deltas = [val[(0.1, seed)] - val[(0.0, seed)] for seed in (0, 1)]
    assert change["deltas"] == pytest.approx(deltas)
    assert change["delta_mean"] == pytest.approx(statistics.mean(deltas))
    assert change["delta_sd"] == pytest.approx(statistics.stdev(deltas))
    assert change["delta_se"] == pytest.approx(statistics.stdev(deltas) / 2 ** 0.5)
    assert change["within_noise"] == (abs(statistics.mean(deltas)) <= statistics.stdev(base_val))
    assert base["val_acc_mean"] == pytest.approx(statistics.mean(base_val))
    assert base["val_acc_sd"] == pytest.approx(statistics.stdev(base_val))
    assert change["val_acc_mean"] == pytest.approx(statistics.mean(val[(0.1, seed)] for seed in (0, 1)))
    assert change["test_acc_mean"] == pytest.approx(statistics.mean(test[(0.1, seed)] for seed in (0, 1)))
    printed = capsys.readouterr().out
    assert NOISE_RULE in printed
    assert f"| smoothing | `optim.label_smoothing=0.1` | {change['val_acc_mean']:.4f} ± " in printed  # Markdown


@pytest.mark.parametrize("change, val_size, message", [
    ("optim.label_smoothing", 64,
     "--change 'optim.label_smoothing': expected 'LABEL: key=value [key=value ...]' "
     "('optim.label_smoothing' is not key=value)"),
    ("smoothing: optim.label_smothing=0.1", 64,
     "--change 'smoothing': unknown config key optim.label_smothing; did you mean optim.label_smoothing?"),
    ("none: optim.label_smoothing=0", 64, "--change 'none' changes nothing"),  # configs/cpu.yaml has 0 already
    ("smoothing: optim.label_smoothing=0.1", 0,
     "ablate compares validation accuracy: configs/cpu.yaml holds no images out; add data.val_size=N"),
])
def test_bench_ablate_bad_input_is_one_line_before_any_training(tmp_path, capsys, change, val_size, message):
    runs = tmp_path / "runs"
    assert main(["ablate", "--out", str(runs), "--change", change, f"data.val_size={val_size}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nin-bench: error: {message}" in err
    assert not runs.exists()  # no run was started


@pytest.mark.parametrize("text, label, overrides", [
    ("no smoothing: optim.label_smoothing=0 train.tta=false", "no smoothing",
     ("optim.label_smoothing=0", "train.tta=false")),
    ("optim.lr=0.1", "optim.lr=0.1", ("optim.lr=0.1",)),  # no label: the overrides name it
    ("tracking.uri=http://host:5000", "tracking.uri=http://host:5000", ("tracking.uri=http://host:5000",)),
    ("run: run.name='a b'", "run", ("run.name=a b",)),  # quoted as a shell would
])
def test_ablate_change_syntax(text, label, overrides):
    from nin_dist.bench.ablate import Variant, parse_change

    assert parse_change(text) == Variant(label, overrides)
