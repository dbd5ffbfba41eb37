"""Block-sparse Triton forward kernel for 3D sliding-tile attention (STA): the ``@triton.jit``
code only. Its autotune table is ``sliding_tile_configs.py``, its launcher (tables, shape checks,
grid, strides) ``sliding_tile_triton.py``; that module's docstring gives the index tables.

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
* Head subsets: an int32 or int64 head table, program head i works on head ``Heads[i]`` of the
  full q, k, v and out (one table for all four). HAS_HEADS is a constexpr: without a subset the
  table is never loaded.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .fp8_kernels import _attend_e4m3, _quant_rows, _scores_e4m3

__all__ = ["interpreting"]


def interpreting() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (the kernel is then interpreted)."""
    return type(_sta_fwd_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, qk_scale):
    """The online softmax's update for one key block (exp2 domain, log2(e) folded into qk_scale):
    qk masked fp32 scores (unscaled) -> (p, new running max, new row sum, acc rescaled); rows with no
    valid key yet keep p = 0. (The fp8 path's step is fp8_kernels._attend_e4m3.)"""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step: qk (already masked, unscaled) -> updated (m_i, l_i, acc)."""
    p, m_new, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
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
def _load_kv8(k8_base, v8_base, slot, offs_n, offs_d, LP, HEAD_DIM: tl.constexpr):
    """BLOCK_N prepared key slots from `slot` on: K8 rows [N, D] and V8T columns [D, N]. V transposed
    is what Hopper's FP8 tensor-core instruction wants for P . V: measured on the H200 (Wan-14B 720p,
    aligned tiles), V in rows doubles the kernel's time and quantising K / V per block in the loop
    quadruples it (bench/results/attention*-nvidia-h200.md)."""
    cols = slot + offs_n
    k8 = tl.load(k8_base + cols[:, None] * HEAD_DIM + offs_d[None, :])
    v8t = tl.load(v8_base + offs_d[:, None] * LP + cols[None, :])
    return k8, v8t


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
    Q, K, V, O, QSrc, KSrc, Bias, KvGridOk, Heads, VScale, K8, KScale, V8T,
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
    H_ALL,  # heads of q, k, v (rows of VScale per batch)
    LP,  # FP8: slots per program head of K8 / V8T (packed key order, zero padded)
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
    FP8: tl.constexpr,  # e4m3 Q, K, P, V (vorta_ops/fp8.py's scheme): K and V read from the preparation pass's
    #   packed K8 [B*n_heads, LP, D], V8T [B*n_heads, D, LP] (fp8_kernels._fp8_kv_prep_kernel), KScale [B, H_ALL];
    #   Q quantised per row here; VScale [B, H_ALL, D] fp32
    FP8_UPCAST: tl.constexpr,  # interpreter: e4m3 dot operands computed in fp32
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
        off_h = tl.load(Heads + off_h).to(tl.int32)  # int32 or int64 tables
    bh64 = bh.to(tl.int64)  # FP8: the program head's rows of K8 / V8T
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
    if FP8:
        q8, q_s = _quant_rows(q, FP8_UPCAST)
        c = q_s * (tl.load(KScale + off_b64 * H_ALL + off_h64) * qk_scale)  # the row's factor (_attend_e4m3)
        v_s = tl.load(VScale + (off_b64 * H_ALL + off_h64) * HEAD_DIM + offs_d)
        k8_base = K8 + bh64 * LP * HEAD_DIM
        v8_base = V8T + bh64 * HEAD_DIM * LP

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
        if not FP8:
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

        if FP8:
            k8, v8t = _load_kv8(k8_base, v8_base, slot, offs_n, offs_d, LP, HEAD_DIM)
            qk = _scores_e4m3(q8, k8, FP8_UPCAST)
        else:
            k, v = _load_kv(k_base, v_base, row, s_kn, s_vn, offs_d, KV_SAME_STRIDE)
            qk = _scores(q, k, F32_PREC, UPCAST)
        if MASK_ALL:
            qk = tl.where(offs_n[None, :] < lim, qk + tl.load(bias_base + slot + offs_n)[None, :], float("-inf"))
        else:
            if not full:  # the row's last block, or a kv_mask that masks grid keys
                if use_bias:
                    qk += tl.load(bias_base + slot + offs_n)[None, :]
                qk = tl.where(offs_n[None, :] < lim, qk, float("-inf"))
        if FP8:
            m_i, l_i, acc = _attend_e4m3(v8t, qk, c, m_i, l_i, acc, FP8_UPCAST)
        else:
            m_i, l_i, acc = _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC, UPCAST)

    # ---- loop 2: the extras (prefix + suffix tokens), zero iterations when there are none
    for it in range(0, n_ext):
        slot = N_GRID + it * BLOCK_N
        lim = N_EXTRA - it * BLOCK_N
        if FP8:
            k8, v8t = _load_kv8(k8_base, v8_base, slot, offs_n, offs_d, LP, HEAD_DIM)
            qk = _scores_e4m3(q8, k8, FP8_UPCAST)
        else:
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
        if FP8:
            m_i, l_i, acc = _attend_e4m3(v8t, qk, c, m_i, l_i, acc, FP8_UPCAST)
        else:
            m_i, l_i, acc = _attend(q, k, v, qk, m_i, l_i, acc, qk_scale, F32_PREC, UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    if FP8:
        acc = acc * v_s[None, :]  # V's channel scales (P's scale is in l too)
    out = acc / l_i[:, None]
    tl.store(o_base + (row_q[:, None] * s_on + offs_d[None, :]), out.to(O.dtype.element_ty), mask=valid_q[:, None])
