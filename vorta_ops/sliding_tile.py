"""3D sliding-tile attention branch (paper Algorithm 1, STA).

The grid is cut into tiles of (tt, th, tw) tokens. A query in tile (a, b, c) attends to the key
tiles inside a window of (wt, wh, ww) tiles centred on its own tile, the centre clamped on each
axis so the window stays inside the grid (near a border the window slides inward; it always spans
min(window, n_tiles) tiles). Extra (non-grid) tokens attend to all keys and are attended by all
queries. Grid dimensions that are not tile multiples are padded; padded keys never count.

q, k, v: [B, H, L, D] in the original t-major order (see layout.py); kv_mask: optional bool
[B, L], True = key may be attended (e.g. HunyuanVideo text padding).

Backends:
    "reference"  dense attention with the explicit [L, L] mask (CPU tests, tiny sizes)
    "flex"       FlexAttention on the tile-major layout with a BlockMask (compiled on CUDA)
    "triton"     the block-sparse Triton kernel (vorta_ops/kernels), when registered
    "auto"       triton, else flex, on CUDA; reference on CPU
Each runs inside the custom op ``vorta::sliding_tile_attention`` (``sliding_tile_op``), opaque to
torch.compile.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._backends import BackendRegistry, op_heads
from .layout import Grid, TileLayout, _triple, check_grid, window_box

__all__ = [
    "SlidingTileConfig",
    "WAN_TILE",
    "HUNYUAN_TILE",
    "ALIGNED_TILE",
    "DEFAULT_WINDOW",
    "FLEX_BLOCK",
    "sliding_tile_mask",
    "sliding_tile_reference",
    "sliding_tile_attention",
    "register_backend",
    "sliding_tile_op",
]

WAN_TILE: Grid = (5, 9, 8)  # official Wan-14B 720p tiles (360 tokens)
HUNYUAN_TILE: Grid = (6, 9, 8)  # official HunyuanVideo 720p tiles (432 tokens)
ALIGNED_TILE: Grid = (4, 8, 8)  # 256 tokens: two whole 128-token kernel blocks, no tile padding
DEFAULT_WINDOW: Grid = (3, 3, 3)  # in tiles
FLEX_BLOCK = 128  # FlexAttention's default sparse block size; tiles are padded to it


@dataclass(frozen=True)
class SlidingTileConfig:
    tile: Grid = WAN_TILE
    window: Grid = DEFAULT_WINDOW

    def __post_init__(self):
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        w = _triple("window", self.window)
        if any(x % 2 == 0 for x in w):
            raise ValueError(
                f"window must be odd on every axis (a centre tile plus equal sides), got {w}; "
                f"use e.g. (3, 3, 3)"
            )
        object.__setattr__(self, "window", w)


def _token_tiles(grid: Grid, tile: Grid, n_prefix: int, n_suffix: int, device) -> torch.Tensor:
    """(L, 3) int64 tile coordinate of every token in the original order; -1 rows for extras."""
    T, Hg, Wg = grid
    t = torch.arange(T, device=device).view(T, 1, 1).expand(T, Hg, Wg)
    h = torch.arange(Hg, device=device).view(1, Hg, 1).expand(T, Hg, Wg)
    w = torch.arange(Wg, device=device).view(1, 1, Wg).expand(T, Hg, Wg)
    coords = torch.stack((t // tile[0], h // tile[1], w // tile[2]), dim=-1).reshape(-1, 3)
    pre = torch.full((n_prefix, 3), -1, device=device, dtype=torch.long)
    suf = torch.full((n_suffix, 3), -1, device=device, dtype=torch.long)
    return torch.cat((pre, coords, suf))


def sliding_tile_mask(
    grid, cfg: SlidingTileConfig, n_prefix: int = 0, n_suffix: int = 0, device=None, rows=None
) -> torch.Tensor:
    """bool [L, L] (or [len(rows), L] for the query positions ``rows``) in the original order:
    True where query i may attend key j.

    Written from the definition (clamped window centre), independently of the layout code, so it
    can serve as the reference for every faster path; ``rows`` keeps it cheap at full size.
    """
    grid = check_grid(grid)
    coords = _token_tiles(grid, cfg.tile, n_prefix, n_suffix, device)
    qc = coords if rows is None else coords[rows]
    extra = coords[:, 0] < 0
    n = torch.tensor([-(-g // t) for g, t in zip(grid, cfg.tile)], device=device)
    r = torch.tensor([w // 2 for w in cfg.window], device=device)
    # clamp(a, r, n-1-r); when the grid has fewer tiles than the window, the centre is r.
    centre = torch.maximum(torch.minimum(qc, n - 1 - r), r)
    near = ((centre[:, None, :] - coords[None, :, :]).abs() <= r).all(-1)
    return near | (qc[:, 0] < 0)[:, None] | extra[None, :]


def sliding_tile_reference(
    q, k, v, grid, cfg: SlidingTileConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None, rows=None
):
    """Dense attention under the explicit sliding-tile mask. [B, H, L, D] -> [B, H, L, D], or
    [B, H, len(rows), D] for the query positions ``rows`` only (full-size checks)."""
    _check_qkv(q, k, v, grid, n_prefix, n_suffix)
    mask = sliding_tile_mask(grid, cfg, n_prefix, n_suffix, q.device, rows)[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]
    qr = q if rows is None else q[:, :, rows]
    return F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, scale=scale)


def _check_qkv(q, k, v, grid, n_prefix, n_suffix):
    L = n_prefix + check_grid(grid)[0] * grid[1] * grid[2] + n_suffix
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"sliding-tile attention wants q, k, v of one shape [B, H, L, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != L:
        raise ValueError(
            f"sequence length {q.shape[2]} does not match grid {tuple(grid)} "
            f"({L - n_prefix - n_suffix} tokens) + {n_prefix} prefix + {n_suffix} suffix tokens = {L}"
        )


# ---- FlexAttention path ----------------------------------------------------------------------


def tile_window_tables(layout: TileLayout, cfg: SlidingTileConfig, device=None):
    """Per tile: window start (num_tiles, 3) and window span (3,), from the tile coordinates."""
    coords = layout.tile_coords(device)
    lo = torch.stack(
        [window_box(n, w, coords[:, ax]) for ax, (n, w) in enumerate(zip(layout.n_tiles, cfg.window))], dim=1
    )
    span = torch.tensor([min(w, n) for n, w in zip(layout.n_tiles, cfg.window)], device=device)
    return coords, lo, span


def _mask_mod_for(layout: TileLayout, cfg: SlidingTileConfig, device, kv_mask_tiled=None):
    slot_tile = layout.slot_tile(device)
    valid = layout.valid(device)
    coords, lo, span = tile_window_tables(layout, cfg, device)

    def mask_mod(b, h, qi, ki):
        qt, kt = slot_tile[qi], slot_tile[ki]
        qc, kc = qt.clamp(min=0), kt.clamp(min=0)
        d0 = coords[kc, 0] - lo[qc, 0]
        d1 = coords[kc, 1] - lo[qc, 1]
        d2 = coords[kc, 2] - lo[qc, 2]
        inwin = (d0 >= 0) & (d0 < span[0]) & (d1 >= 0) & (d1 < span[1]) & (d2 >= 0) & (d2 < span[2])
        keep = valid[ki] & ((qt < 0) | (kt < 0) | inwin)
        if kv_mask_tiled is not None:
            keep = keep & kv_mask_tiled[b, ki]
        return keep

    return mask_mod


@functools.lru_cache(maxsize=32)
def _cached_block_mask(layout: TileLayout, cfg: SlidingTileConfig, device: torch.device):
    return _build_block_mask(layout, cfg, device, None, None)


def _build_block_mask(layout, cfg, device, kv_mask_tiled, B):
    from torch.nn.attention.flex_attention import create_block_mask

    L = layout.tiled_len
    return create_block_mask(
        _mask_mod_for(layout, cfg, device, kv_mask_tiled),
        B, None, L, L, device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=device.type == "cuda",
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(layout: TileLayout, cfg: SlidingTileConfig, device, kv_mask=None):
    """The FlexAttention BlockMask for this layout (cached when there is no per-batch key mask)."""
    device = torch.device(device)
    if kv_mask is None:
        return _cached_block_mask(layout, cfg, device)
    km = layout.to_tiled(kv_mask[..., None].float())[..., 0] > 0
    return _build_block_mask(layout, cfg, device, km, kv_mask.shape[0])


def sliding_tile_flex(q, k, v, grid, cfg: SlidingTileConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None):
    _check_qkv(q, k, v, grid, n_prefix, n_suffix)
    layout = TileLayout(grid, cfg.tile, FLEX_BLOCK, n_prefix, n_suffix)
    bm = flex_block_mask(layout, cfg, q.device, kv_mask)
    qt, kt, vt = (layout.to_tiled(x) for x in (q, k, v))
    if q.is_cuda:
        out = _compiled_flex()(qt, kt, vt, block_mask=bm, scale=scale)
    else:
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():  # eager flex on CPU is only for tests at tiny sizes
            warnings.simplefilter("ignore")
            out = flex_attention(qt, kt, vt, block_mask=bm, scale=scale)
    return layout.from_tiled(out)


# ---- backend registry and custom op ----------------------------------------------------------

# Every backend call runs inside this op: opaque to torch.compile (a fake implementation gives
# the metadata), so neither the reference's mask nor the kernel's host tables are traced. It
# writes into ``out`` (declared); ``heads``: optional 1-D int tensor, validated by the Python entry
# point that built it (see _backends.op_heads); ``backend``: a registry name (not "auto").
SLIDING_TILE_OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) out, int[] grid, int[] tile, int[] window, int n_prefix, "
    "int n_suffix, Tensor? kv_mask, float? scale, Tensor? heads, str backend) -> ()"
)


def _sliding_tile_op_impl(q, k, v, out, grid, tile, window, n_prefix, n_suffix, kv_mask, scale, heads, backend):
    cfg = SlidingTileConfig(tuple(tile), tuple(window))
    _BACKENDS.run(backend, q, k, v, tuple(grid), cfg, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, out=out,
                  heads=op_heads(heads, q, "vorta::sliding_tile_attention"))


sliding_tile_op = torch.library.custom_op(
    "vorta::sliding_tile_attention", _sliding_tile_op_impl, mutates_args=("out",), schema=SLIDING_TILE_OP_SCHEMA
)


@sliding_tile_op.register_fake
def _sliding_tile_op_fake(q, k, v, out, grid, tile, window, n_prefix, n_suffix, kv_mask, scale, heads, backend):
    return None  # out is written in place: nothing new to describe


def _call_op(name, q, k, v, grid, cfg: SlidingTileConfig, n_prefix, n_suffix, *, kv_mask, scale, out, heads):
    # Eager calls skip the custom-op layer (its dispatch costs ~0.1-0.2 ms of host time per call,
    # measured on the H200 with bench.overhead); under torch.compile the op keeps the kernel opaque.
    fn = sliding_tile_op if torch.compiler.is_compiling() else _sliding_tile_op_impl
    fn(
        q, k, v, out, [int(x) for x in grid], list(cfg.tile), list(cfg.window), int(n_prefix), int(n_suffix), kv_mask,
        None if scale is None else float(scale), heads, name,
    )


_BACKENDS = BackendRegistry("sliding-tile", op=_call_op, reference=sliding_tile_reference, flex=sliding_tile_flex)


def register_backend(name: str, fn, writes_out: bool = False, takes_heads: bool = False) -> None:
    """Plug in a faster implementation with the signature of sliding_tile_reference (plus an
    ``out=`` keyword when ``writes_out``, and a ``heads=`` keyword when ``takes_heads``: run on
    those heads of full-H q, k, v, writing only those heads of ``out``)."""
    _BACKENDS.register(name, fn, writes_out, takes_heads)


def available_backends() -> list[str]:
    return sorted(_BACKENDS.fns)


def _auto_backend(q) -> str:
    if q.is_cuda:
        return "triton" if "triton" in _BACKENDS.fns else "flex"
    return "reference"


def sliding_tile_attention(
    q, k, v, grid, cfg: SlidingTileConfig = SlidingTileConfig(), n_prefix: int = 0, n_suffix: int = 0,
    *, kv_mask=None, scale=None, backend: str = "auto", out=None, heads=None,
):
    """Sliding-tile attention. q, k, v: [B, H, L, D] in the original order -> [B, H, L, D].
    ``out``: optional [B, H, L, D] view to write the result into. ``heads``: optional head subset
    (list of ints or 1-D int tensor): only those heads are computed and written into ``out``
    (then required, full [B, H, L, D]; its other heads are left untouched)."""
    name = _auto_backend(q) if backend == "auto" else backend
    return _BACKENDS.call(
        name, backend, q, k, v, grid, cfg, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, out=out, heads=heads
    )
