"""Block-sparse Triton forward kernel for 3D sliding-tile attention (STA).

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

Kernel design:

* The query block's tile id gives its tile coordinates (a, b, c) and, per axis, the clamped window
  start ``lo = clamp(a - w // 2, 0, max(n - w, 0))`` and span ``min(w, n)`` (``window_box``).
  Query blocks in the extras region see the whole grid: one range, the packed grid tokens.
* Loop 1 walks the window's rows in ONE flattened loop (one software pipeline, no per-row
  prologue): an odometer (dt, dh, blk) of loop-carried scalars yields the next key block. Loop 2
  walks the extras (none for Wan: zero iterations).
* Each key block costs one small load of BLOCK_N positions before its K/V loads. Triton pipelines
  that dependent load with num_stages >= 3, prefetching K/V ``(num_stages - 1) // 2`` blocks ahead
  (5 stages: as far ahead as direct loads with 3); autotuning picks.
* Online softmax in the exp2 domain (log2(e) folded into the scale), fp32 accumulation; rows that
  see no valid key return 0 (like SDPA's safe softmax).
* kv_mask: a per-call additive bias (0 / -inf, packed order) and a per-batch "keeps every grid
  token" flag. With the flag set (text padding masks only extras, the usual case) the grid keys
  are masked by geometry alone; otherwise every grid block adds the bias.
* Head subsets (``heads=``, routed dispatch's scattered heads): an int32 head table, program head
  i works on head ``heads[i]`` of the full q, k, v and out (one table for all four), so a
  scattered subset is neither gathered nor scattered back; out's other heads are not touched.
  HAS_HEADS is a constexpr: without a subset the table is never loaded.

Layout block (slots a tile is padded to, query side): ``layout_block(tile)``: 128, or 64 where
that pads the tile clearly less (HunyuanVideo's 432-token tile: 448 slots instead of 512).

Environment knobs: ``VORTA_STA_MASK_ALL=1`` adds the bias to every key block (A/B timing of the
geometry masking); ``TRITON_INTERPRET=1`` (set before triton is imported) runs one small fixed
config, no autotuning.

Self-timing on a GPU: ``python -m vorta_ops.kernels.sliding_tile_triton --bench``.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .._backends import head_index, kernel_head_table, require_out
from ..layout import TileLayout
from ..sliding_tile import SlidingTileConfig

__all__ = [
    "sliding_tile_triton", "sliding_tile_forward", "sliding_tile_fwd", "layout_block", "register", "LAYOUT_BLOCK",
]

# None: the layout block is chosen per tile by layout_block(). An int forces that block for every
# tile (tests lower it to keep the interpreter fast; benchmarks compare 64 against 128).
LAYOUT_BLOCK: int | None = None

_LOG2E = 1.4426950408889634
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


def _interpreting() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (the kernel is then interpreted)."""
    return type(_sta_fwd_kernel).__name__ == "InterpretedFunction"


# ---- kernel ----------------------------------------------------------------------------------


