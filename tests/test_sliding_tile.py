import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import extras, grids, qkv, tiles, windows
from vorta_ops.sliding_tile import (
    SlidingTileConfig,
    sliding_tile_attention,
    sliding_tile_flex,
    sliding_tile_mask,
    sliding_tile_reference,
)


def brute_force_mask(grid, cfg, pre, suf):
    """Per token pair, straight from Algorithm 1: clamp the query tile centre, compare tiles."""
    T, Hg, Wg = grid
    n = [-(-g // t) for g, t in zip(grid, cfg.tile)]
    toks = [None] * pre + [
        (t // cfg.tile[0], h // cfg.tile[1], w // cfg.tile[2]) for t in range(T) for h in range(Hg) for w in range(Wg)
    ] + [None] * suf
    L = len(toks)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i, j in itertools.product(range(L), range(L)):
        if toks[i] is None or toks[j] is None:
            m[i, j] = True
            continue
        ok = True
        for ax in range(3):
            r = cfg.window[ax] // 2
            c = min(max(toks[i][ax], r), max(n[ax] - 1 - r, r))
            ok &= abs(c - toks[j][ax]) <= r
        m[i, j] = ok
    return m


@settings(max_examples=15)
@given(st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)), tiles, windows, st.integers(0, 2), st.integers(0, 2))
def test_mask_matches_algorithm_1(grid, tile, window, pre, suf):
    cfg = SlidingTileConfig(tile, window)
    assert torch.equal(sliding_tile_mask(grid, cfg, pre, suf), brute_force_mask(grid, cfg, pre, suf))


def test_each_query_tile_sees_a_full_window():
    grid, cfg = (6, 9, 12), SlidingTileConfig((2, 3, 3), (3, 3, 3))
    m = sliding_tile_mask(grid, cfg)
    tokens_per_tile = 2 * 3 * 3
    # 3x3x3 tiles everywhere, the window slides inward at the borders instead of shrinking
    assert torch.all(m.sum(1) == 27 * tokens_per_tile)


@given(grids, tiles, windows, extras, extras, st.integers(0, 2**16))
def test_reference_is_masked_dense_attention(grid, tile, window, pre, suf, seed):
    cfg = SlidingTileConfig(tile, window)
    L = pre + grid[0] * grid[1] * grid[2] + suf
    q, k, v = qkv(1, 2, L, 8, seed)
    out = sliding_tile_reference(q, k, v, grid, cfg, pre, suf)
    mask = brute_force_mask(grid, cfg, pre, suf) if L <= 60 else sliding_tile_mask(grid, cfg, pre, suf)
    s = (q @ k.transpose(-1, -2)) * 8**-0.5
    ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@settings(max_examples=6)
@given(grids, tiles, windows, extras, extras, st.booleans(), st.integers(0, 2**16))
def test_flex_path_equals_reference(grid, tile, window, pre, suf, use_mask, seed):
    cfg = SlidingTileConfig(tile, window)
    L = pre + grid[0] * grid[1] * grid[2] + suf
    q, k, v = qkv(2, 2, L, 8, seed)
    kv_mask = None
    if use_mask:
        kv_mask = torch.ones(2, L, dtype=torch.bool)
        kv_mask[1, L - suf :] = False  # e.g. text padding in the second sample
    ref = sliding_tile_reference(q, k, v, grid, cfg, pre, suf, kv_mask=kv_mask)
    out = sliding_tile_flex(q, k, v, grid, cfg, pre, suf, kv_mask=kv_mask)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


def test_bad_window_and_shapes_are_explained():
    with pytest.raises(ValueError, match=r"window must be odd.*got \(2, 3, 3\)"):
        SlidingTileConfig((2, 2, 2), (2, 3, 3))
    q = torch.zeros(1, 1, 10, 4)
    with pytest.raises(ValueError, match=r"sequence length 10 does not match grid \(2, 2, 2\)"):
        sliding_tile_attention(q, q, q, (2, 2, 2), SlidingTileConfig((1, 1, 1)))
    with pytest.raises(ValueError, match="unknown sliding-tile backend 'nope'"):
        sliding_tile_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], (2, 2, 2), SlidingTileConfig((1, 1, 1)), backend="nope")


def test_reference_on_query_rows_equals_the_full_reference():
    grid, cfg, pre, suf = (3, 5, 6), SlidingTileConfig((1, 2, 2), (3, 1, 3)), 2, 3
    L = pre + 90 + suf
    q, k, v = qkv(1, 2, L, 8, 7)
    rows = torch.tensor([0, 1, 5, 40, 93, L - 1])
    full = sliding_tile_reference(q, k, v, grid, cfg, pre, suf)
    torch.testing.assert_close(sliding_tile_reference(q, k, v, grid, cfg, pre, suf, rows=rows), full[:, :, rows])
    assert torch.equal(sliding_tile_mask(grid, cfg, pre, suf, rows=rows), sliding_tile_mask(grid, cfg, pre, suf)[rows])


def test_key_mask_tables_made_once_per_mask_object(monkeypatch):
    """The sliding-tile kernel's key-mask tables (bias, grid_ok) are made once per mask object and
    version (a model call's blocks share one mask), again after an in-place change."""
    from vorta_ops.kernels import sliding_tile_triton as stt
    from vorta_ops.layout import TileLayout

    calls = []
    real = stt._kv_tables
    monkeypatch.setattr(stt, "_kv_tables", lambda *a: calls.append(1) or real(*a))
    layout = TileLayout((2, 4, 4), (1, 2, 2), 16, 0, 3)
    ksrc = stt._layout_tables(layout, torch.device("cpu"))[1]
    mask = torch.ones(2, layout.seq_len, dtype=torch.bool)
    mask[1, -2:] = False
    a = stt.kv_tables(layout, ksrc, mask, 2)
    b = stt.kv_tables(layout, ksrc, mask, 2)
    assert a is b and len(calls) == 1
    mask[0, -1] = False
    c = stt.kv_tables(layout, ksrc, mask, 2)
    assert len(calls) == 2 and not torch.equal(c[0], a[0])
    torch.testing.assert_close(c[0], real(layout, ksrc, mask, 2)[0])
    assert stt.kv_tables(layout, ksrc, mask.clone(), 2) is not c  # another mask object: its own tables
