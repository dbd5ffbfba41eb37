"""Launchers of the fused Triton path for bucketed core-set (BCS) attention. The ``@triton.jit``
kernels are ``coreset_kernels.py``, their launch parameters ``coreset_configs.py``.

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
   boolean mask when a kv_mask is given; with precision "fp8" ``fp8_triton.fp8_attention``).
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

Self-timing on a GPU: ``python -m bench.coreset_kernel``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from .._backends import HeadTable, head_index, kernel_head_table, require_out, run_on_heads
from ..coreset import CoresetConfig, bucket_index
from ..fp8 import PRECISIONS
from ..full import full_attention
from ..layout import check_grid
from . import coreset_configs as cc
from .coreset_kernels import _expand_kernel, _select_gather_kernel
from .fp8_triton import check_fp8_device, fp8_attention
from .sliding_tile_kernel import interpreting

__all__ = ["CoresetCompact", "coreset_select_gather", "coreset_expand", "coreset_triton", "register"]


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
    meta = cc.select_gather_meta(cfg.bucket_size, D)
    n_bucket_progs = triton.cdiv(nb, meta["NBK"])
    n_progs = n_bucket_progs + triton.cdiv(n_rest, cc.REST_BLOCK)
    heads_fast = _heads_fast(q, n_progs)
    if n_progs and B * H:
        with _on_device(dev):
            _select_gather_kernel[(B * H, n_progs) if heads_fast else (n_progs, B * H)](
                q, k, v, qc, kc, vc, back, gq, gk, rest, head_tab,
                *q.stride(), *k.stride(), *v.stride(),
                H, L, Lc,
                nb, nw, nh * nw,
                Hg, Wg, n_prefix, n_rest, n_bucket_progs,
                D=D, BT=bt, BH=bh, BW=bw, NK=nk, REST_BLOCK=cc.REST_BLOCK,
                MODE_QK=mode_qk, WRITE_GATHER=return_gather, HAS_HEADS=heads is not None, HEADS_FAST=heads_fast,
                **meta,
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
    n_progs = triton.cdiv(L, cc.EXPAND_BLOCK_L)
    heads_fast = _heads_fast(out, n_progs)
    if B * H * L:
        with _on_device(out.device):
            _expand_kernel[(B * H, n_progs) if heads_fast else (n_progs, B * H)](
                oc, back, out, head_tab, *oc.stride(), *out.stride(), H, L,
                D=D, BLOCK_L=cc.EXPAND_BLOCK_L, BLOCK_D=triton.next_power_of_2(D), HAS_HEADS=heads is not None,
                HEADS_FAST=heads_fast, num_warps=cc.EXPAND_NUM_WARPS,
            )
    return out


def coreset_triton(
    q, k, v, grid, cfg: CoresetConfig = CoresetConfig(), n_prefix: int = 0, n_suffix: int = 0,
    *, kv_mask=None, scale=None, out=None, heads=None, precision: str = "bf16",
):
    """Core-set attention (semantics of ``coreset_attention``). q, k, v: [B, H, L, D] original
    order, any strides -> [B, H, L, D] (``out`` if given, else a new tensor laid out like q).
    heads: optional head subset (list of ints or 1-D int tensor; unique, in [0, H)): only those
    heads are computed, read from the full q, k, v and written into ``out`` (then required), whose
    other heads are left untouched. The device head table is cached per (heads, device).
    precision: "bf16" (SDPA on the core-set), or "fp8": the core-set's attention in e4m3
    (fp8_triton.fp8_attention, vorta_ops/fp8.py's numerics; sm_89+)."""
    grid = check_grid(grid)
    L = n_prefix + math.prod(grid) + n_suffix
    _check_qkv(q, k, v, L, grid, n_prefix, n_suffix, "coreset_triton")
    if precision not in PRECISIONS:
        raise ValueError(f"coreset_triton: precision must be bf16 or fp8, got {precision!r}")
    if precision == "fp8":
        check_fp8_device(q, "coreset_triton")
    if heads is not None:
        require_out(out, q, "coreset_triton")
    if out is not None and (out.shape != q.shape or out.device != q.device):
        raise ValueError(f"coreset_triton: out must be {tuple(q.shape)} on {q.device}, got {tuple(out.shape)}")
    if not (q.is_cuda or interpreting()):
        from ..coreset import coreset_attention

        kw = dict(kv_mask=kv_mask, scale=scale)
        if heads is not None:
            return run_on_heads(coreset_attention, q, k, v, grid, cfg, n_prefix, n_suffix, heads=heads, out=out,
                                who="coreset_triton", **kw)
        res = coreset_attention(q, k, v, grid, cfg, n_prefix, n_suffix, **kw)
        return res if out is None else out.copy_(res)
    if heads is not None:  # validated once: both launches share the table
        heads = HeadTable(head_index(heads, q.shape[1], q.device, "coreset_triton"))
    cs = coreset_select_gather(q, k, v, grid, cfg, n_prefix, n_suffix, return_gather=kv_mask is not None, heads=heads)
    mask = None
    if kv_mask is not None:
        B, H, Lc = cs.k_gather.shape  # H: the subset's heads with heads=
        km = kv_mask.to(device=q.device, dtype=torch.bool)
        if km.dim() == 1:
            km = km[None]
        km = km.expand(B, L)
        mask = km.gather(1, cs.k_gather.reshape(B, H * Lc).long()).view(B, H, Lc)
    if precision == "fp8":
        oc = fp8_attention(cs.qc, cs.kc, cs.vc, kv_mask=mask, scale=scale)
    elif mask is None:
        oc = full_attention(cs.qc, cs.kc, cs.vc, scale=scale)
    else:
        oc = F.scaled_dot_product_attention(cs.qc, cs.kc, cs.vc, attn_mask=mask[:, :, None], scale=scale)
    if out is None:
        out = torch.empty_like(q)
    if oc.dtype != out.dtype:
        oc = oc.to(out.dtype)
    return coreset_expand(oc, cs.back, out, heads=heads)


def register() -> None:
    """Register this path as the "triton" core-set backend (writes into out=, takes heads=)."""
    from ..coreset import register_backend

    register_backend("triton", coreset_triton, writes_out=True, takes_heads=True)
    register_backend("triton-fp8", functools.partial(coreset_triton, precision="fp8"), writes_out=True,
                     takes_heads=True)
