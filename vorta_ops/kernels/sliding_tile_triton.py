"""Launcher of the block-sparse Triton sliding-tile attention (STA) kernel: shape checks, the index
tables, grid, strides, and the backend adapters. The ``@triton.jit`` kernel is
``sliding_tile_kernel.py``, its autotune table ``sliding_tile_configs.py``.

Semantics are those of ``vorta_ops.sliding_tile.sliding_tile_reference``. q, k, v and the output
stay in the ORIGINAL (t-major) token order, with any strides (ComfyUI's [B, L, H, D] memory seen
as [B, H, L, D], head-subset views): nothing is permuted or copied. Rows are fetched and stored
through row pointers ``base + pos * stride_L``, ``pos`` (an original position) taken from two
int32 index tables built once per layout (cached):

* queries: the tile-major order of ``vorta_ops.layout.TileLayout`` (``layout.src_index``)::

      [tile 0][tile 1] ... [tile n-1][extras][pad]    each tile padded to a multiple of block

  with each tile's real tokens moved to the front of its slots (tiles cut by the grid border
  have scattered padding in the layout; here it is all at the tile's end, so whole padding blocks
  are skipped). One program = BLOCK_M query slots of one (batch, head), inside one tile (BLOCK_M
  divides the layout block). Padded slots (-1) are neither loaded nor stored.
* keys: the same order with the padding dropped ("packed": a permutation of the L tokens, grid
  tokens tile-major, then the extras). Only the last tile on an axis can be cut by the grid
  border, so in the packed order the tiles of one row of a key window (fixed t-slab and h-row of
  tiles, ``span_w`` consecutive tiles along w) are ONE contiguous range whose start and length
  follow from the tile coordinates in closed form. A window row is walked in whole BLOCK_N blocks
  across its tiles: only the row's last block is partial (one compare against a scalar limit), no
  tile tail is padded, no padding is scattered.

Layout block (slots a tile is padded to, query side): ``layout_block(tile)``: 128, or 64 where
that pads the tile clearly less (HunyuanVideo's 432-token tile: 448 slots instead of 512).

Environment knobs: ``VORTA_STA_MASK_ALL=1`` adds the bias to every key block (A/B timing of the
geometry masking); ``TRITON_INTERPRET=1`` (set before triton is imported) runs one small fixed
config, no autotuning.

Head subsets (``heads=``): a list / tuple of ints or a 1-D integer tensor, validated (a CUDA
tensor is read back), or a ``_backends.HeadTable`` from the custom op (trusted, not read back).

Self-timing on a GPU: ``python -m bench.sliding_tile_kernel --bench``.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._backends import head_index, kernel_head_table, require_out, tensor_version
from ..fp8 import PRECISIONS
from ..layout import TileLayout
from ..sliding_tile import SlidingTileConfig
from .fp8_triton import check_fp8_device, check_fp8_head_dim, fp8_prepare_kv
from .sliding_tile_configs import INTERPRET_CONFIG, sta_fwd_tuned
from .sliding_tile_kernel import _sta_fwd_kernel, interpreting

__all__ = [
    "sliding_tile_triton", "sliding_tile_forward", "sliding_tile_fwd", "layout_block", "register", "LAYOUT_BLOCK",
]

# None: the layout block is chosen per tile by layout_block(). An int forces that block for every
# tile (tests lower it to keep the interpreter fast; benchmarks compare 64 against 128).
LAYOUT_BLOCK: int | None = None

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernel's softmax runs in exp2
_TABLE_PAD = 128  # slots of slack after the index / bias tables: a key block may run past the end


def layout_block(tile) -> int:
    """Slots per layout block for a tile shape: 128, or 64 when 64 pads the tile clearly less.

    The layout block only shapes the query side: every tile's queries are padded to a whole number
    of blocks (a query block must not straddle two tiles) and each padded query row is computed
    for nothing; keys are read in the packed order and are not padded at all. BLOCK_M must divide
    the block, so 64 means 64-row query blocks: one warpgroup per program and twice the K/V loads
    per FLOP of 128-row blocks on two warpgroups. 64 is therefore taken only when it saves at
    least 10% of the query slots: HunyuanVideo's (6, 9, 8) = 432 tokens gets 448 slots instead of
    512 (3.6% padding instead of 15.6%). Wan's (5, 9, 8) = 360 tokens pads to 384 either way and
    the aligned (4, 8, 8) = 256 not at all, so both keep 128. Whether 64 wins at Hunyuan's sizes
    is a measurement: ``--bench --hunyuan`` times both.
    """
    n = math.prod(int(t) for t in tile)
    p128 = -(-n // 128) * 128
    p64 = -(-n // 64) * 64
    return 64 if p64 <= 0.9 * p128 else 128


def _f32_precision(device: torch.device) -> str:
    """fp32 inputs: 3xTF32 on tensor cores (close to fp32 accuracy; plain "ieee" fp32 dots are
    register-spilling FMA loops on Hopper), "ieee" where TF32 does not exist (or interpreting)."""
    if interpreting() or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return "ieee"
    return "tf32x3"


@functools.lru_cache(maxsize=32)
def _layout_tables(layout: TileLayout, device: torch.device):
    """(qsrc, ksrc, bias0, ok1) for a layout, built once per (layout, device).

    qsrc: int32 [tiled_len], query side: the tiled order with each tile's real tokens moved to the
    front of its slots (raster order kept), -1 = padding; a tile cut by the grid border then has
    only whole padding blocks at its end, which the kernel skips.
    ksrc: int32 [seq_len + pad], the tiled order without its padding (packed key order: grid
    tokens tile-major, each tile's real tokens in raster order, then the extras), then -1 pad so a
    key block may run past the end. bias0: fp32 [1, seq_len + pad], 0 then -inf on the pad (the
    bias when there is no kv_mask; read only under VORTA_STA_MASK_ALL=1); ok1: int8 [1] = 1 (the
    "kv keeps every grid token" flag when there is no kv_mask)."""
    src = layout.src_index(device).to(torch.int32)
    tiles = src[: layout.grid_len].view(layout.num_tiles, layout.tile_len)
    first = torch.sort((tiles < 0).to(torch.int8), dim=1, stable=True).indices  # real tokens first
    qsrc = torch.cat((tiles.gather(1, first).reshape(-1), src[layout.grid_len:])).contiguous()
    tail = torch.full((_TABLE_PAD,), -1, dtype=torch.int32, device=device)
    ksrc = torch.cat((src[src >= 0], tail)).contiguous()
    return qsrc, ksrc, _bias((ksrc >= 0)[None]), torch.ones(1, dtype=torch.int8, device=device)


def _bias(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))


def _kv_tables(layout: TileLayout, ksrc: torch.Tensor, kv_mask: torch.Tensor, B: int):
    """kv_mask bool [Bk, seq_len] / [seq_len] (original order) -> bias fp32 [Bk, seq_len + pad] in the
    packed key order (0 where the key may be attended, -inf elsewhere and on the pad) and grid_ok
    int8 [Bk] (1 where the mask keeps every grid token: the kernel then skips the bias there)."""
    km = kv_mask.to(device=ksrc.device, dtype=torch.bool)
    if km.dim() == 1:
        km = km[None]
    if km.dim() != 2 or km.shape[1] != layout.seq_len or km.shape[0] not in (1, B):
        raise ValueError(
            f"kv_mask must be bool [B, {layout.seq_len}] or [{layout.seq_len}], got {tuple(kv_mask.shape)}"
        )
    real = ksrc >= 0
    keep = km.index_select(1, ksrc.clamp(min=0).long()) & real[None]
    grid_ok = keep[:, : layout.n_grid].all(1).to(torch.int8)
    return _bias(keep).contiguous(), grid_ok.contiguous()


# per key-mask tensor (weakly: an entry goes with its mask), per (layout, batch, mask version): the
# tables built from it. A model call hands every block the same mask object, so its tables are built
# once per call instead of once per block; an in-place change of the mask bumps its version.
_KV_TABLES = WeakIdKeyDictionary()  # key mask -> {(layout, B, version, device): tables}


def kv_tables(layout: TileLayout, ksrc: torch.Tensor, kv_mask: torch.Tensor, B: int):
    """_kv_tables, cached per mask tensor object (see _KV_TABLES)."""
    if torch.compiler.is_compiling():
        return _kv_tables(layout, ksrc, kv_mask, B)
    per_mask = _KV_TABLES.setdefault(kv_mask, {})
    key = (layout, B, tensor_version(kv_mask), ksrc.device)
    found = per_mask.get(key)
    if found is None:
        per_mask.clear()  # an older version's tables (or another layout's) are not needed again
        found = per_mask[key] = _kv_tables(layout, ksrc, kv_mask, B)
    return found


def _check_inputs(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, what: str):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{what} wants q, k, v of one shape [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != layout.seq_len:
        raise ValueError(
            f"{what} wants L = {layout.seq_len} for grid {tuple(layout.grid)} + {layout.n_prefix} prefix + "
            f"{layout.n_suffix} suffix tokens, got {q.shape[2]}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what} wants one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[3]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"{what} supports head dims 16, 32, 64, 128, 256; got {d}")
    if tuple(layout.tile) != tuple(cfg.tile):
        raise ValueError(f"layout tile {layout.tile} != config tile {cfg.tile}")
    if layout.block % 16:
        raise ValueError(f"{what} needs layout.block to be a multiple of 16, got {layout.block}")
    if not (q.is_cuda or interpreting()):
        raise RuntimeError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")


# "fp8": K and V quantised once per call by the preparation pass (fp8_triton.fp8_prepare_kv) into the
# packed key order, V transposed; the kernel reads e4m3 blocks and quantises Q per query block.


def _launcher(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, *, kv_mask=None, scale=None, out=None,
              config=None, heads=None, precision="bf16"):
    """Validate, build the per-call tables and return (launch, out): launch() runs the kernel
    (writing out). Split from sliding_tile_forward so the benchmark can time the launch alone."""
    what = "sliding_tile_forward"
    if precision not in PRECISIONS:
        raise ValueError(f"{what}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fp8 = precision == "fp8"
    if fp8:
        check_fp8_device(q, what)
    _check_inputs(q, k, v, layout, cfg, what)
    if fp8:  # after the shape checks: the head dim is known to be q's
        check_fp8_head_dim(q.shape[3], what)
        if not interpreting() and layout.block < 32:
            raise ValueError(f"{what}: precision fp8 needs a layout block of at least 32 (8-bit tensor-core dots), "
                             f"got {layout.block}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, L, D = q.shape
    device = q.device
    if heads is not None:
        require_out(out, q, what)
    if out is None:
        out = torch.empty_like(q)  # keeps a transposed ([B, L, H, D] in memory) layout
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device:
        raise ValueError(f"{what}: out must be {tuple(q.shape)} {q.dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    o = out if out.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)

    qsrc, ksrc, bias, grid_ok = _layout_tables(layout, device)
    n_h, head_tab = kernel_head_table(heads, H, device, what, qsrc)  # program heads; qsrc: a dummy table
    v_scale, k8, ks, v8t, lp = bias, bias, bias, bias, 0  # dummies when not fp8 (never read)
    if fp8:
        k8, ks, v8t, v_scale, lp = fp8_prepare_kv(k, v, n_slots=ksrc.numel(), src=ksrc, n_h=n_h,
                                                  head_tab=head_tab if heads is not None else None)
    if kv_mask is not None:
        bias, grid_ok = kv_tables(layout, ksrc, kv_mask, B)
    s_bias_b = bias.stride(0) if bias.shape[0] > 1 else 0
    s_kvok_b = grid_ok.stride(0) if grid_ok.shape[0] > 1 else 0

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    T, Hg, Wg = layout.grid
    nt, nh, nw = layout.n_tiles
    idx64 = max((L - 1) * x.stride(2) for x in (q, k, v, o)) + D >= 2**31
    args = (
        q, k, v, o, qsrc, ksrc, bias, grid_ok, head_tab, v_scale, k8, ks, v8t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        s_bias_b, s_kvok_b,
        n_h, B * n_h, float(scale) * _LOG2E,
        T, Hg, Wg, nt, nh, nw,
        layout.n_grid, layout.n_extra, layout.seq_len,
        layout.grid_len, layout.tiled_len, H, lp,
    )
    meta = dict(
        HEAD_DIM=D, LAYOUT_BLOCK=layout.block,
        TT=layout.tile[0], TH=layout.tile[1], TW=layout.tile[2],
        WT=cfg.window[0], WH=cfg.window[1], WW=cfg.window[2],
        IDX64=bool(idx64), KV_SAME_STRIDE=k.stride(2) == v.stride(2),
        MASK_ALL=os.environ.get("VORTA_STA_MASK_ALL", "0") == "1",
        F32_PREC=_f32_precision(device) if q.dtype == torch.float32 else None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        HAS_KV=kv_mask is not None,
        HAS_HEADS=heads is not None,
        FP8=fp8,
        FP8_UPCAST=fp8 and interpreting(),
    )
    n_slots = layout.tiled_len

    def grid(m):
        return ((n_slots // m["BLOCK_M"]) * B * n_h,)

    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        c = {"num_warps": 4, "num_stages": 1 if interpreting() else 3, **config}
        if layout.block % c["BLOCK_M"] or c["BLOCK_N"] > _TABLE_PAD:
            raise ValueError(f"BLOCK_M={c['BLOCK_M']} must divide layout.block={layout.block} and "
                             f"BLOCK_N={c['BLOCK_N']} be at most {_TABLE_PAD}")

        def launch():
            _sta_fwd_kernel[grid(c)](*args, **meta, **c)
    else:
        def launch():
            sta_fwd_tuned[grid](*args, **meta)

    if o is not out:
        idx = None if heads is None else head_index(heads, H, device, what)

        def run():
            launch()
            if idx is None:
                out.copy_(o)
            else:  # the subset only: out's other heads stay untouched
                out.index_copy_(1, idx, o.index_select(1, idx))

        return run, out
    return launch, out


def sliding_tile_forward(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, *, kv_mask=None, scale=None,
                         out=None, config=None, heads=None, precision="bf16"):
    """Sliding-tile attention for an explicit layout, on tensors in the ORIGINAL order.

    q, k, v: [B, H, layout.seq_len, D], any strides (a last-dim stride other than 1 is copied).
    kv_mask: optional bool [B, seq_len] / [1, seq_len] / [seq_len], True = key may be attended.
    out: optional [B, H, seq_len, D] tensor to write into (any strides, e.g. a [B, L, H, D] buffer
    viewed as [B, H, L, D]); default ``torch.empty_like(q)``. Returns out.
    config: optional dict with BLOCK_M, BLOCK_N (and num_warps, num_stages) to bypass autotuning;
    BLOCK_M must divide layout.block.
    heads: optional head subset (list of ints or 1-D int tensor; unique, in [0, H)): only those
    heads are computed, read from the full q, k, v and written into ``out`` (then required), whose
    other heads are left untouched. The device head table is cached per (heads, device).
    precision: "bf16" (inputs' own dtype, fp32 accumulation), or "fp8": Q, K, P, V in e4m3 as
    vorta_ops/fp8.py computes them (K smoothed by its head mean, per-token Q scales, one K scale per
    head, per-channel V scales; fp32 accumulation; sm_89+); its reference is
    vorta_ops.fp8.fp8_attention_reference. K and V are quantised once per call into the packed key
    order (fp8_triton.fp8_prepare_kv), Q per query block in the kernel.
    """
    launch, out = _launcher(q, k, v, layout, cfg, kv_mask=kv_mask, scale=scale, out=out, config=config, heads=heads,
                            precision=precision)
    launch()
    return out


def sliding_tile_fwd(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, *, scale=None, kv_valid=None, config=None):
    """Compatibility entry on TILED tensors (the layout of earlier versions): q, k, v
    [B, H, layout.tiled_len, D] in the tiled order -> [B, H, tiled_len, D] tiled, padded rows zero.
    kv_valid: optional bool [B, tiled_len] / [1, tiled_len] in the tiled order. It permutes to the
    original order and back around sliding_tile_forward; new code should call that directly."""
    if q.dim() != 4 or q.shape[2] != layout.tiled_len:
        raise ValueError(f"sliding_tile_fwd: L = {q.shape[2] if q.dim() == 4 else '?'} but {layout} has tiled_len "
                         f"{layout.tiled_len}")
    qo, ko, vo = (layout.from_tiled(x) for x in (q, k, v))
    kv_mask = None
    if kv_valid is not None:
        kv_mask = kv_valid.to(device=q.device, dtype=torch.bool).index_select(-1, layout.dst_index(q.device))
    out = sliding_tile_forward(qo, ko, vo, layout, cfg, kv_mask=kv_mask, scale=scale, config=config)
    return layout.to_tiled(out)


def _layout_for(grid, cfg: SlidingTileConfig, n_prefix: int, n_suffix: int) -> TileLayout:
    block = LAYOUT_BLOCK if LAYOUT_BLOCK is not None else layout_block(cfg.tile)
    return _layout(tuple(grid), tuple(cfg.tile), block, int(n_prefix), int(n_suffix))


@functools.lru_cache(maxsize=64)
def _layout(grid, tile, block, n_prefix, n_suffix) -> TileLayout:
    """One TileLayout per (grid, tile, block, extras): made and validated once, not per call."""
    return TileLayout(grid, tile, block, n_prefix, n_suffix)


def sliding_tile_triton(q, k, v, grid, cfg: SlidingTileConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None,
                        out=None, heads=None, precision="bf16"):
    """Backend with the signature of sliding_tile_reference: q, k, v [B, H, L, D] in the original
    (t-major) order, any strides -> [B, H, L, D] in the original order (``out`` if given, else a new
    tensor laid out like q). The layout block comes from layout_block(cfg.tile). ``heads``: only
    those heads, written into ``out`` (required then; see sliding_tile_forward)."""
    layout = _layout_for(grid, cfg, n_prefix, n_suffix)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[2] != layout.seq_len:
        raise ValueError(
            f"sliding_tile_triton wants q, k, v of one shape [B, H, {layout.seq_len}, D] for grid "
            f"{tuple(layout.grid)} + {n_prefix} prefix + {n_suffix} suffix tokens, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return sliding_tile_forward(q, k, v, layout, cfg, kv_mask=kv_mask, scale=scale, out=out, heads=heads,
                                precision=precision)


def register() -> None:
    """Register this kernel as the "triton" sliding-tile backend (writes into out=, takes heads=), and its
    FP8 precision as "triton-fp8"."""
    from ..sliding_tile import register_backend

    register_backend("triton", sliding_tile_triton, writes_out=True, takes_heads=True)
    register_backend("triton-fp8", functools.partial(sliding_tile_triton, precision="fp8"), writes_out=True,
                     takes_heads=True)