@triton.jit
def _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step: qk (already masked, unscaled) -> updated (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    elif F32_PREC is not None:
        acc = tl.dot(p, v, acc, input_precision=F32_PREC)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _load_kv(k_base, v_base, row, s_kn, s_vn, offs_d, KV_SAME_STRIDE: tl.constexpr):
    """Gather BLOCK_N key and value rows (row = source token positions); k and v share the
    offset arithmetic when their strides match."""
    k_off = row[:, None] * s_kn + offs_d[None, :]
    k = tl.load(k_base + k_off)
    if KV_SAME_STRIDE:
        v = tl.load(v_base + k_off)
    else:
        v = tl.load(v_base + (row[:, None] * s_vn + offs_d[None, :]))
    return k, v


@triton.jit
def _scores(q, k, F32_PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    elif F32_PREC is not None:
        return tl.dot(q, tl.trans(k), input_precision=F32_PREC)
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _sta_fwd_kernel(
    Q, K, V, O, QSrc, KSrc, Bias, KvGridOk, Heads,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_ob, s_oh, s_on,
    s_bias_b, s_kvok_b,
    n_heads, n_bh, qk_scale,  # program heads: the subset's size with HAS_HEADS, else H
    T, HG, WG,  # token grid
    NT, NH, NW,  # tiles per axis
    N_GRID, N_EXTRA, SEQ_LEN,  # packed key order: grid tokens [0, N_GRID), then N_EXTRA extras
    GRID_LEN, TILED_LEN,  # query (tiled) order: extras start at GRID_LEN, all padded to TILED_LEN
    HEAD_DIM: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,  # tile (tokens)
    WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,  # window (tiles)
    IDX64: tl.constexpr,  # row offsets (position * stride) need 64 bits
    KV_SAME_STRIDE: tl.constexpr,  # k and v rows have one stride: one offset tensor serves both
    MASK_ALL: tl.constexpr,
    F32_PREC: tl.constexpr,  # dot input precision for fp32 inputs ("tf32x3" / "ieee"); None otherwise
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot mis-handles bf16 (stored as uint16)
    HAS_KV: tl.constexpr,
    HAS_HEADS: tl.constexpr,  # program head i works on head Heads[i] of q, k, v and o
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    TILE_TOKENS: tl.constexpr = TT * TH * TW
    TILE_LEN: tl.constexpr = (TILE_TOKENS + LAYOUT_BLOCK - 1) // LAYOUT_BLOCK * LAYOUT_BLOCK

    # -- which (batch, head, query block): extras query blocks (long: they see every key) first
    pid = tl.program_id(0)
    n_gq = GRID_LEN // BLOCK_M
    n_eq = (TILED_LEN - GRID_LEN) // BLOCK_M
    n_long = n_eq * n_bh
    is_ext = pid < n_long
    r = tl.where(is_ext, pid, pid - n_long)
    per = tl.where(is_ext, n_eq, n_gq)
    bh = r // per
    mblk = r % per + tl.where(is_ext, n_gq, 0)
    off_b = bh // n_heads
    off_h = bh % n_heads
    if HAS_HEADS:
        off_h = tl.load(Heads + off_h)
    start_m = mblk * BLOCK_M

    # -- query tile coordinates, window start and span per axis
    tile_q = start_m // TILE_LEN
    o_q = start_m - tile_q * TILE_LEN
    qa = tile_q // (NH * NW)
    qb = (tile_q // NW) % NH
    qc = tile_q % NW
    live_q = tl.minimum(TT, T - qa * TT) * tl.minimum(TH, HG - qb * TH) * tl.minimum(TW, WG - qc * TW)
    q_dead = tl.where(is_ext, start_m - GRID_LEN >= N_EXTRA, o_q >= live_q)

    lo_t = tl.where(is_ext, 0, tl.minimum(tl.maximum(qa - WT // 2, 0), tl.maximum(NT - WT, 0)))
    lo_h = tl.where(is_ext, 0, tl.minimum(tl.maximum(qb - WH // 2, 0), tl.maximum(NH - WH, 0)))
    lo_w = tl.where(is_ext, 0, tl.minimum(tl.maximum(qc - WW // 2, 0), tl.maximum(NW - WW, 0)))
    sp_t = tl.where(is_ext, 1, tl.minimum(NT, WT))  # extras queries: one range, the whole grid
    sp_h = tl.where(is_ext, 1, tl.minimum(NH, WH))
    sp_w = tl.minimum(NW, WW)

    # -- window rows in the packed key order. Row (slab ka, row kb) starts at
    #    ka*TT*HG*WG + vt*(kb*TH*WG + vh*lo_w*TW) and holds vt*vh*wspan tokens, vt/vh the tile's
    #    real extent in t/h; only the last slab / row of the window can be cut, so a row has one of
    #    four block counts.
    HGWG = HG * WG
    wspan = TW * (sp_w - 1) + tl.minimum(TW, WG - (lo_w + sp_w - 1) * TW)
    vt_last = tl.minimum(TT, T - (lo_t + sp_t - 1) * TT)
    vh_last = tl.minimum(TH, HG - (lo_h + sp_h - 1) * TH)
    nb_ff = (TT * TH * wspan + BLOCK_N - 1) // BLOCK_N
    nb_fl = (TT * vh_last * wspan + BLOCK_N - 1) // BLOCK_N
    nb_lf = (vt_last * TH * wspan + BLOCK_N - 1) // BLOCK_N
    nb_ll = tl.where(is_ext, (N_GRID + BLOCK_N - 1) // BLOCK_N, (vt_last * vh_last * wspan + BLOCK_N - 1) // BLOCK_N)
    n_win = (sp_t - 1) * ((sp_h - 1) * nb_ff + nb_fl) + (sp_h - 1) * nb_lf + nb_ll
    n_win = tl.where(q_dead, 0, n_win)
    n_ext = tl.where(q_dead, 0, (N_EXTRA + BLOCK_N - 1) // BLOCK_N)

    # -- pointers (int64 bases)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    q_base = Q + off_b64 * s_qb + off_h64 * s_qh
    k_base = K + off_b64 * s_kb + off_h64 * s_kh
    v_base = V + off_b64 * s_vb + off_h64 * s_vh
    o_base = O + off_b64 * s_ob + off_h64 * s_oh
    bias_base = Bias + off_b64 * s_bias_b

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # -- query rows: original positions of the block's slots (-1 = padding: not loaded, not stored)
    pos_q = tl.load(QSrc + start_m + offs_m)
    valid_q = pos_q >= 0
    if IDX64:
        row_q = tl.maximum(pos_q, 0).to(tl.int64)
    else:
        row_q = tl.maximum(pos_q, 0)
    q = tl.load(q_base + (row_q[:, None] * s_qn + offs_d[None, :]), mask=valid_q[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    if HAS_KV:
        kv_grid_ok = tl.load(KvGridOk + off_b64 * s_kvok_b) != 0
    else:
        kv_grid_ok = True
    use_bias = not kv_grid_ok

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # ---- loop 1: the window's rows. Odometer: slab dt, row dh, block blk along the row
    zero = pid * 0
    dt = zero
    dh = zero
    blk = zero
    for it in range(0, n_win):
        last_t = dt == sp_t - 1
        nb_row = tl.where(dh == sp_h - 1, tl.where(last_t, nb_ll, nb_fl), tl.where(last_t, nb_lf, nb_ff))
        ka = lo_t + dt
        kb = lo_h + dh
        vt = tl.minimum(TT, T - ka * TT)
        vh = tl.minimum(TH, HG - kb * TH)
        row_len = tl.where(is_ext, N_GRID, vt * vh * wspan)
        o_n = blk * BLOCK_N
        slot = ka * TT * HGWG + vt * (kb * TH * WG + vh * lo_w * TW) + o_n  # packed key slot of the block
        lim = row_len - o_n  # keys [0, lim) of the block are the row's
        full = (lim >= BLOCK_N) & kv_grid_ok
        pos = tl.load(KSrc + slot + offs_n)
        if IDX64:
            row = tl.maximum(pos, 0).to(tl.int64)
        else:
            row = tl.maximum(pos, 0)
        # advance the odometer
        blk += 1
        wrap = blk == nb_row
        blk = tl.where(wrap, 0, blk)
        dh = tl.where(wrap, dh + 1, dh)
        wrap = dh == sp_h
        dh = tl.where(wrap, 0, dh)
        dt = tl.where(wrap, dt + 1, dt)

        k, v = _load_kv(k_base, v_base, row, s_kn, s_vn, offs_d, KV_SAME_STRIDE)
        qk = _scores(q, k, F32_PREC, UPCAST)
        if MASK_ALL:
            qk = tl.where(offs_n[None, :] < lim, qk + tl.load(bias_base + slot + offs_n)[None, :], float("-inf"))
        else:
            if not full:  # the row's last block, or a kv_mask that masks grid keys
                if use_bias:
                    qk += tl.load(bias_base + slot + offs_n)[None, :]
                qk = tl.where(offs_n[None, :] < lim, qk, float("-inf"))
        m_i, l_i, acc = _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC, UPCAST)

    # ---- loop 2: the extras (prefix + suffix tokens), zero iterations when there are none
    for it in range(0, n_ext):
        slot = N_GRID + it * BLOCK_N
        lim = N_EXTRA - it * BLOCK_N
        pos = tl.load(KSrc + slot + offs_n)
        if IDX64:
            row = tl.maximum(pos, 0).to(tl.int64)
        else:
            row = tl.maximum(pos, 0)
        k, v = _load_kv(k_base, v_base, row, s_kn, s_vn, offs_d, KV_SAME_STRIDE)
        qk = _scores(q, k, F32_PREC, UPCAST)
        if HAS_KV or MASK_ALL:
            qk += tl.load(bias_base + slot + offs_n)[None, :]
        qk = tl.where(offs_n[None, :] < lim, qk, float("-inf"))
        m_i, l_i, acc = _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC, UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_base + (row_q[:, None] * s_on + offs_d[None, :]), out.to(O.dtype.element_ty), mask=valid_q[:, None])


def _autotune_configs():
    # (BLOCK_M, BLOCK_N, warps): 128-row query blocks on two warpgroups, 64-row ones on one.
    # Left out after offline sm_90 compiles (triton 3.6): BLOCK_M=128 on 4 warps and (64, 128) on
    # 4 warps spill, BLOCK_M=64 on 8 warps splits rows over warpgroups. Stages: 3 prefetches K/V
    # one block ahead, 5 two (the index load takes the other stages); 2 would leave the index load
    # unpipelined and 4 is 3 with more buffers.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w in ((128, 128, 8), (128, 64, 8), (64, 64, 4))
        for s in (3, 5)
    ]


def _smem_limit(t: torch.Tensor) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - best effort
        return 227 * 1024


def _smem_bytes(bm: int, bn: int, stages: int, d: int, elt: int) -> int:
    """Shared memory of one program: Q, the K/V ring and the index ring. K/V sit behind the index
    load (an indirect load), so Triton prefetches them ``(stages - 1) // 2`` blocks ahead and the
    ring holds that + 1 blocks; fp32 inputs (3xTF32 dots) keep a second copy of Q. Matches offline
    sm_90 compiles (triton 3.6) to within 1 KiB."""
    ring = max((stages - 1) // 2, 1) + 1
    q_tiles = 2 if elt == 4 else 1
    return elt * d * (q_tiles * bm + 2 * ring * bn) + 4 * bn * ring + 1024


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_M divides layout.block (a query block stays inside one tile) and
    whose shared memory fits the device."""
    args = {**named_args, **kwargs}
    blk = int(args["LAYOUT_BLOCK"])
    d = int(args["HEAD_DIM"])
    q = args.get("Q")
    elt = q.element_size() if isinstance(q, torch.Tensor) else 2
    limit = _smem_limit(q) if isinstance(q, torch.Tensor) and q.is_cuda else 227 * 1024
    keep = [
        c for c in configs
        if blk % c.kwargs["BLOCK_M"] == 0
        and _smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, d, elt) <= limit
    ]
    if not keep:  # e.g. layout.block of 16/32, or a small-smem GPU: the smallest config that fits
        b = max(x for x in (16, 32, 64) if blk % x == 0)
        keep = [triton.Config({"BLOCK_M": b, "BLOCK_N": b}, num_warps=4, num_stages=3)]
    return keep


_TUNE_KEY = ["TILED_LEN", "SEQ_LEN", "HEAD_DIM", "LAYOUT_BLOCK", "TT", "TH", "TW", "HAS_KV"]


def _make_tuned():
    kw = dict(configs=_autotune_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
    try:  # keep tuning results on disk across processes (newer triton)
        return triton.autotune(**kw, cache_results=True)(_sta_fwd_kernel)
    except TypeError:
        return triton.autotune(**kw)(_sta_fwd_kernel)


_sta_fwd_tuned = _make_tuned()

_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


# ---- host side -------------------------------------------------------------------------------


def _f32_precision(device: torch.device) -> str:
    """fp32 inputs: 3xTF32 on tensor cores (close to fp32 accuracy; plain "ieee" fp32 dots are
    register-spilling FMA loops on Hopper), "ieee" where TF32 does not exist (or interpreting)."""
    if _interpreting() or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
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
    if not (q.is_cuda or _interpreting()):
        raise RuntimeError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")


def _launcher(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, *, kv_mask=None, scale=None, out=None,
              config=None, heads=None):
    """Validate, build the per-call tables and return (launch, out): launch() runs the kernel
    (writing out). Split from sliding_tile_forward so the benchmark can time the launch alone."""
    what = "sliding_tile_forward"
    _check_inputs(q, k, v, layout, cfg, what)
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
    if kv_mask is not None:
        bias, grid_ok = _kv_tables(layout, ksrc, kv_mask, B)
    s_bias_b = bias.stride(0) if bias.shape[0] > 1 else 0
    s_kvok_b = grid_ok.stride(0) if grid_ok.shape[0] > 1 else 0

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    T, Hg, Wg = layout.grid
    nt, nh, nw = layout.n_tiles
    idx64 = max((L - 1) * x.stride(2) for x in (q, k, v, o)) + D >= 2**31
    args = (
        q, k, v, o, qsrc, ksrc, bias, grid_ok, head_tab,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        s_bias_b, s_kvok_b,
        n_h, B * n_h, float(scale) * _LOG2E,
        T, Hg, Wg, nt, nh, nw,
        layout.n_grid, layout.n_extra, layout.seq_len,
        layout.grid_len, layout.tiled_len,
    )
    meta = dict(
        HEAD_DIM=D, LAYOUT_BLOCK=layout.block,
        TT=layout.tile[0], TH=layout.tile[1], TW=layout.tile[2],
        WT=cfg.window[0], WH=cfg.window[1], WW=cfg.window[2],
        IDX64=bool(idx64), KV_SAME_STRIDE=k.stride(2) == v.stride(2),
        MASK_ALL=os.environ.get("VORTA_STA_MASK_ALL", "0") == "1",
        F32_PREC=_f32_precision(device) if q.dtype == torch.float32 else None,
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        HAS_KV=kv_mask is not None,
        HAS_HEADS=heads is not None,
    )
    n_slots = layout.tiled_len

    def grid(m):
        return ((n_slots // m["BLOCK_M"]) * B * n_h,)

    if config is None and _interpreting():
        config = _INTERPRET_CONFIG
    if config is not None:
        c = {"num_warps": 4, "num_stages": 1 if _interpreting() else 3, **config}
        if layout.block % c["BLOCK_M"] or c["BLOCK_N"] > _TABLE_PAD:
            raise ValueError(f"BLOCK_M={c['BLOCK_M']} must divide layout.block={layout.block} and "
                             f"BLOCK_N={c['BLOCK_N']} be at most {_TABLE_PAD}")

        def launch():
            _sta_fwd_kernel[grid(c)](*args, **meta, **c)
    else:
        def launch():
            _sta_fwd_tuned[grid](*args, **meta)

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
                         out=None, config=None, heads=None):
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
    """
    launch, out = _launcher(q, k, v, layout, cfg, kv_mask=kv_mask, scale=scale, out=out, config=config, heads=heads)
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
    return TileLayout(grid, cfg.tile, block, n_prefix, n_suffix)


def sliding_tile_triton(q, k, v, grid, cfg: SlidingTileConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None,
                        out=None, heads=None):
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
    return sliding_tile_forward(q, k, v, layout, cfg, kv_mask=kv_mask, scale=scale, out=out, heads=heads)


def register() -> None:
    """Register this kernel as the "triton" sliding-tile backend (writes into out=, takes heads=)."""
    from ..sliding_tile import register_backend

    register_backend("triton", sliding_tile_triton, writes_out=True, takes_heads=True)


# ---- self-timing -----------------------------------------------------------------------------


def _bench(argv=None, device: str = "cuda") -> None:
    """``python -m vorta_ops.kernels.sliding_tile_triton --bench``: Wan-14B 720p (grid (20, 45, 80),
    40 heads, bf16, head dim 128) on the current GPU: cuDNN dense SDPA, then for the official and
    the aligned tile the kernel alone (autotuned) and the whole
    sliding_tile_triton call, with TFLOP/s per kept block relative to dense (padding to 128-slot
    tiles counted as work, as in bench/attention.py) and a sampled-rows error check."""
    import argparse

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vorta_ops.kernels import sliding_tile_triton as stt  # the package copy (not __main__)
    from vorta_ops.sliding_tile import ALIGNED_TILE, HUNYUAN_TILE, WAN_TILE, sliding_tile_reference, tile_window_tables

    p = argparse.ArgumentParser(prog="python -m vorta_ops.kernels.sliding_tile_triton", description=_bench.__doc__)
    p.add_argument("--bench", action="store_true", help="run the benchmark (the only action)")
    p.add_argument("--grid", default="20,45,80", help="token grid T,H,W (default Wan-14B 720p)")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--comfy", action="store_true", help="inputs as ComfyUI hands them: [B, L, H, D] memory")
    p.add_argument("--hunyuan", action="store_true",
                   help="also HunyuanVideo 720p (30,45,80), 24 heads, tile (6,9,8): layout block 64 vs 128")
    a = p.parse_args(argv)
    if not a.bench:
        p.error("nothing to do: pass --bench")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--bench needs a CUDA GPU")

    from .timing import cuda_median_ms

    def timeit(fn, warmup=3):
        return cuda_median_ms(fn, warmup=warmup, iters=a.iters)

    def kept_flops(grid, tile, cfg, H, D):
        lay = TileLayout(grid, tile, 128)
        _, _, span = tile_window_tables(lay, cfg)
        return 4.0 * D * lay.num_tiles * lay.tile_len * int(torch.prod(span)) * lay.tile_len * H

    def sampled_err(q, k, v, out, grid, cfg, n=512):
        rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:n].to(q.device)
        ref = sliding_tile_reference(q.float(), k.float(), v.float(), grid, cfg, rows=rows)
        return float((out[:, :, rows].float() - ref).abs().max())

    def inputs(grid, H, D=128):
        L = math.prod(grid)
        g = torch.Generator(device=device).manual_seed(0)
        if a.comfy:
            return [torch.randn(1, L, H, D, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
                    for _ in range(3)]
        return [torch.randn(1, H, L, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3)]

    def dense(q, k, v):
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v)
                    return name, timeit(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as e:
                print(f"  dense sdpa {name} unavailable: {str(e).splitlines()[0]}")
        raise SystemExit("no dense SDPA backend to compare with")

    def best():
        c = getattr(stt._sta_fwd_tuned, "best_config", None)
        if c is None:
            return ""
        return f"BLOCK {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}, {c.num_warps} warps, {c.num_stages} stages"

    def row(what, ms, flops, dense_tf, extra=""):
        tf = flops / ms / 1e9
        print(f"  {what:<46} {ms:8.2f} ms  {tf:6.1f} TFLOP/s/kept  {tf / dense_tf:5.3f} of dense  {extra}", flush=True)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"inputs {'[B, L, H, D] memory' if a.comfy else '[B, H, L, D] contiguous'}")

    shapes = [("wan14b-720p", tuple(int(x) for x in a.grid.split(",")), a.heads,
               (("official", WAN_TILE, None), ("aligned", ALIGNED_TILE, None)))]
    if a.hunyuan:
        hy_tiles = (("official", HUNYUAN_TILE, 64), ("official", HUNYUAN_TILE, 128), ("aligned", ALIGNED_TILE, None))
        shapes.append(("hunyuan-720p", (30, 45, 80), 24, hy_tiles))
    for shape, grid, H, tiles in shapes:
        q, k, v = inputs(grid, H)
        D = q.shape[-1]
        L = q.shape[2]
        name, dms = dense(q, k, v)
        dense_tf = 4.0 * D * L * L * H / dms / 1e9
        print(f"{shape} grid {grid}, {H} heads, L {L}:  dense sdpa {name} {dms:.2f} ms ({dense_tf:.1f} TFLOP/s)")
        for label, tile, force_block in tiles:
            cfg = SlidingTileConfig(tile)
            block = force_block or layout_block(tile)
            layout = TileLayout(grid, tile, block)
            flops = kept_flops(grid, tile, cfg, H, D)
            print(f" {label} tile {tile}: layout block {block}, {layout.tile_len} slots per tile "
                  f"({layout.padding_fraction:.1%} padding)")
            launch, out = stt._launcher(q, k, v, layout, cfg)
            launch()  # autotunes on the first call
            row("kernel alone", timeit(launch), flops, dense_tf, f"[{best()}]")
            if force_block is None:
                fn = lambda: stt.sliding_tile_triton(q, k, v, grid, cfg)  # noqa: E731
                out = fn()
                err = sampled_err(q, k, v, out, grid, cfg)
                row("whole sliding_tile_triton call", timeit(fn), flops, dense_tf,
                    f"max abs err {err:.2e} (512 sampled rows)")
                lay128 = TileLayout(grid, tile, 128)  # the permutations the fused kernel no longer does
                qt = lay128.to_tiled(q)
                perm = lambda: ([lay128.to_tiled(x) for x in (q, k, v)], lay128.from_tiled(qt))  # noqa: E731
                print(f"  {'(old path: to_tiled x3 + from_tiled alone)':<46} {timeit(perm):8.2f} ms")
                del qt
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    _bench()
