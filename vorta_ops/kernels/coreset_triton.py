"""Fused Triton path for bucketed core-set (BCS) attention.

Semantics are those of ``vorta_ops.coreset.coreset_attention`` (same selection, same slot order);
only the data movement is fused. Three launches (plus the attention itself):

1. ``_select_gather_kernel`` -- one program per (batch * head, group of NBK buckets), plus a few
   programs per (batch * head) for the always-kept "rest" tokens. A bucket program builds the
   original positions of its buckets' tokens from the grid coordinates (bucket dims are
   constexprs), loads the similarity source straight from the strided input as an
   [NBK, GP, D] block (GP = bucket size padded to a power of two, masked), computes the cosine
   similarity of every margin to its centre in fp32, ranks the margins by pairwise comparison in
   registers (least similar first; ties keep the lower margin index, like a stable argsort) and
   writes the kept rows of q, k and v into compact contiguous [B, H, Lc, D] tensors:

       slot b                              centre of bucket b
       slot nb + b * (n_keep - 1) + r      margin of bucket b with rank r < n_keep - 1
       slot nb * n_keep + i                rest token i (remainder grid tokens, then extras)

   With similarity "qk" k is ranked on its own and v follows k. It also writes the int32 map
   ``back`` [B, H, L]: for every original token the compact query slot whose output it receives
   (its own slot, or its centre's slot b when dropped), and optionally the int32 original
   positions of the query / key core-sets (``gather``, needed for a kv_mask).
2. Attention on the compact tensors (``vorta_ops.full.full_attention``; SDPA with a per-head
   boolean mask when a kv_mask is given).
3. ``_expand_kernel`` -- out[b, h, l, :] = oc[b, h, back[b, h, l], :], one program per
   (batch * head, block of rows), writing through arbitrary output strides (e.g. straight into a
   [B, L, H, D] buffer viewed as [B, H, L, D]).

Inputs are never made contiguous: every stride is passed. q/k/v are read once, the compact
tensors written once, the compact output read ~once and the output written once.

Head subsets (``heads=``, routed dispatch's scattered heads): an int32 head table, program head i
reads head ``heads[i]`` of the full q, k, v (and the expansion writes head ``heads[i]`` of the full
out), while the compact tensors and ``back`` hold the subset's heads only, in table order. A
scattered subset is then neither gathered nor scattered back, and out's other heads are not
touched. HAS_HEADS is a constexpr: without a subset the table is never loaded.

On tensors that are not on CUDA (and without ``TRITON_INTERPRET=1``) ``coreset_triton`` falls back
to the torch implementation.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._backends import check_heads, kernel_head_table, require_out, run_on_heads
from ..coreset import CoresetConfig, bucket_index
from ..full import full_attention
from ..layout import check_grid

__all__ = ["CoresetCompact", "coreset_select_gather", "coreset_expand", "coreset_triton", "register"]

# Tokens (NBK * GP) per bucket program, and rows per rest / expand program. Knobs for tuning.
TOKENS_PER_PROGRAM = 64
REST_BLOCK = 32
EXPAND_BLOCK_L = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- kernels ---------------------------------------------------------------------------------


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


# ---- host side -------------------------------------------------------------------------------


class CoresetCompact(NamedTuple):
    """Output of ``coreset_select_gather``. qc, kc, vc: contiguous [B, H, Lc, D]; back: int32
    [B, H, L] (core-set slot each original token reads); q_gather / k_gather: int32 [B, H, Lc]
    original positions of the slots (None unless asked for; k_gather is q_gather in mode "q").
    With a head subset, H is the subset's size (its heads in the order given)."""

    qc: torch.Tensor
    kc: torch.Tensor
    vc: torch.Tensor
    back: torch.Tensor
    q_gather: torch.Tensor | None
    k_gather: torch.Tensor | None


