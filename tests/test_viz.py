"""Geometry and colours of the routing picture (vorta_ops.viz), from 1x1x1 up to 40x40x50."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from vorta_ops import viz
from vorta_ops.viz import BRANCH_COLORS, layout_decisions, render_decisions, step_label

LONG = "a very long label from the caller that cannot fit over one small panel " * 3

# name: (steps, blocks, heads, kwargs for render_decisions)
CASES = {
    "2x2x1": (1, 2, 2, {}),
    "3x4x2": (2, 3, 4, {"sigmas": torch.linspace(1.0, 0.0, 3)}),
    "5x40x3": (3, 5, 40, {"sigmas": [0.99, 0.5, 0.01]}),
    "40x40x50": (50, 40, 40, {"sigmas": torch.linspace(14.6, 0.0, 51)}),
    "1x1x1": (1, 1, 1, {}),
    "40x2x20": (20, 40, 2, {"sigmas": np.linspace(1.0, 0.05, 20)}),
    "long_labels": (4, 6, 8, {"step_labels": [f"step {i} · σ 0.5 {LONG}" for i in range(4)]}),
    "long_title_narrow": (3, 2, 2, {"title": "VORTA predicted routing " + LONG, "max_width": 300}),
    "many_tiny_steps": (200, 2, 2, {"max_width": 400}),
}


def _tables(steps, blocks, heads, seed=0):
    return np.random.default_rng(seed).integers(0, 3, size=(steps, blocks, heads)).astype(np.int8)


@functools.lru_cache(maxsize=None)
def _rendered(name):
    steps, blocks, heads, kw = CASES[name]
    t = _tables(steps, blocks, heads)
    kw = dict(kw)
    img, lay = render_decisions(t, kw.pop("step_labels", None), return_layout=True, **kw)
    return t, np.asarray(img), lay


def _objects(lay):
    """(name, box) of everything drawn that must not overlap anything else."""
    out = [(f"{tb.kind} {tb.text!r} (step {tb.step})", tb.box) for tb in lay.texts]
    out += [(f"swatch {it.branch}", it.swatch) for it in lay.legend]
    for p in lay.panels:
        x0, y0, x1, y1 = p.box
        out.append((f"panel {p.step} (with outline)", (x0 - 1, y0 - 1, x1 + 1, y1 + 1)))
        out.append((f"bar {p.step}", p.bar))
    if lay.strip is not None:
        x0, y0, x1, y1 = lay.strip.box
        out.append(("share strip (with outline)", (x0 - 1, y0 - 1, x1 + 1, y1 + 1)))
        # the marks may touch each other; together they are one row under the strip
        mx0, my0 = min(m[0] for m in lay.strip.marks), min(m[1] for m in lay.strip.marks)
        mx1, my1 = max(m[2] for m in lay.strip.marks), max(m[3] for m in lay.strip.marks)
        out.append(("strip marks", (mx0, my0, mx1, my1)))
    return out


def _overlaps(objs):
    b = np.array([o[1] for o in objs], dtype=np.int64)
    hit = (
        (b[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < b[:, None, 2])
        & (b[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < b[:, None, 3])
    )
    np.fill_diagonal(hit, False)
    return [(objs[i][0], objs[i][1], objs[j][0], objs[j][1]) for i, j in zip(*np.nonzero(np.triu(hit)))]


def _wrong_cells(img, lay, t, max_cells=400, seed=0):
    """Cells whose centre pixel is not exactly their branch's colour (a sample of max_cells per panel)."""
    rng = np.random.default_rng(seed)
    wrong = []
    for p in lay.panels:
        cells = [(i, j) for i in range(p.blocks) for j in range(p.heads)]
        if len(cells) > max_cells:
            cells = [cells[k] for k in rng.choice(len(cells), max_cells, replace=False)]
        for i, j in cells:
            x, y = p.cell_center(i, j)
            if tuple(img[y, x]) != BRANCH_COLORS[int(t[p.step, i, j])]:
                wrong.append((p.step, i, j))
    return wrong


@pytest.mark.parametrize("name", list(CASES))
def test_nothing_overlaps(name):
    _, _, lay = _rendered(name)
    assert lay.texts and lay.panels
    assert _overlaps(_objects(lay)) == []


@pytest.mark.parametrize("name", list(CASES))
def test_everything_inside_a_sane_image(name):
    _, img, lay = _rendered(name)
    assert img.shape == (lay.height, lay.width, 3)
    assert 100 <= lay.width <= 2000 and 100 <= lay.height <= 2000
    for what, (x0, y0, x1, y1) in _objects(lay):
        assert 0 <= x0 < x1 <= lay.width and 0 <= y0 < y1 <= lay.height, (what, (x0, y0, x1, y1), img.shape)
    assert len(lay.legend) == 3 and [it.branch for it in lay.legend] == [0, 1, 2]
    assert lay.texts_of("title") and lay.texts_of("key")


