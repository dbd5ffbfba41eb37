"""Block-sparse Triton forward kernel for 3D sliding-tile attention (STA).

Semantics are those of ``vorta_ops.sliding_tile.sliding_tile_reference``; the token order is the
tile-major layout of ``vorta_ops.layout.TileLayout``::

    [tile 0][tile 1] ... [tile n-1][extras][pad]      each tile padded to a multiple of block

Kernel design (one program = BLOCK_M query rows of one (batch, head)):

* The query block's tile id gives its tile coordinates (a, b, c) and, per axis, the clamped window
  start ``lo = clamp(a - w // 2, 0, max(n - w, 0))`` and span ``min(w, n)`` (``window_box``).
  Query blocks in the extras region use the whole grid as their "window" (lo = 0, span = n).
* For every (dt, dh) row of the window the key tiles along w are contiguous in the tiled order.
  The kernel walks all rows in ONE flattened loop (one software pipeline, no per-row prologue):
  a small odometer (dt, dh, j, blk) of loop-carried scalars yields the next key block's start.
  Key blocks that hold only padding (the tail of a tile that is cut by the grid border in t or h)
  are not visited: a row visits ``ceil(live / BLOCK_N)`` blocks per tile, where ``live`` is one
  past the last real token of the row's tiles. Then the live blocks of the extras region.
* Query blocks that hold only padding visit nothing and write zeros.
* Online softmax in the exp2 domain (log2(e) folded into the scale), fp32 accumulation; rows that
  see no valid key return 0 (like SDPA's safe softmax).
* Masking without a dense mask: the key tile's coordinates say how much of it is real. A block
  inside the tile's all-valid prefix is not masked at all; a block whose padding is a suffix (the
  tile tail, a tile cut in t, the extras) is masked by one compare against a scalar limit; only
  tiles cut in h or w (scattered padding) load a per-slot additive bias (0 / -inf, fp32, built
  once per layout and cached). With ``kv_valid`` the bias is built per call (O(B * L)) together
  with a per-``layout.block`` "kv keeps every real token" flag; flagged chunks use the geometry
  path, the others the bias.

Environment knobs: ``VORTA_STA_MASK_ALL=1`` adds the bias to every key block (A/B timing of the
geometry masking); ``TRITON_INTERPRET=1`` (set before triton is imported) runs one small fixed
config, no autotuning.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..layout import TileLayout
from ..sliding_tile import SlidingTileConfig

__all__ = ["sliding_tile_fwd", "sliding_tile_triton", "register", "LAYOUT_BLOCK"]

# Block (slots) that sliding_tile_triton pads every tile and the extras to. The kernel's
# BLOCK_M / BLOCK_N must divide it. Tests may lower it to keep the interpreter fast.
LAYOUT_BLOCK = 128

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (the kernel is then interpreted)."""
    return type(_sta_fwd_kernel).__name__ == "InterpretedFunction"


# ---- kernel ----------------------------------------------------------------------------------


