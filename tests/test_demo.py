import json

import numpy as np
from PIL import Image

from vorta_ops.__main__ import main
from vorta_ops.demo import run_demo, synthetic_video_qkv
from vorta_ops.full import full_attention
from vorta_ops.coreset import coreset_attention
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_attention
from vorta_ops.viz import BRANCH_COLORS, render_decisions


def test_demo_writes_a_readable_picture_and_summary(tmp_path):
    s = run_demo(tmp_path, grid=(4, 8, 8), heads=4, head_dim=32, blocks=5, steps=3, tile=(2, 4, 4), log=lambda *_: None)
    img = Image.open(s["png"])
    assert img.size[0] >= 420 and img.size[1] > 100
    summary = json.loads((tmp_path / "vorta_demo_summary.json").read_text())
    assert summary["branches"]["full"]["max_abs_err"] == 0.0
    assert len(summary["steps"]) == 3
    assert abs(sum(summary["steps"][0]["shares"].values()) - 1.0) < 1e-9


def test_cli_demo_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--grid", "2,4,4", "--tile", "1,2,2", "--steps", "2", "--heads", "2"]) == 0
    assert (tmp_path / "vorta_demo_routing.png").exists()


def test_synthetic_video_has_local_and_global_heads():
    grid = (8, 16, 24)  # tiles (2,4,4): 4x4x6 tiles, so a 3x3x3 window is sparse
    q, k, v = synthetic_video_qkv(grid, heads=4, head_dim=32)
    dense = full_attention(q, k, v)
    rel = lambda o: ((o - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2)))[0]
    slide = rel(sliding_tile_attention(q, k, v, grid, SlidingTileConfig((2, 4, 4))))
    core = rel(coreset_attention(q, k, v, grid))
    assert slide[0] < 0.05 and slide[0] < core[0]  # the most local head: sliding tile wins
    assert core[-1] < slide[-1]  # the most global head: core-set wins


def test_render_colours_each_cell_by_branch():
    tables = np.zeros((2, 3, 4), dtype=np.int8)
    tables[1] = 2
    tables[1, 0, 0] = 1
    img = np.asarray(render_decisions(tables, title="t"))
    for c in BRANCH_COLORS:  # all three branches are drawn (cells and legend)
        assert np.any(np.all(img == np.array(c, dtype=np.uint8), axis=-1))