def _on_device(device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _heads_fast(x: torch.Tensor, n_progs: int) -> bool:
    """Order the programs head-fastest when the heads of a token are adjacent in memory
    ([B, L, H, D] underneath): neighbouring programs then stream neighbouring memory."""
    return x.shape[1] > 1 and abs(x.stride(1)) < abs(x.stride(2)) and n_progs <= 65535


@functools.lru_cache(maxsize=32)
def _rest_index(grid, bucket, n_prefix, n_suffix, device) -> torch.Tensor:
    rest = bucket_index(grid, bucket, n_prefix, n_suffix, device).rest
    return rest.to(device=device, dtype=torch.int32).contiguous()


def _check_qkv(q, k, v, L, grid, n_prefix, n_suffix, who):
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape or q.shape[2] != L:
        raise ValueError(
            f"{who} wants q, k, v of shape [B, H, {L}, D] (grid {tuple(grid)} + {n_prefix}+{n_suffix} "
            f"extra tokens), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{who} wants one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{who}: q, k, v on different devices")


def coreset_select_gather(
    q, k, v, grid, cfg: CoresetConfig = CoresetConfig(), n_prefix: int = 0, n_suffix: int = 0,
    *, return_gather: bool = False, heads=None,
) -> CoresetCompact:
    """Select the core-sets and gather them in one launch. q, k, v: [B, H, L, D], any strides.
    heads: optional head subset (list of ints or 1-D int tensor; unique, in [0, H)): only those
    heads of q, k, v are read, and the compact tensors hold them alone, in that order."""
    grid = check_grid(grid)
    T, Hg, Wg = grid
    L = n_prefix + T * Hg * Wg + n_suffix
    _check_qkv(q, k, v, L, grid, n_prefix, n_suffix, "coreset_select_gather")
    B, _, _, D = q.shape
    bt, bh, bw = cfg.bucket
    nt, nh, nw = T // bt, Hg // bh, Wg // bw
    nb = nt * nh * nw
    nk = cfg.n_keep
    rest = _rest_index(grid, cfg.bucket, n_prefix, n_suffix, q.device)
    H, head_tab = kernel_head_table(heads, q.shape[1], q.device, "coreset_select_gather", rest)
    n_rest = rest.numel()
    Lc = nb * nk + n_rest
    dev = q.device
    qc = torch.empty(B, H, Lc, D, dtype=q.dtype, device=dev)
    kc = torch.empty_like(qc)
    vc = torch.empty_like(qc)
    back = torch.empty(B, H, L, dtype=torch.int32, device=dev)
    mode_qk = cfg.similarity == "qk"
    if return_gather:
        gq = torch.empty(B, H, Lc, dtype=torch.int32, device=dev)
        gk = torch.empty_like(gq) if mode_qk else gq
    else:
        gq = gk = back  # dummies, never written
    gp = triton.next_power_of_2(cfg.bucket_size)
    nbk = max(1, TOKENS_PER_PROGRAM // gp)
    n_bucket_progs = triton.cdiv(nb, nbk)
    n_progs = n_bucket_progs + triton.cdiv(n_rest, REST_BLOCK)
    block_d = triton.next_power_of_2(D)
    heads_fast = _heads_fast(q, n_progs)
    if n_progs and B * H:
        with _on_device(dev):
            _select_gather_kernel[(B * H, n_progs) if heads_fast else (n_progs, B * H)](
                q, k, v, qc, kc, vc, back, gq, gk, rest, head_tab,
                *q.stride(), *k.stride(), *v.stride(),
                H, L, Lc,
                nb, nw, nh * nw,
                Hg, Wg, n_prefix, n_rest, n_bucket_progs,
                D=D, BT=bt, BH=bh, BW=bw, GP=gp, NBK=nbk, NK=nk,
                BLOCK_D=block_d, REST_BLOCK=REST_BLOCK,
                MODE_QK=mode_qk, WRITE_GATHER=return_gather, HAS_HEADS=heads is not None, HEADS_FAST=heads_fast,
                num_warps=8 if gp * nbk * block_d >= 8192 else 4,
            )
    return CoresetCompact(qc, kc, vc, back, gq if return_gather else None, gk if return_gather else None)


def coreset_expand(oc: torch.Tensor, back: torch.Tensor, out: torch.Tensor, heads=None) -> torch.Tensor:
    """out[b, h, l, :] = oc[b, h, back[b, h, l], :]. oc [B, H, Lc, D] and out [B, H, L, D] with
    any strides; back contiguous int32 [B, H, L]. Returns out.
    heads: optional head subset of out's heads (list of ints or 1-D int tensor; unique): oc and
    back hold those heads (in that order), out[b, heads[i]] receives oc[b, i]; out's other heads
    are left untouched."""
    B, H_out, L, D = out.shape
    back = back.contiguous()
    H, head_tab = kernel_head_table(heads, H_out, out.device, "coreset_expand", back)
    if oc.shape[:2] != (B, H) or oc.shape[3] != D or back.shape != (B, H, L):
        raise ValueError(
            f"coreset_expand: expected oc [{B}, {H}, Lc, {D}] and back [{B}, {H}, {L}] for out {tuple(out.shape)}"
            f"{'' if heads is None else f' and {H} heads'}, got oc {tuple(oc.shape)}, back {tuple(back.shape)}"
        )
    n_progs = triton.cdiv(L, EXPAND_BLOCK_L)
    heads_fast = _heads_fast(out, n_progs)
    if B * H * L:
        with _on_device(out.device):
            _expand_kernel[(B * H, n_progs) if heads_fast else (n_progs, B * H)](
                oc, back, out, head_tab, *oc.stride(), *out.stride(), H, L,
                D=D, BLOCK_L=EXPAND_BLOCK_L, BLOCK_D=triton.next_power_of_2(D), HAS_HEADS=heads is not None,
                HEADS_FAST=heads_fast, num_warps=4,
            )
    return out


def coreset_triton(
    q, k, v, grid, cfg: CoresetConfig = CoresetConfig(), n_prefix: int = 0, n_suffix: int = 0,
    *, kv_mask=None, scale=None, out=None, heads=None,
):
    """Core-set attention (semantics of ``coreset_attention``). q, k, v: [B, H, L, D] original
    order, any strides -> [B, H, L, D] (``out`` if given, else a new tensor laid out like q).
    heads: optional head subset (list of ints or 1-D int tensor; unique, in [0, H)): only those
    heads are computed, read from the full q, k, v and written into ``out`` (then required), whose
    other heads are left untouched. The device head table is cached per (heads, device)."""
    grid = check_grid(grid)
    L = n_prefix + math.prod(grid) + n_suffix
    _check_qkv(q, k, v, L, grid, n_prefix, n_suffix, "coreset_triton")
    if heads is not None:
        require_out(out, q, "coreset_triton")
    if out is not None and (out.shape != q.shape or out.device != q.device):
        raise ValueError(f"coreset_triton: out must be {tuple(q.shape)} on {q.device}, got {tuple(out.shape)}")
    if not (q.is_cuda or _interpreting()):
        from ..coreset import coreset_attention

        kw = dict(kv_mask=kv_mask, scale=scale)
        if heads is not None:
            return run_on_heads(coreset_attention, q, k, v, grid, cfg, n_prefix, n_suffix, heads=heads, out=out,
                                who="coreset_triton", **kw)
        res = coreset_attention(q, k, v, grid, cfg, n_prefix, n_suffix, **kw)
        return res if out is None else out.copy_(res)
    if heads is not None:  # validated once; the launches look the tuple's table up in the cache
        heads = check_heads(heads, q.shape[1], "coreset_triton")
    cs = coreset_select_gather(q, k, v, grid, cfg, n_prefix, n_suffix, return_gather=kv_mask is not None, heads=heads)
    if kv_mask is None:
        oc = full_attention(cs.qc, cs.kc, cs.vc, scale=scale)
    else:
        B, H, Lc = cs.k_gather.shape  # H: the subset's heads with heads=
        km = kv_mask.to(device=q.device, dtype=torch.bool)
        if km.dim() == 1:
            km = km[None]
        km = km.expand(B, L)
        mask = km.gather(1, cs.k_gather.reshape(B, H * Lc).long()).view(B, H, 1, Lc)
        oc = F.scaled_dot_product_attention(cs.qc, cs.kc, cs.vc, attn_mask=mask, scale=scale)
    if out is None:
        out = torch.empty_like(q)
    if oc.dtype != out.dtype:
        oc = oc.to(out.dtype)
    return coreset_expand(oc, cs.back, out, heads=heads)


def register() -> None:
    """Register this path as the "triton" core-set backend (writes into out=, takes heads=)."""
    from ..coreset import register_backend

    register_backend("triton", coreset_triton, writes_out=True, takes_heads=True)


# ---- benchmark (CUDA): python -m vorta_ops.kernels.coreset_triton --help ---------------------


def _bench(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="time select+gather / attention / expand of the fused core-set path")
    ap.add_argument("--grid", type=int, nargs=3, default=(20, 45, 80))
    ap.add_argument("--bucket", type=int, nargs=3, default=(2, 3, 2))
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--sim", choices=("q", "qk"), default="q")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--torch", action="store_true", help="also time the torch coreset_attention")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs CUDA")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    cfg = CoresetConfig(tuple(a.bucket), a.keep, a.sim)
    grid = tuple(a.grid)
    L = math.prod(grid)
    B, H, D = a.batch, a.heads, a.dim
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    buf = torch.empty(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)

    from .timing import cuda_median_ms

    def timed(fn):
        return cuda_median_ms(fn, warmup=1, iters=a.iters)

    cs = coreset_select_gather(q, k, v, grid, cfg)
    oc = full_attention(cs.qc, cs.kc, cs.vc)
    t_sel = timed(lambda: coreset_select_gather(q, k, v, grid, cfg))
    t_att = timed(lambda: full_attention(cs.qc, cs.kc, cs.vc))
    t_exp = timed(lambda: coreset_expand(oc, cs.back, buf))
    t_all = timed(lambda: coreset_triton(q, k, v, grid, cfg, out=buf))
    nbytes = q.element_size() * B * H * D
    Lc = cs.qc.shape[2]
    print(f"grid {grid} bucket {cfg.bucket} keep {a.keep} sim {a.sim} B {B} H {H} D {D} {a.dtype}: L {L} -> Lc {Lc}")
    rd = L + (L if a.sim == "qk" else Lc) + Lc  # rows read by select (q all; k all or kept; v kept)
    print(f"select+gather {t_sel:8.3f} ms  ({(rd + 3 * Lc) * nbytes / t_sel / 1e6:7.0f} GB/s)")
    print(f"attention     {t_att:8.3f} ms")
    print(f"expand        {t_exp:8.3f} ms  ({(Lc + L) * nbytes / t_exp / 1e6:7.0f} GB/s)")
    print(f"total         {t_all:8.3f} ms  overhead (select+expand)/attention = {100 * (t_sel + t_exp) / t_att:.2f} %")
    if a.torch:
        from ..coreset import coreset_attention

        t_ref = timed(lambda: coreset_attention(q, k, v, grid, cfg))
        print(f"torch coreset_attention {t_ref:8.3f} ms")
        ref = coreset_attention(q, k, v, grid, cfg)
        got = coreset_triton(q, k, v, grid, cfg)
        bad = ((got.float() - ref.float()).abs().amax(-1) > 2e-2).float().mean().item()
        print(f"rows differing from torch: {100 * bad:.4f} %")


if __name__ == "__main__":
    _bench()
