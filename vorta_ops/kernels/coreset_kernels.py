"""Triton kernels of the fused core-set (BCS) path: the ``@triton.jit`` code only. Their launch
parameters are ``coreset_configs.py``, the launchers (shape checks, compact buffers, grids,
strides) ``coreset_triton.py``, whose docstring gives the slot order of the compact tensors.

* ``_select_gather_kernel``: one program per (batch * head, group of NBK buckets), plus a few
  programs per (batch * head) for the always-kept "rest" tokens. A bucket program builds the
  original positions of its buckets' tokens from the grid coordinates (bucket dims are
  constexprs), loads the similarity source straight from the strided input as an [NBK, GP, D]
  block (GP = bucket size padded to a power of two, masked), computes the cosine similarity of
  every margin to its centre in fp32, ranks the margins by pairwise comparison in registers
  (``_margin_rank``: least similar first; ties keep the lower margin index, like a stable
  argsort) and writes the kept rows of q, k and v into the compact tensors, the ``back`` map and
  optionally the gather positions.
* ``_expand_kernel``: out[b, h, l, :] = oc[b, h, back[b, h, l], :], one program per
  (batch * head, block of rows), through arbitrary output strides.
* Head subsets: an int32 or int64 head table; program head i reads / writes head ``Heads[i]`` of
  the full q, k, v / out (``_program_ids``). HAS_HEADS is a constexpr.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _program_ids(n_heads, Heads, HAS_HEADS: tl.constexpr, HEADS_FAST: tl.constexpr):
    """(batch, head, full-tensor head, block) of this program: ``head`` indexes the n_heads
    program heads (compact tensors, back), the full-tensor head the full q, k, v / out: Heads[head]
    with HAS_HEADS, else head. HEADS_FAST: consecutive programs take the same tokens of the next
    head (head-inner memory, so neighbours read neighbouring bytes)."""
    if HEADS_FAST:
        bh = tl.program_id(0)
        pid = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1)
    h = (bh % n_heads).to(tl.int64)
    if HAS_HEADS:
        full_h = tl.load(Heads + h).to(tl.int64)
    else:
        full_h = h
    return (bh // n_heads).to(tl.int64), h, full_h, pid


@triton.jit
def _margin_rank(x, is_c, g, gvalid):
    """x [NBK, GP, BLOCK_D] fp32 -> rank [NBK, GP] int32 of every margin by cosine similarity to
    its bucket's centre (0 = least similar; ties: lower local index first). Centre / padding
    entries get arbitrary ranks (the caller masks them)."""
    nrm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=2)), 1e-12)  # [NBK, GP], like F.normalize's eps
    cen = tl.sum(tl.where(is_c[None, :, None], x, 0.0), axis=1)  # [NBK, BLOCK_D]
    cnrm = tl.maximum(tl.sqrt(tl.sum(cen * cen, axis=1)), 1e-12)  # [NBK]
    sim = tl.sum(x * cen[:, None, :], axis=2) / (nrm * cnrm[:, None])  # [NBK, GP]
    sim = tl.where(sim == sim, sim, 3.0)  # NaN ranks last, like torch's sort (keeps ranks unique)
    marg = gvalid & ~is_c  # [GP]
    si = sim[:, :, None]
    sj = sim[:, None, :]
    gi = g[None, :, None]
    gj = g[None, None, :]
    before = ((sj < si) | ((sj == si) & (gj < gi))) & marg[None, None, :]  # j is ranked before i
    return tl.sum(before.to(tl.int32), axis=2)


@triton.jit
def _select_gather_kernel(
    Q, K, V, QC, KC, VC, BACK, GQ, GK, REST, Heads,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    n_heads, L, Lc,  # n_heads: program (= compact) heads, the subset's size with HAS_HEADS
    n_bucket, nw_b, nhw_b,  # buckets in total, along w, per t-slab (nh * nw)
    Hg, Wg, n_prefix, n_rest, n_bucket_progs,
    D: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    GP: tl.constexpr, NBK: tl.constexpr, NK: tl.constexpr,
    BLOCK_D: tl.constexpr, REST_BLOCK: tl.constexpr,
    MODE_QK: tl.constexpr, WRITE_GATHER: tl.constexpr, HAS_HEADS: tl.constexpr, HEADS_FAST: tl.constexpr,
):
    b, h, full_h, pid = _program_ids(n_heads, Heads, HAS_HEADS, HEADS_FAST)
    q_base = Q + b * s_qb + full_h * s_qh
    k_base = K + b * s_kb + full_h * s_kh
    v_base = V + b * s_vb + full_h * s_vh
    bh64 = b * n_heads + h
    c_base = bh64 * Lc * D  # compact tensors: contiguous [B, H, Lc, D]
    back_base = BACK + bh64 * L
    gq_base = GQ + bh64 * Lc
    gk_base = GK + bh64 * Lc
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    G: tl.constexpr = BT * BH * BW
    C: tl.constexpr = (BT // 2) * BH * BW + (BH // 2) * BW + BW // 2  # local index of the centre

    if pid < n_bucket_progs:
        bidx = pid * NBK + tl.arange(0, NBK)  # [NBK] bucket ids
        bvalid = bidx < n_bucket
        it = bidx // nhw_b
        ih = (bidx % nhw_b) // nw_b
        iw = bidx % nw_b
        g = tl.arange(0, GP)  # local index, raster (t, h, w) inside the bucket
        gt = g // (BH * BW)
        gh = (g // BW) % BH
        gw = g % BW
        gvalid = g < G
        is_c = g == C
        pos = n_prefix + ((it[:, None] * BT + gt[None, :]) * Hg + ih[:, None] * BH + gh[None, :]) * Wg \
            + iw[:, None] * BW + gw[None, :]  # [NBK, GP] original positions
        tmask = bvalid[:, None] & gvalid[None, :]
        pos64 = pos.to(tl.int64)
        m3 = tmask[:, :, None] & dmask[None, None, :]
        bcol = bidx[:, None]

        # ---- query core-set (and, in mode "q", the key core-set too)
        qx = tl.load(q_base + pos64[:, :, None] * s_qn + d[None, None, :] * s_qd, mask=m3, other=0.0)
        if NK > 1:
            rq = _margin_rank(qx.to(tl.float32), is_c, g, gvalid)
            keep_q = (rq < NK - 1) | is_c[None, :]
            slot_q = tl.where(is_c[None, :], bcol, n_bucket + bcol * (NK - 1) + rq)
        else:
            keep_q = is_c[None, :] & (bcol >= 0)
            slot_q = bcol + g[None, :] * 0
        keep_q = keep_q & tmask
        tl.store(back_base + pos, tl.where(keep_q, slot_q, bcol), mask=tmask)
        sq64 = slot_q.to(tl.int64)
        wq = keep_q[:, :, None] & dmask[None, None, :]
        tl.store(QC + c_base + sq64[:, :, None] * D + d[None, None, :], qx, mask=wq)
        if WRITE_GATHER:
            tl.store(gq_base + slot_q, pos, mask=keep_q)

        # ---- keys (v follows k's selection)
        if MODE_QK:
            kx = tl.load(k_base + pos64[:, :, None] * s_kn + d[None, None, :] * s_kd, mask=m3, other=0.0)
            if NK > 1:
                rk = _margin_rank(kx.to(tl.float32), is_c, g, gvalid)
                keep_k = ((rk < NK - 1) | is_c[None, :]) & tmask
                slot_k = tl.where(is_c[None, :], bcol, n_bucket + bcol * (NK - 1) + rk)
            else:
                keep_k = keep_q
                slot_k = slot_q
            if WRITE_GATHER:
                tl.store(gk_base + slot_k, pos, mask=keep_k)
        else:  # k follows q: only the kept rows are read
            keep_k = keep_q
            slot_k = slot_q
            kx = tl.load(k_base + pos64[:, :, None] * s_kn + d[None, None, :] * s_kd, mask=wq, other=0.0)
        sk64 = slot_k.to(tl.int64)
        wk = keep_k[:, :, None] & dmask[None, None, :]
        tl.store(KC + c_base + sk64[:, :, None] * D + d[None, None, :], kx, mask=wk)
        vx = tl.load(v_base + pos64[:, :, None] * s_vn + d[None, None, :] * s_vd, mask=wk, other=0.0)
        tl.store(VC + c_base + sk64[:, :, None] * D + d[None, None, :], vx, mask=wk)
    else:
        # ---- always-kept tokens: remainder grid tokens, then extras
        r = (pid - n_bucket_progs) * REST_BLOCK + tl.arange(0, REST_BLOCK)
        rmask = r < n_rest
        rpos = tl.load(REST + r, mask=rmask, other=0)
        rslot = n_bucket * NK + r
        rpos64 = rpos.to(tl.int64)
        rm2 = rmask[:, None] & dmask[None, :]
        dst = c_base + rslot.to(tl.int64)[:, None] * D + d[None, :]
        rx = tl.load(q_base + rpos64[:, None] * s_qn + d[None, :] * s_qd, mask=rm2, other=0.0)
        tl.store(QC + dst, rx, mask=rm2)
        rx = tl.load(k_base + rpos64[:, None] * s_kn + d[None, :] * s_kd, mask=rm2, other=0.0)
        tl.store(KC + dst, rx, mask=rm2)
        rx = tl.load(v_base + rpos64[:, None] * s_vn + d[None, :] * s_vd, mask=rm2, other=0.0)
        tl.store(VC + dst, rx, mask=rm2)
        tl.store(back_base + rpos, rslot, mask=rmask)
        if WRITE_GATHER:
            tl.store(gq_base + rslot, rpos, mask=rmask)
            if MODE_QK:
                tl.store(gk_base + rslot, rpos, mask=rmask)


@triton.jit
def _expand_kernel(
    OC, BACK, OUT, Heads,
    s_cb, s_ch, s_cn, s_cd,
    s_ob, s_oh, s_on, s_od,
    n_heads, L,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_HEADS: tl.constexpr,
    HEADS_FAST: tl.constexpr,
):
    b, h, full_h, pid = _program_ids(n_heads, Heads, HAS_HEADS, HEADS_FAST)
    rows = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < L
    d = tl.arange(0, BLOCK_D)
    m2 = rmask[:, None] & (d < D)[None, :]
    src = tl.load(BACK + (b * n_heads + h) * L + rows, mask=rmask, other=0).to(tl.int64)
    x = tl.load(OC + b * s_cb + h * s_ch + src[:, None] * s_cn + d[None, :] * s_cd, mask=m2, other=0.0)
    tl.store(OUT + b * s_ob + full_h * s_oh + rows.to(tl.int64)[:, None] * s_on + d[None, :] * s_od, x, mask=m2)