@triton.jit
def _sta_fwd_kernel(
    Q, K, V, O, Bias, KvOk,
    s_qb, s_qh, s_qn,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_ob, s_oh, s_on,
    s_bias_b, s_full_b,
    n_heads, n_bh, qk_scale,
    T, HG, WG,  # token grid
    NT, NH, NW,  # tiles per axis
    GRID_LEN, VALID_END, TILED_LEN,  # extras occupy [GRID_LEN, VALID_END), padded to TILED_LEN
    HEAD_DIM: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,  # tile (tokens)
    WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,  # window (tiles)
    MASK_ALL: tl.constexpr,
    F32_PREC: tl.constexpr,  # dot input precision for fp32 inputs ("tf32x3" / "ieee"); None otherwise
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot mis-handles bf16 (stored as uint16)
    HAS_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    TILE_TOKENS: tl.constexpr = TT * TH * TW
    TILE_LEN: tl.constexpr = (TILE_TOKENS + LAYOUT_BLOCK - 1) // LAYOUT_BLOCK * LAYOUT_BLOCK
    PLANE: tl.constexpr = TH * TW
    NB_FULL: tl.constexpr = (TILE_TOKENS + BLOCK_N - 1) // BLOCK_N

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
    start_m = mblk * BLOCK_M

    # -- query tile coordinates, window start and span per axis
    tile_q = start_m // TILE_LEN
    o_q = start_m - tile_q * TILE_LEN
    qa = tile_q // (NH * NW)
    qb = (tile_q // NW) % NH
    qc = tile_q % NW
    live_q = ((tl.minimum(TT, T - qa * TT) - 1) * PLANE + (tl.minimum(TH, HG - qb * TH) - 1) * TW
              + tl.minimum(TW, WG - qc * TW))
    q_dead = tl.where(is_ext, start_m >= VALID_END, o_q >= live_q)

    lo_t = tl.where(is_ext, 0, tl.minimum(tl.maximum(qa - WT // 2, 0), tl.maximum(NT - WT, 0)))
    lo_h = tl.where(is_ext, 0, tl.minimum(tl.maximum(qb - WH // 2, 0), tl.maximum(NH - WH, 0)))
    lo_w = tl.where(is_ext, 0, tl.minimum(tl.maximum(qc - WW // 2, 0), tl.maximum(NW - WW, 0)))
    sp_t = tl.where(is_ext, NT, tl.minimum(NT, WT))
    sp_h = tl.where(is_ext, NH, tl.minimum(NH, WH))
    sp_w = tl.where(is_ext, NW, tl.minimum(NW, WW))

    # -- live key blocks per tile: only the last tile on an axis can be cut by the grid border,
    # so only the last dt-slab / last dh-row of the window can have fewer blocks per tile.
    vt_last = tl.minimum(TT, T - (lo_t + sp_t - 1) * TT)
    vh_last = tl.minimum(TH, HG - (lo_h + sp_h - 1) * TH)
    nb_fl = ((TT - 1) * PLANE + vh_last * TW + BLOCK_N - 1) // BLOCK_N
    nb_lf = ((vt_last - 1) * PLANE + TH * TW + BLOCK_N - 1) // BLOCK_N
    nb_ll = ((vt_last - 1) * PLANE + vh_last * TW + BLOCK_N - 1) // BLOCK_N
    slab_full = sp_w * ((sp_h - 1) * NB_FULL + nb_fl)
    slab_last = sp_w * ((sp_h - 1) * nb_lf + nb_ll)
    n_win = (sp_t - 1) * slab_full + slab_last
    n_ext = (VALID_END - GRID_LEN + BLOCK_N - 1) // BLOCK_N
    n_iter = tl.where(q_dead, 0, n_win + n_ext)

    # -- pointers (int64 bases)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    q_base = Q + off_b64 * s_qb + off_h64 * s_qh
    k_base = K + off_b64 * s_kb + off_h64 * s_kh
    v_base = V + off_b64 * s_vb + off_h64 * s_vh
    o_base = O + off_b64 * s_ob + off_h64 * s_oh
    bias_base = Bias + off_b64 * s_bias_b
    full_base = KvOk + off_b64 * s_full_b

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_offs = offs_n[:, None] * s_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * s_vn + offs_d[None, :]

    q = tl.load(q_base + start_m.to(tl.int64) * s_qn + (offs_m[:, None] * s_qn + offs_d[None, :]))
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # odometer over the window: slab dt, row dh, tile j along w, block blk inside the tile
    zero = pid * 0
    dt = zero
    dh = zero
    j = zero
    blk = zero
    for it in range(0, n_iter):
        last_t = dt == sp_t - 1
        nb_row = tl.where(dh == sp_h - 1, tl.where(last_t, nb_ll, nb_fl), tl.where(last_t, nb_lf, NB_FULL))
        ka = lo_t + dt
        kb = lo_h + dh
        kc = lo_w + j
        in_win = it < n_win
        start_n = tl.where(in_win, ((ka * NH + kb) * NW + kc) * TILE_LEN + blk * BLOCK_N,
                           GRID_LEN + (it - n_win) * BLOCK_N)
        # key validity of this block: kv_ok = the kv_valid mask keeps every real token of the
        # block's layout.block chunk; then the tile geometry decides: full block, valid prefix
        # (padding at the end of the tile / extras), or scattered padding (tile cut in h or w).
        if HAS_KV:
            kv_ok = tl.load(full_base + start_n // LAYOUT_BLOCK) != 0
        else:
            kv_ok = True
        vt = tl.minimum(TT, T - ka * TT)
        vh = tl.minimum(TH, HG - kb * TH)
        vw = tl.minimum(TW, WG - kc * TW)
        full_len = tl.where(vw < TW, vw, tl.where(vh < TH, vh * TW, tl.where(vt < TT, vt * PLANE, TILE_TOKENS)))
        lim = tl.where(in_win, full_len - blk * BLOCK_N, VALID_END - start_n)
        full = (lim >= BLOCK_N) & kv_ok
        use_bias = (not kv_ok) | (in_win & ((vw < TW) | (vh < TH)))
        # advance the odometer
        blk += 1
        wrap = blk == nb_row
        blk = tl.where(wrap, 0, blk)
        j = tl.where(wrap, j + 1, j)
        wrap = j == sp_w
        j = tl.where(wrap, 0, j)
        dh = tl.where(wrap, dh + 1, dh)
        wrap = dh == sp_h
        dh = tl.where(wrap, 0, dh)
        dt = tl.where(wrap, dt + 1, dt)

        n64 = start_n.to(tl.int64)
        k = tl.load(k_base + n64 * s_kn + k_offs)
        v = tl.load(v_base + n64 * s_vn + v_offs)
        if UPCAST:
            k = k.to(tl.float32)
        if UPCAST:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        elif F32_PREC is not None:
            qk = tl.dot(q, tl.trans(k), input_precision=F32_PREC)
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASK_ALL:
            qk += tl.load(bias_base + start_n + offs_n)[None, :]
        else:
            if not full:
                if use_bias:
                    qk += tl.load(bias_base + start_n + offs_n)[None, :]
                else:
                    qk = tl.where(offs_n[None, :] < lim, qk, float("-inf"))
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
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_base + start_m.to(tl.int64) * s_on + (offs_m[:, None] * s_on + offs_d[None, :]),
             out.to(O.dtype.element_ty))


def _autotune_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (128, 64)
        for bn in (128, 64)
        for w in (8, 4)
        for s in (3, 2)
    ]


def _smem_limit(t: torch.Tensor) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - best effort
        return 227 * 1024


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose blocks divide layout.block, that do not spill (checked offline on sm_90:
    BLOCK_M=128 on 4 warps spills; BLOCK_M=64 on 8 warps splits rows over warpgroups) and whose
    shared memory (Q + stages x (K + V) tiles) fits the device."""
    args = {**named_args, **kwargs}
    blk = int(args["LAYOUT_BLOCK"])
    d = int(args["HEAD_DIM"])
    q = args.get("Q")
    elt = q.element_size() if isinstance(q, torch.Tensor) else 2
    limit = _smem_limit(q) if isinstance(q, torch.Tensor) and q.is_cuda else 227 * 1024
    keep = []
    for c in configs:
        bm, bn, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if blk % bm or blk % bn:
            continue
        if (bm == 128 and w == 4) or (bm == 64 and w == 8):
            continue
        if elt * d * (bm + 2 * st * bn) > limit:
            continue
        keep.append(c)
    if not keep:  # e.g. layout.block of 16/32, or a small-smem GPU: the smallest config that fits
        b = max(x for x in (16, 32, 64) if blk % x == 0)
        keep = [triton.Config({"BLOCK_M": b, "BLOCK_N": b}, num_warps=4, num_stages=2)]
    return keep


def _make_tuned():
    kw = dict(
        configs=_autotune_configs(),
        key=["TILED_LEN", "HEAD_DIM", "LAYOUT_BLOCK"],  # LAYOUT_BLOCK: the pruning depends on it
        prune_configs_by={"early_config_prune": _prune_configs},
    )
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
    """(bias, kv_ok) for a layout without kv_valid; built once per (layout, device)."""
    return _key_tables(layout, device, None)


def _key_tables(layout: TileLayout, device, kv_valid):
    """bias: fp32 [Bk, tiled_len], 0 where the key may be attended, -inf where not (padding, or
    kv_valid False). kv_ok: int8 [Bk, tiled_len // block], 1 where kv_valid keeps every real token
    of that layout.block chunk (the kernel then needs only the tile geometry for masking)."""
    valid = layout.valid(device)[None]
    if kv_valid is None:
        keep, kv_ok = valid, torch.ones_like(valid)
    else:
        keep, kv_ok = kv_valid & valid, kv_valid | ~valid
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=device).masked_fill_(~keep, float("-inf"))
    kv_ok = kv_ok.view(kv_ok.shape[0], -1, layout.block).all(-1).to(torch.int8)
    return bias.contiguous(), kv_ok.contiguous()


def _check_inputs(q, k, v, layout: TileLayout, cfg: SlidingTileConfig):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"sliding_tile_fwd wants q, k, v of one shape [B, H, L, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != layout.tiled_len:
        raise ValueError(f"sliding_tile_fwd: L = {q.shape[2]} but {layout} has tiled_len {layout.tiled_len}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sliding_tile_fwd wants one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[3]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"sliding_tile_fwd supports head dims 16, 32, 64, 128, 256; got {d}")
    if tuple(layout.tile) != tuple(cfg.tile):
        raise ValueError(f"layout tile {layout.tile} != config tile {cfg.tile}")
    if layout.block % 16:
        raise ValueError(f"sliding_tile_fwd needs layout.block to be a multiple of 16, got {layout.block}")


def sliding_tile_fwd(q, k, v, layout: TileLayout, cfg: SlidingTileConfig, *, scale=None, kv_valid=None, config=None):
    """Sliding-tile attention on tiled tensors.

    q, k, v: [B, H, layout.tiled_len, D] in the tiled order (padded slots finite, e.g. zero, as
    ``layout.to_tiled`` makes them). kv_valid: optional bool [B, tiled_len] (or [1, tiled_len]),
    True = key may be attended, in the tiled order. Returns [B, H, tiled_len, D] (contiguous) in
    the tiled order; rows of padded slots are zero or arbitrary finite values.

    config: optional dict with BLOCK_M, BLOCK_N (and num_warps, num_stages) to bypass autotuning.
    """
    _check_inputs(q, k, v, layout, cfg)
    if not (q.is_cuda or _interpreting()):
        raise RuntimeError("sliding_tile_fwd needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, L, D = q.shape
    device = q.device
    if kv_valid is None:
        bias, full = _layout_tables(layout, device)
    else:
        kv_valid = kv_valid.to(device=device, dtype=torch.bool)
        if kv_valid.dim() != 2 or kv_valid.shape[1] != L or kv_valid.shape[0] not in (1, B):
            raise ValueError(f"kv_valid must be bool [B, {L}] or [1, {L}], got {tuple(kv_valid.shape)}")
        bias, full = _key_tables(layout, device, kv_valid)
    s_bias_b = bias.stride(0) if bias.shape[0] > 1 else 0
    s_full_b = full.stride(0) if full.shape[0] > 1 else 0

    o = torch.empty((B, H, L, D), dtype=q.dtype, device=device)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    T, Hg, Wg = layout.grid
    nt, nh, nw = layout.n_tiles
    args = (
        q, k, v, o, bias, full,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        s_bias_b, s_full_b,
        H, B * H, float(scale) * _LOG2E,
        T, Hg, Wg, nt, nh, nw,
        layout.grid_len, layout.grid_len + layout.n_extra, layout.tiled_len,
    )
    meta = dict(
        HEAD_DIM=D, LAYOUT_BLOCK=layout.block,
        TT=layout.tile[0], TH=layout.tile[1], TW=layout.tile[2],
        WT=cfg.window[0], WH=cfg.window[1], WW=cfg.window[2],
        MASK_ALL=os.environ.get("VORTA_STA_MASK_ALL", "0") == "1",
        F32_PREC=_f32_precision(device) if q.dtype == torch.float32 else None,
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        HAS_KV=kv_valid is not None,
    )

    def grid(m):
        return ((L // m["BLOCK_M"]) * B * H,)

    if config is None and _interpreting():
        config = _INTERPRET_CONFIG
    if config is not None:
        c = {"num_warps": 4, "num_stages": 1 if _interpreting() else 2, **config}
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if layout.block % bm or layout.block % bn:
            raise ValueError(f"BLOCK_M={bm} / BLOCK_N={bn} must divide layout.block={layout.block}")
        _sta_fwd_kernel[grid(c)](*args, **meta, **c)
    else:
        _sta_fwd_tuned[grid](*args, **meta)
    return o


def sliding_tile_triton(q, k, v, grid, cfg: SlidingTileConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None):
    """Backend with the signature of sliding_tile_reference: q, k, v [B, H, L, D] in the original
    (t-major) order -> [B, H, L, D]."""
    layout = TileLayout(grid, cfg.tile, LAYOUT_BLOCK, n_prefix, n_suffix)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[2] != layout.seq_len:
        raise ValueError(
            f"sliding_tile_triton wants q, k, v of one shape [B, H, {layout.seq_len}, D] for grid "
            f"{tuple(layout.grid)} + {n_prefix} prefix + {n_suffix} suffix tokens, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    qt, kt, vt = (layout.to_tiled(x) for x in (q, k, v))
    kv_valid = None
    if kv_mask is not None:
        src = layout.src_index(q.device)
        km = kv_mask.to(device=q.device, dtype=torch.bool)
        if km.dim() == 1:
            km = km[None]
        kv_valid = km.index_select(-1, src.clamp(min=0)) & (src >= 0)[None]
    out = sliding_tile_fwd(qt, kt, vt, layout, cfg, scale=scale, kv_valid=kv_valid)
    return layout.from_tiled(out)


def register() -> None:
    """Register this kernel as the "triton" sliding-tile backend."""
    from ..sliding_tile import register_backend

    register_backend("triton", sliding_tile_triton)
