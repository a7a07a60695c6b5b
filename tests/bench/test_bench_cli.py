"""`nin-bench` commands run and write their JSON (the numbers themselves live in BENCHMARKS.md)."""

import json

import pytest
import torch

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
def test_bench_tta_reads_the_trainers_history(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    out = tmp_path / "tta.json"
    assert main(["tta", "--seeds", "0", "--target", "0.0,1.01", "--json", str(out), "data.train_limit=256",
                 "data.test_limit=100", "train.epochs=2", "train.batch_size=64"]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["epoch@0.0"] == 1 and 0 < row["tta_s@0.0"] < row["total_s"]  # reached at the first evaluation
    assert row["tta_s@1.01"] is None and result["median_s"]["1.01"] is None  # never reached


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
