import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vorta_ops import dispatch
from vorta_ops.__main__ import main
from vorta_ops.demo import DEMO_TAU, reference_attention, run_demo, synthetic_video_qkv
from vorta_ops.profiling import HeadProfile
from vorta_ops.router import CORESET, FULL, SLIDING
from vorta_ops.full import full_attention
from vorta_ops.coreset import coreset_attention
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_attention
from vorta_ops.viz import BRANCH_COLORS, render_decisions


def test_demo_writes_a_readable_picture_and_summary(tmp_path):
    s = run_demo(tmp_path, grid=(4, 8, 8), heads=4, head_dim=32, blocks=5, steps=3, tile=(2, 4, 4), log=lambda *_: None)
    img = Image.open(s["png"])
    assert img.size[0] >= 420 and img.size[1] > 100
    summary = json.loads((tmp_path / "vorta_demo_summary.json").read_text())
    assert summary["reference"].startswith("float64")
    full = summary["branches"]["full"]  # the pack's full branch against the independent float64 reference
    assert full["rel_err"] < 1e-5 and full["max_abs_err"] < 1e-5
    assert len(summary["steps"]) == 3
    assert abs(sum(summary["steps"][0]["shares"].values()) - 1.0) < 1e-9
    for row in summary["steps"]:
        assert row["block0_dispatch_max_abs"] < 1e-5  # every head is exactly its branch's output
        assert 0.0 <= row["block0_rel_err"] < 1.0


SMALL = dict(grid=(4, 8, 8), heads=4, head_dim=32, blocks=2, steps=4, tile=(1, 2, 2), log=lambda *_: None)


def test_reference_attention_is_plain_softmax_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v, chunk_bytes=8 * 5 * 2)  # 2 query rows per chunk
    assert ref.dtype == torch.float64
    for b in range(2):
        for h in range(3):
            for i in range(5):  # one query at a time, straight from the formula
                w = [math.exp(float(q[b, h, i] @ k[b, h, j]) / 2.0) for j in range(5)]
                o = sum(wj * v[b, h, j].double() for wj, j in zip(w, range(5))) / sum(w)
                assert torch.allclose(ref[b, h, i], o, atol=1e-12)
    same_keys = reference_attention(q, k[:, :, :1].expand_as(k), v)  # equal keys: the mean of v
    assert torch.allclose(same_keys, v.double().mean(2, keepdim=True).expand_as(same_keys), atol=1e-12)


@pytest.mark.parametrize("broken", ["zeros", "heads swapped"])
def test_demo_full_error_catches_a_wrong_full_branch(tmp_path, monkeypatch, broken):
    """The demo's full-branch error is measured against an independent reference: a full branch
    that returns a wrong result shows up as a large error."""
    real = dispatch.full_attention

    def wrong(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return torch.zeros_like(out) if broken == "zeros" else out.flip(1)

    monkeypatch.setattr(dispatch, "full_attention", wrong)
    s = run_demo(tmp_path, **SMALL)
    assert s["branches"]["full"]["rel_err"] > 0.3
    assert s["branches"]["full"]["max_abs_err"] > 0.1


def test_demo_dispatch_check_catches_heads_given_to_the_wrong_branch(tmp_path, monkeypatch):
    """The routed-layer check compares the routed output with each head's own branch output (not
    the routed output with itself): a dispatch that runs branches on the wrong heads is caught."""
    s = run_demo(tmp_path / "ok", **SMALL)
    mixed = [r for r in s["steps"] if len(set(r["block0_branches"])) > 1]
    assert mixed, "the profiled routing should mix branches in block 0 (local heads tile, global heads core-set)"
    assert all(r["block0_dispatch_max_abs"] < 1e-5 for r in s["steps"])
    real = dispatch.head_groups

    def rotated(branches):
        H = len(branches)
        return {b: sorted((h + 1) % H for h in idx) for b, idx in real(branches).items()}

    monkeypatch.setattr(dispatch, "head_groups", rotated)
    bad = run_demo(tmp_path / "bad", **SMALL)
    for r in bad["steps"]:
        if len(set(r["block0_branches"])) > 1:
            assert r["block0_dispatch_max_abs"] > 1e-2, r


def test_demo_routes_local_heads_to_sliding_tile_and_global_heads_to_coreset(tmp_path):
    """The demo routes training-free: its most local synthetic head (head 0 of block 0; blocks b > 0
    hold their heads rolled by b) goes to sliding tile, its most global one to core-set, in every
    block at every step, because that is what the measured errors say at the demo's tau."""
    s = run_demo(tmp_path, **SMALL)
    H = SMALL["heads"]
    routing = json.loads((tmp_path / "vorta_demo_summary.json").read_text())["routing"]
    assert routing["tau"] == DEMO_TAU and routing["bins"] == SMALL["steps"]
    for row in s["steps"]:
        assert row["block0_branches"][0] == SLIDING and row["block0_branches"][-1] == CORESET, row
    for d in routing["profiles"]:
        prof = HeadProfile.from_dict(d)
        e = prof.errors[0]  # block 0: the errors behind the choice
        assert e[0, SLIDING] < 0.05 and e[0, CORESET] > DEMO_TAU  # local head: only the tile is close
        assert e[-1, CORESET] <= DEMO_TAU < e[-1, SLIDING]  # global head: only the core-set is close
        table = prof.table(DEMO_TAU)
        for b in range(SMALL["blocks"]):
            assert table[b, b % H] == SLIDING and table[b, (H - 1 + b) % H] == CORESET, (b, table)
    tiny = dict(SMALL, blocks=1, steps=1)
    dense = run_demo(tmp_path / "tau0", **tiny, tau=0.0)  # no error allowed: every head full, output dense
    assert dense["steps"][0]["shares"]["full"] == 1.0
    assert dense["steps"][0]["block0_rel_err"] < 1e-5


def test_run_demo_refuses_bad_arguments_before_writing(tmp_path):
    (tmp_path / "file").write_bytes(b"keep me")
    bad = [
        dict(grid=(0, 4, 4)), dict(heads=0), dict(head_dim=0), dict(head_dim=7), dict(blocks=0), dict(steps=0),
        dict(tile=(0, 2, 2)), dict(window=(2, 3, 3)), dict(device="foo"), dict(out_dir=tmp_path / "file"),
        dict(tau=-0.1), dict(tau=float("nan")),
    ]
    for kw in bad:
        args = {"out_dir": tmp_path / "out", "grid": (2, 4, 4), "tile": (1, 2, 2), "log": lambda *_: None, **kw}
        with pytest.raises(ValueError):
            run_demo(**args)
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "file").read_bytes() == b"keep me"


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


