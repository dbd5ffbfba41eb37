"""Token layouts: the video token grid, 3D tiling, padding and the extra (non-grid) tokens.

Shape words used throughout vorta_ops:
    B batch, H heads, L sequence length, D head dim; grid (T, Hg, Wg) in tokens.
    Tokens arrive t-major: grid token (t, h, w) sits at ``n_prefix + (t * Hg + h) * Wg + w``.

A sequence is ``[prefix extras][T*Hg*Wg grid tokens][suffix extras]``. Prefix extras are e.g.
Wan 2.2 reference-latent tokens, suffix extras HunyuanVideo's text tokens. Extra tokens attend to
everything and every grid token attends to them, in every branch.

The tile-major ("tiled") order used by the sliding-tile branch is::

    [tile 0][tile 1] ... [tile n-1][extras][pad]

Tiles are in raster order over the tile grid (w fastest); inside a tile the tokens are in raster
order too. Each tile occupies ``tile_len`` slots: its ``tt*th*tw`` tokens, then padding up to a
whole number of ``block`` tokens (block-aligned tiles are what makes block-sparse kernels fast:
the official Wan tile (5, 9, 8) holds 360 tokens; with ``block=128`` it takes 384 slots).
Grid dimensions that are not tile multiples are padded too. Padded slots are zero, masked as keys
and dropped as queries. The extras are appended after the tiles and padded up to ``block``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["Grid", "TileLayout", "auto_tile", "check_grid", "grid_tokens"]

Grid = tuple[int, int, int]


def _triple(name: str, value) -> Grid:
    try:
        t = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be three integers (t, h, w), got {value!r}") from None
    if len(t) != 3 or any(v < 1 for v in t):
        raise ValueError(f"{name} must be three positive integers (t, h, w), got {value!r}")
    return t  # type: ignore[return-value]


def check_grid(grid) -> Grid:
    """Validate a token grid (T, Hg, Wg) and return it as a tuple of ints."""
    return _triple("grid", grid)


def grid_tokens(grid: Grid) -> int:
    return grid[0] * grid[1] * grid[2]


@dataclass(frozen=True)
class TileLayout:
    """Tile-major layout of a video token sequence. Immutable and hashable: index tensors are
    built once per (layout, device) and cached.

    grid: (T, Hg, Wg) token grid.  tile: (tt, th, tw) tokens per tile.
    block: each tile (and the extras) is padded to a multiple of this many slots; 1 = no padding.
    n_prefix / n_suffix: extra non-grid tokens before / after the grid tokens.
    """

    grid: Grid
    tile: Grid
    block: int = 1
    n_prefix: int = 0
    n_suffix: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid", check_grid(self.grid))
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.n_prefix < 0 or self.n_suffix < 0:
            raise ValueError(f"extra token counts must be >= 0, got {self.n_prefix}, {self.n_suffix}")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def n_tiles(self) -> Grid:
        """Tiles per axis (grid padded up to a tile multiple)."""
        return tuple(math.ceil(g / t) for g, t in zip(self.grid, self.tile))  # type: ignore

    @property
    def num_tiles(self) -> int:
        return math.prod(self.n_tiles)

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    @property
    def tile_len(self) -> int:
        """Slots per tile in the tiled order: tile tokens rounded up to a multiple of block."""
        return math.ceil(self.tile_tokens / self.block) * self.block

    @property
    def n_grid(self) -> int:
        return grid_tokens(self.grid)

    @property
    def n_extra(self) -> int:
        return self.n_prefix + self.n_suffix

    @property
    def seq_len(self) -> int:
        """Length of the sequence in its original (t-major) order."""
        return self.n_prefix + self.n_grid + self.n_suffix

    @property
    def grid_len(self) -> int:
        """Slots taken by the tiles in the tiled order (extras start here)."""
        return self.num_tiles * self.tile_len

    @property
    def extra_len(self) -> int:
        return math.ceil(self.n_extra / self.block) * self.block

    @property
    def tiled_len(self) -> int:
        return self.grid_len + self.extra_len

    @property
    def padding_fraction(self) -> float:
        """Share of tiled slots that are padding (work a block-sparse kernel does for nothing)."""
        return 1.0 - self.seq_len / self.tiled_len

    # ---- index maps --------------------------------------------------------------------------
    def src_index(self, device=None) -> torch.Tensor:
        """(tiled_len,) int64: for every tiled slot, its position in the original sequence, -1 = pad."""
        return _src_index(self, torch.device(device or "cpu"))

    def dst_index(self, device=None) -> torch.Tensor:
        """(seq_len,) int64: for every original token, its slot in the tiled order."""
        return _dst_index(self, torch.device(device or "cpu"))

    def valid(self, device=None) -> torch.Tensor:
        """(tiled_len,) bool: True where the tiled slot holds a real token."""
        return self.src_index(device) >= 0

    def slot_tile(self, device=None) -> torch.Tensor:
        """(tiled_len,) int64: tile id of each tiled slot; -1 for the extras region."""
        return _slot_tile(self, torch.device(device or "cpu"))

    def tile_coords(self, device=None) -> torch.Tensor:
        """(num_tiles, 3) int64: (a, b, c) tile coordinates of each tile id (raster order)."""
        nt, nh, nw = self.n_tiles
        ids = torch.arange(self.num_tiles, device=device)
        return torch.stack((ids // (nh * nw), (ids // nw) % nh, ids % nw), dim=1)

    # ---- permutations ------------------------------------------------------------------------
    def to_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """[..., seq_len, D] (original order) -> [..., tiled_len, D], padded slots zero."""
        self._check_len(x, self.seq_len, "to_tiled")
        src = self.src_index(x.device)
        out = x.index_select(-2, src.clamp(min=0))
        return out.masked_fill_(~(src >= 0)[:, None], 0)

    def from_tiled(self, y: torch.Tensor) -> torch.Tensor:
        """[..., tiled_len, D] -> [..., seq_len, D] (original order); padded slots dropped."""
        self._check_len(y, self.tiled_len, "from_tiled")
        return y.index_select(-2, self.dst_index(y.device))

    def _check_len(self, x: torch.Tensor, expected: int, what: str) -> None:
        if x.dim() < 2 or x.shape[-2] != expected:
            raise ValueError(
                f"{what}: expected [..., {expected}, D] for {self}, got shape {tuple(x.shape)}"
            )


def window_box(n: int, window: int, a: torch.Tensor) -> torch.Tensor:
    """First tile of the window along one axis for query tile coordinate(s) ``a``.

    The window of ``window`` tiles is centred on the query tile, with its centre clamped so the
    whole window stays inside the ``n`` tiles (paper Algorithm 1). When ``n <= window`` the window
    covers every tile. The window is tiles ``[lo, lo + min(window, n))``.
    """
    r = window // 2
    return (a - r).clamp(min=0).clamp(max=max(n - window, 0))


@functools.lru_cache(maxsize=64)
def _src_index(layout: TileLayout, device: torch.device) -> torch.Tensor:
    T, Hg, Wg = layout.grid
    tt, th, tw = layout.tile
    nt, nh, nw = layout.n_tiles
    # slot (tile a,b,c ; in-tile i,j,k) -> grid coordinate (a*tt+i, b*th+j, c*tw+k)
    a = torch.arange(nt).view(nt, 1, 1, 1, 1, 1)
    b = torch.arange(nh).view(1, nh, 1, 1, 1, 1)
    c = torch.arange(nw).view(1, 1, nw, 1, 1, 1)
    i = torch.arange(tt).view(1, 1, 1, tt, 1, 1)
    j = torch.arange(th).view(1, 1, 1, 1, th, 1)
    k = torch.arange(tw).view(1, 1, 1, 1, 1, tw)
    t, h, w = a * tt + i, b * th + j, c * tw + k
    inside = (t < T) & (h < Hg) & (w < Wg)
    src = torch.where(inside, layout.n_prefix + (t * Hg + h) * Wg + w, -1)
    src = src.reshape(layout.num_tiles, layout.tile_tokens)
    pad = layout.tile_len - layout.tile_tokens
    if pad:
        src = torch.cat((src, src.new_full((layout.num_tiles, pad), -1)), dim=1)
    extras = torch.cat(
        (
            torch.arange(layout.n_prefix),
            torch.arange(layout.n_prefix + layout.n_grid, layout.seq_len),
            torch.full((layout.extra_len - layout.n_extra,), -1),
        )
    )
    return torch.cat((src.reshape(-1), extras)).to(device)


@functools.lru_cache(maxsize=64)
def _dst_index(layout: TileLayout, device: torch.device) -> torch.Tensor:
    src = _src_index(layout, torch.device("cpu"))
    slots = torch.nonzero(src >= 0).squeeze(1)
    dst = torch.empty(layout.seq_len, dtype=torch.long)
    dst[src[slots]] = slots
    return dst.to(device)


@functools.lru_cache(maxsize=64)
def _slot_tile(layout: TileLayout, device: torch.device) -> torch.Tensor:
    tiles = torch.arange(layout.num_tiles).repeat_interleave(layout.tile_len)
    return torch.cat((tiles, torch.full((layout.extra_len,), -1))).to(device)


def auto_tile(grid, official, slack: int = 2) -> Grid:
    """A tile near ``official`` that wastes the least padding on this grid.

    Per axis, candidates are official-slack .. official+slack (at least 1, at most the grid); the
    one whose tiles cover the axis with the fewest padded tokens wins, ties going to the size
    closest to the official one (the receptive field a router was trained with), then the larger.
    """
    grid, official = check_grid(grid), _triple("official tile", official)
    out = []
    for n, o in zip(grid, official):
        cands = range(max(1, min(o - slack, n)), max(1, min(n, o + slack)) + 1)  # small axes: up to n
        out.append(min(cands, key=lambda t: (math.ceil(n / t) * t - n, abs(t - o), -t)))
    return tuple(out)  # type: ignore[return-value]
