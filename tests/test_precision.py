"""`train.precision=auto`: bf16 only where the device computes it natively, and the run records the
precision it really used."""

from __future__ import annotations

import platform

import pytest
import torch
import yaml
from helpers import overrides, train_in_process

from nin_dist.precision import cpu_flags, native_bf16, resolve

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16 vaes\n"
ZEN2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma vaes\n"
NEOVERSE_V1 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, expected", [(ZEN4, True), (ZEN2, False), (NEOVERSE_V1, True), ("", False)])
def test_bf16_flags_are_read_from_cpuinfo(tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags(cpuinfo)) is expected


def test_missing_cpuinfo_means_no_flags(tmp_path):
    assert cpu_flags(tmp_path / "absent") == set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's cpuid probes are x86 only")
def test_this_cpu_agrees_with_torchs_own_cpuid_probe():
    # torch asks cpuid itself (through its cpuinfo library), independently of /proc/cpuinfo.
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(torch.device("cpu")) is expected


def test_explicit_precisions_pass_through():
    for precision in ("fp32", "bf16", "fp64"):
        assert resolve(precision, torch.device("cpu")) == precision


def test_a_run_with_auto_records_the_precision_it_used(tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(out, data__train_limit=32, data__test_limit=32, train__batch_size=16, train__epochs=1,
                     train__precision="auto")
    assert train_in_process(args) == 0
    used = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == used
    assert f"train.precision=auto -> {used}" in capsys.readouterr().err