def _components(mask):
    """4-connected components of a bool image: list of (ys, xs) arrays."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        ys, xs = np.array(pix).T
        comps.append((ys, xs))
    return comps


def _is(img, colour):
    return np.all(img == np.array(colour, dtype=np.uint8), axis=-1)


def test_render_colours_each_cell_by_branch():
    """Two tables that differ only in four cells (a 2x2 swap, so every row, column, step and
    overall share stays the same): the pictures differ in exactly four cell-sized solid
    rectangles, each changing from the one branch's colour to the other's, at the places of
    those cells (rows = blocks: the rows are 3 cells apart, the columns 2)."""
    F, C, S = FULL, CORESET, SLIDING
    a = np.full((2, 6, 4), S, dtype=np.int8)  # steps, blocks, heads
    (r0, r1), (c0, c1) = (1, 4), (0, 2)
    a[1, r0, c0], a[1, r1, c1], a[1, r0, c1], a[1, r1, c0] = F, F, C, C
    b = a.copy()
    b[1, r0, c0], b[1, r1, c1], b[1, r0, c1], b[1, r1, c0] = C, C, F, F
    img_a, lay = render_decisions(a, title="t", return_layout=True)
    img_a, img_b = np.asarray(img_a), np.asarray(render_decisions(b, title="t"))
    assert img_a.shape == img_b.shape
    comps = _components(np.any(img_a != img_b, axis=-1))
    assert len(comps) == 4, f"{len(comps)} changed regions, expected the 4 swapped cells"
    boxes = []
    for ys, xs in comps:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert len(ys) == (y1 - y0) * (x1 - x0), "a changed region is not a solid rectangle"
        boxes.append((y0, x0, y1 - y0, x1 - x0))
    sizes = {(h, w) for _, _, h, w in boxes}
    assert len(sizes) == 1, sizes
    (h, w), = sizes
    assert h >= 2 and w >= 2
    boxes.sort()  # top-left, top-right, bottom-left, bottom-right
    tl, tr, bl, br = boxes
    assert tl[0] == tr[0] and bl[0] == br[0] and tl[1] == bl[1] and tr[1] == br[1]
    dy, dx = bl[0] - tl[0], tr[1] - tl[1]
    assert (r1 - r0) * h <= dy <= (r1 - r0) * (h + 3)  # rows are blocks
    assert (c1 - c0) * w <= dx <= (c1 - c0) * (w + 3)  # columns are heads
    for (y, x, _, _), (r, c) in zip((tl, tr, bl, br), ((r0, c0), (r0, c1), (r1, c0), (r1, c1))):
        before, after = img_a[y:y + h, x:x + w], img_b[y:y + h, x:x + w]
        assert _is(before, BRANCH_COLORS[a[1, r, c]]).all(), (r, c)
        assert _is(after, BRANCH_COLORS[b[1, r, c]]).all(), (r, c)
        # and that is where the layout says cell (r, c) of step 1 is
        (panel,) = [p for p in lay.panels if p.step == 1]
        cx, cy = panel.cell_center(r, c)
        assert y <= cy < y + h and x <= cx < x + w


def test_all_full_table_draws_no_other_branch_colour_outside_the_legend():
    t = np.full((3, 5, 7), FULL, dtype=np.int8)
    img, lay = render_decisions(t, title="t", return_layout=True)
    img = np.asarray(img)
    legend = np.zeros(img.shape[:2], dtype=bool)
    for it in lay.legend:
        x0, y0, x1, y1 = it.swatch
        legend[y0:y1, x0:x1] = True
    for other in (CORESET, SLIDING):
        assert _is(img, BRANCH_COLORS[other])[legend].any()  # the legend shows every branch
        assert not (_is(img, BRANCH_COLORS[other]) & ~legend).any(), f"branch {other} colour outside the legend"
    full_px = _is(img, BRANCH_COLORS[FULL]) & ~legend
    assert full_px.sum() >= 3 * 5 * 7 * 4  # the cells are drawn, at least 2x2 px each
    for p in lay.panels:  # every cell centre is full
        for i in range(5):
            for j in range(7):
                cx, cy = p.cell_center(i, j)
                assert full_px[cy, cx]
