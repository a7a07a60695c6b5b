"""`nin-bench traffic`: the model's byte and FLOP counts against hand arithmetic on small cases."""

import json

import pytest

from nin_dist.bench import traffic
from nin_dist.bench.__main__ import main

B = 2  # bf16 bytes


def test_fused_forward_counts():
    # M = 64 pixels, C = 16, tiles of 32 pixels and 16 channels: 2 programs, 1 hidden chunk.
    # An activation is 64·16·2 = 2048 bytes, a weight 16·16·2 = 512.
    (k,) = traffic.fused_forward(64, 16, {"BLOCK_M": 32, "BLOCK_H": 16, "BLOCK_K": 16}, block_c=16, b=B)
    assert k.hbm_bytes == 2048 + 2048 + 2 * 512 + 2 * 16 * 2  # x, y, both weights, both biases
    assert k.l2_bytes == 2048 + 2 * (2 * 512) + 2048  # x once per chunk, both weights per program, y
    assert k.flops == k.issued_flops == 4 * 64 * 16 * 16  # no padding at C = 16


def test_fused_forward_counts_padding():
    # C = 10 pads to 16-wide tiles: 2 programs · 32 pixels · 16 hidden · (16 K + 16 outputs) · 2
    (k,) = traffic.fused_forward(64, 10, {"BLOCK_M": 32, "BLOCK_H": 16, "BLOCK_K": 16}, block_c=16, b=B)
    assert k.issued_flops == 2 * 2 * 32 * 16 * (16 + 16) and k.flops == 4 * 64 * 10 * 10
    assert k.hbm_bytes == 2 * (64 * 10 * 2) + 2 * (10 * 16 * 2) + 2 * 10 * 2  # weights are [C, C_PAD]


TILES = {"hidden": {"BLOCK_M": 64, "BLOCK_H": 16, "BLOCK_K": 16},
         "dx": {"BLOCK_M": 64, "BLOCK_I": 16, "BLOCK_K": 16},
         "dw": {"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_M": 64}}


@pytest.mark.parametrize("chunks_fastest, l2_bytes, sweeps", [(True, 1000, 1), (False, 1000, 2), (False, 1e9, 1)])
def test_fused_backward_grid_order(chunks_fastest, l2_bytes, sweeps):
    # M = 128, C = 32: an activation is 8192 bytes, a weight 2048; 2 pixel tiles, 2 channel chunks.
    # Chunk-slowest re-reads what it sweeps only when that exceeds the L2.
    hidden, dx, dw, reduce, *_ = traffic.fused_backward(128, 32, TILES, 8, chunks_fastest, l2_bytes, b=B)
    assert hidden.hbm_bytes == 3 * 8192 * sweeps + 2 * 2048 + 3 * 8192  # x, y, dy; W1, W2; h, dz1, dz2
    assert dx.hbm_bytes == 8192 * sweeps + 8192 + 2048 + 8192  # dz1; x; W1; dx
    # dW: 2x2 weight tiles, 8 programs wanted -> 2 splits of 1 pixel tile: fp32 partials of C·C + C
    partials = 2 * (32 * 32 + 32) * 4
    assert dw.hbm_bytes == 2 * 8192 + partials and dw.l2_bytes == 2 * 8192 + 2 * 8192 + partials
    assert reduce.hbm_bytes == partials + (32 * 32 + 32) * 2


def test_eager_passes():
    # 7 kernels forward: 14 passes over a 2048-byte activation, plus each conv's 512-byte weight;
    # 9 backward: 3 ReLU backwards of 3 passes, 2 bias sums of 1, 4 convs of 2 (+ the weight)
    assert sum(k.hbm_bytes for k in traffic.eager_forward(64, 16, B)) == 14 * 2048 + 2 * 512
    assert sum(k.hbm_bytes for k in traffic.eager_backward(64, 16, B)) == 19 * 2048 + 4 * 512


def test_cli_prints_and_writes_every_block(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    assert main(["traffic", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 * 2 * 3  # blocks x directions x implementations
    fwd96 = next(r for r in rows if r["C"] == 96 and r["direction"] == "fwd" and r["impl"] == "fused")
    assert fwd96["gflop_issued"] / fwd96["gflop"] == pytest.approx(128**2 / 96**2)  # C = 96 runs 128-wide tiles
    assert "fwd+bwd on H100" in capsys.readouterr().out
