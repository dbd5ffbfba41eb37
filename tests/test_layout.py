import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import extras, grids, tiles
from vorta_ops.layout import TileLayout, window_box


@given(grids, tiles, st.sampled_from([1, 4, 16]), extras, extras)
def test_round_trip_and_padding(grid, tile, block, pre, suf):
    lay = TileLayout(grid, tile, block, pre, suf)
    x = torch.randn(2, lay.seq_len, 3)
    y = lay.to_tiled(x)
    assert y.shape == (2, lay.tiled_len, 3)
    assert torch.equal(lay.from_tiled(y), x)
    valid = lay.valid()
    assert int(valid.sum()) == lay.seq_len
    assert torch.all(y[:, ~valid] == 0)  # padded slots are zero
    assert lay.tile_len % block == 0 and lay.tiled_len % block == 0
    # every tile's slots hold tokens of that tile only, in raster order
    src = lay.src_index()
    T, Hg, Wg = grid
    for tid, (a, b, c) in enumerate(lay.tile_coords().tolist()):
        s = src[tid * lay.tile_len : (tid + 1) * lay.tile_len]
        s = s[s >= 0] - pre
        t, h, w = s // (Hg * Wg), (s // Wg) % Hg, s % Wg
        assert torch.all(t // tile[0] == a) and torch.all(h // tile[1] == b) and torch.all(w // tile[2] == c)
        assert torch.all(s[1:] > s[:-1])
    # extras sit after the tiles, prefix first
    ex = src[lay.grid_len : lay.grid_len + lay.n_extra].tolist()
    assert ex == list(range(pre)) + list(range(pre + lay.n_grid, lay.seq_len))


def test_official_tile_padded_to_whole_blocks():
    lay = TileLayout((20, 45, 80), (5, 9, 8), 128)
    assert lay.tile_tokens == 360 and lay.tile_len == 384
    assert lay.n_tiles == (4, 5, 10)
    assert abs(lay.padding_fraction - 24 / 384) < 1e-9
    aligned = TileLayout((20, 45, 80), (4, 8, 8), 128)
    assert aligned.tile_len == 256 and aligned.n_tiles == (5, 6, 10)  # 45 -> 48 rows padded


@pytest.mark.parametrize("n,w", [(1, 3), (2, 3), (3, 3), (10, 3), (10, 5), (4, 1)])
def test_window_box_stays_inside_and_centres(n, w):
    a = torch.arange(n)
    lo = window_box(n, w, a)
    span = min(w, n)
    assert torch.all(lo >= 0) and torch.all(lo + span <= n)
    r = w // 2
    for i in range(r, n - r):  # away from the borders the window is centred on the tile
        assert int(lo[i]) == i - r


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(grid=(0, 4, 4), tile=(1, 2, 2)), "grid must be three positive"),
        (dict(grid=(4, 4), tile=(1, 2, 2)), "grid must be three positive"),
        (dict(grid=(4, 4, 4), tile=(1, 2)), "tile must be three"),
        (dict(grid=(4, 4, 4), tile=(1, 2, 2), block=0), "block must be"),
        (dict(grid=(4, 4, 4), tile=(1, 2, 2), n_prefix=-1), "extra token counts"),
    ],
)
def test_bad_layouts_say_what_is_wrong(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TileLayout(**kw)


def test_wrong_length_names_expected_and_got():
    lay = TileLayout((2, 4, 4), (1, 2, 2))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 32, D\].*got shape \(1, 31, 8\)"):
        lay.to_tiled(torch.zeros(1, 31, 8))


@given(grids, st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)))
def test_auto_tile_always_picks_a_valid_tile(grid, official):
    from vorta_ops.layout import auto_tile

    tile = auto_tile(grid, official)
    for n, o, t in zip(grid, official, tile):
        assert max(1, min(o - 2, n)) <= t <= max(1, min(n, o + 2))  # near official, never past the grid
        # never worse padding than the official tile itself
        assert -(-n // t) * t - n <= -(-n // o) * o - n


def test_auto_tile_examples():
    from vorta_ops.layout import auto_tile

    assert auto_tile((20, 45, 80), (5, 9, 8)) == (5, 9, 8)  # official size: official tiles
    assert auto_tile((3, 5, 7), (5, 9, 8)) == (3, 5, 7)  # tiny grid: one tile per axis