@pytest.mark.parametrize("name", list(CASES))
def test_cell_centres_have_their_branch_colour(name):
    t, img, lay = _rendered(name)
    assert _wrong_cells(img, lay, t) == []
    for it in lay.legend:  # and the legend swatches theirs
        x0, y0, x1, y1 = it.swatch
        assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == BRANCH_COLORS[it.branch]


def test_cell_colour_check_catches_a_wrong_cell():
    t, img, lay = _rendered("40x40x50")
    p = lay.panels[5]
    t2 = t.copy()
    t2[p.step, 23, 7] = (t2[p.step, 23, 7] + 1) % 3  # the picture still shows the old branch there
    assert _wrong_cells(img, lay, t2, max_cells=40 * 40) == [(p.step, 23, 7)]
    img2 = img.copy()  # and a picture painted wrongly is caught against the right table
    x, y = p.cell_center(0, 0)
    img2[y, x] = BRANCH_COLORS[(int(t[p.step, 0, 0]) + 1) % 3]
    assert (p.step, 0, 0) in _wrong_cells(img2, lay, t, max_cells=40 * 40)


def test_cells_are_visible_and_panels_readable():
    for name in ("2x2x1", "1x1x1", "3x4x2"):
        _, _, lay = _rendered(name)
        assert all(p.cell_w >= 16 and p.cell_h >= 16 for p in lay.panels), name
    _, _, lay = _rendered("40x40x50")
    assert all(p.cell_w >= 4 and p.cell_h >= 4 for p in lay.panels)
    _, _, lay = _rendered("40x2x20")  # tall and thin: cells get wider so both heads are numbered
    assert all(p.cell_w > p.cell_h for p in lay.panels)


@pytest.mark.parametrize("name", list(CASES))
def test_block_and_head_numbers(name):
    steps, blocks, heads, _ = CASES[name]
    _, _, lay = _rendered(name)
    for p in lay.panels:
        bt = {tb.index: tb for tb in lay.texts_of("block_tick") if tb.step == p.step}
        ht = {tb.index: tb for tb in lay.texts_of("head_tick") if tb.step == p.step}
        assert {0, blocks - 1} <= set(bt) and {0, heads - 1} <= set(ht)  # all these cases have room
        for idx, tb in bt.items():
            assert tb.text == str(idx)
            cy = (tb.box[1] + tb.box[3]) / 2  # beside its row, left of the panel
            assert p.y + idx * p.cell_h - 1 <= cy <= p.y + (idx + 1) * p.cell_h + 1 and tb.box[2] <= p.x
        for idx, tb in ht.items():
            assert tb.text == str(idx)
            cx = (tb.box[0] + tb.box[2]) / 2  # over its column, above the panel
            assert p.x + idx * p.cell_w - 1 <= cx <= p.x + (idx + 1) * p.cell_w + 1 and tb.box[3] <= p.y
        for ticks in (sorted(bt), sorted(ht)):  # every k-th, the last one may be the final index
            steps_between = np.diff(ticks[:-1]) if len(ticks) > 2 else []
            assert len(set(steps_between)) <= 1
    key = " ".join(tb.full for tb in lay.texts_of("key"))
    assert "block" in key and "head" in key


def test_tick_spacing_thins_out_at_40():
    _, _, lay = _rendered("40x40x50")
    p = lay.panels[0]
    bt = sorted(tb.index for tb in lay.texts_of("block_tick") if tb.step == p.step)
    ht = sorted(tb.index for tb in lay.texts_of("head_tick") if tb.step == p.step)
    assert bt[:3] == [0, 5, 10] and bt[-1] == 39 and ht[:3] == [0, 5, 10] and ht[-1] == 39
    _, _, lay = _rendered("3x4x2")
    assert sorted(tb.index for tb in lay.texts_of("head_tick") if tb.step == 0) == [0, 1, 2, 3]


def test_one_block_one_head_has_its_single_ticks():
    _, _, lay = _rendered("1x1x1")
    assert [tb.index for tb in lay.texts_of("block_tick")] == [0]
    assert [tb.index for tb in lay.texts_of("head_tick")] == [0]


def test_summarised_picture_says_so():
    t, _, lay = _rendered("40x40x50")
    assert lay.summarised and len(lay.panels) == len(lay.shown_steps) < 50
    assert lay.shown_steps[0] == 0 and lay.shown_steps[-1] == 49
    note = " ".join(tb.text for tb in lay.texts_of("note"))
    assert f"showing {len(lay.shown_steps)} of 50 steps" in note
    assert lay.strip is not None and lay.strip.cols * lay.strip.steps_per_col >= 50
    assert len(lay.strip.marks) == len(lay.shown_steps)
    strip_label = " ".join(tb.text for tb in lay.texts_of("strip_label"))
    assert "every step" in strip_label
    # shown panels are labelled with their own step
    assert [tb.step for tb in lay.texts_of("step_label")] == list(lay.shown_steps)
    for name in ("2x2x1", "3x4x2", "5x40x3", "40x2x20", "long_labels"):
        _, _, lay = _rendered(name)
        assert not lay.summarised and lay.strip is None and not lay.texts_of("note")
        assert len(lay.panels) == CASES[name][0]


def test_share_strip_colours_every_step():
    t, img, lay = _rendered("many_tiny_steps")
    st = lay.strip
    assert st is not None and st.cols * st.steps_per_col >= 200
    x0, y0, x1, y1 = st.box
    colours = {tuple(c) for c in img[y0:y1, x0:x1].reshape(-1, 3)}
    assert colours <= set(BRANCH_COLORS) and len(colours) == 3
    # a column of steps all full is all full colour
    t2 = t.copy()
    t2[:] = 1
    t2[: st.steps_per_col] = 0
    img2, lay2 = render_decisions(t2, max_width=400, return_layout=True)
    col = np.asarray(img2)[y0:y1, x0 : x0 + lay2.strip.col_w].reshape(-1, 3)
    assert (col == np.array(BRANCH_COLORS[0], dtype=np.uint8)).all()


def test_step_labels_from_sigmas():
    assert step_label(3, 0.87312) == "step 3 · σ 0.873"
    assert step_label(0, 14.6149) == "step 0 · σ 14.615"
    assert step_label(19, 0.0) == "step 19 · σ 0.000"
    assert step_label(5, torch.tensor(0.5)) == "step 5 · σ 0.500"
    _, _, lay = _rendered("3x4x2")
    assert [tb.full for tb in lay.texts_of("step_label")] == ["step 0 · σ 1.000", "step 1 · σ 0.500"]
    _, _, lay = _rendered("2x2x1")
    assert [tb.full for tb in lay.texts_of("step_label")] == ["step 0"]
    with pytest.raises(ValueError):
        layout_decisions(_tables(3, 2, 2), sigmas=[1.0, 0.5])


def test_labels_fit_their_slot():
    _, _, lay = _rendered("long_labels")
    labels = lay.texts_of("step_label")
    assert len(labels) == 4
    for tb in labels:
        assert tb.text != tb.full and tb.text.endswith("…") and tb.full.startswith(tb.text[:-1])
    _, _, lay = _rendered("40x40x50")
    assert all(tb.text == tb.full for tb in lay.texts_of("step_label"))  # short labels are whole


def test_long_title_wraps_inside_narrow_image():
    _, _, lay = _rendered("long_title_narrow")
    assert lay.width <= 360 and len(lay.texts_of("title")) >= 2
    words = " ".join(tb.text for tb in lay.texts_of("title")).replace("…", "").split()
    assert words[:3] == ["VORTA", "predicted", "routing"]


def test_layout_matches_render_and_old_call_still_works():
    t = _tables(2, 3, 4)
    img = render_decisions(t, ["a", "b"], title="t")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    lay = layout_decisions(t, ["a", "b"], title="t")
    assert img.size == (lay.width, lay.height)
    img2 = render_decisions(torch.from_numpy(t[0]))  # a single table [blocks, heads]
    assert img2.size[0] > 0
    with pytest.raises(ValueError):
        render_decisions(np.zeros((2, 3, 4, 5), dtype=np.int8))


def test_without_a_greek_font_sigma_is_spelled_out(monkeypatch):
    monkeypatch.setattr(viz, "_FALLBACK_FONTS", ())
    viz._face_cached.cache_clear()
    try:
        face = viz._face(11)
        if face.fallback is None and not viz._has_glyph(face.main, "σ"):
            assert "".join(s for _, s in face.runs("σ 0.5")) == "sigma 0.5"
        t = _tables(3, 4, 5)
        img, lay = render_decisions(t, sigmas=[0.9, 0.5, 0.1], return_layout=True)
        assert _overlaps(_objects(lay)) == [] and _wrong_cells(np.asarray(img), lay, t) == []
    finally:
        viz._face_cached.cache_clear()
