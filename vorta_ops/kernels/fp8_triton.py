"""Launchers of the FP8 (e4m3) Triton code in ``fp8_kernels.py``: the per-head statistics, the K / V
preparation pass and dense FP8 attention (the full branch's and the core-set's FP8 kernel).

Numerics: vorta_ops/fp8.py (``fp8_attention_reference`` is the reference of every FP8 path). FP8
tensor cores need sm_89+ (Ada, Hopper, Blackwell); the code uses no Hopper-only construct, so the
same kernels compile for Ada and Blackwell. ``TRITON_INTERPRET=1`` runs them on CPU with the e4m3
rounding done in fp32 arithmetic (tests).

Cost of the preparation, per call: one read of k and v for the statistics (k's mean and its
channel extremes, v's channel amax: reductions, no full-size temporary) and one read of k and v
that writes e4m3 copies (half their size) in the order the attention kernel walks. Against the
attention itself (tens of ms at 720p) that is a few hundred microseconds of memory traffic.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._backends import kernel_head_table, require_out
from ..fp8 import fp8_unsupported_reason, scales_of
from .fp8_kernels import _fp8_attn_kernel, _fp8_kv_prep_kernel
from .sliding_tile_kernel import interpreting

__all__ = ["FP8KV", "check_fp8_head_dim", "fp8_stats", "fp8_prepare_kv", "fp8_attention", "check_fp8_device"]

_LOG2E = 1.4426950408889634
_PREP_BLOCK = 64
_SLOT_ALIGN = 128  # LP: a multiple of this (>= any BLOCK_N), so key blocks never read past the buffers


def check_fp8_device(t: torch.Tensor, what: str) -> None:
    """One clear error where FP8 cannot run (before any launch): vorta_ops.fp8.fp8_unsupported_reason."""
    why = fp8_unsupported_reason(t.device)
    if why is not None:
        raise RuntimeError(f"{what}: precision fp8 cannot run here: {why}; use precision bf16")


def check_fp8_head_dim(d: int, what: str) -> None:
    """8-bit tensor-core dots need a reduction of at least 32: head dims 32..256, powers of two."""
    if d not in (32, 64, 128, 256):
        raise ValueError(f"{what}: precision fp8 supports head dims 32, 64, 128, 256; got {d} (use precision bf16)")


def fp8_stats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k's per-head mean over the sequence [B, H, D], the smoothed k's scale per head [B, H], v's
    per-channel scale [B, H, D]), fp32 contiguous: vorta_ops/fp8.py's smoothing, K scale (amax of
    k - mean over the head / 448) and V scales. Reductions only (no full-size copy): |k - mean| is
    largest at a channel's extreme, so k's channel min and max give its amax exactly."""
    k_mean = k.mean(2, dtype=torch.float32).contiguous()
    lo, hi = torch.aminmax(k, dim=2)
    k_amax = torch.maximum(hi.float() - k_mean, k_mean - lo.float()).amax(-1)
    lo, hi = torch.aminmax(v, dim=2)
    return k_mean, scales_of(k_amax).contiguous(), scales_of(torch.maximum(-lo.float(), hi.float())).contiguous()


class FP8KV(NamedTuple):
    """K and V prepared for an FP8 attention kernel, per program head (a head subset's heads in
    table order): k8 e4m3 [B * n_h, lp, D], v8t e4m3 [B * n_h, D, lp] (V transposed); k_scale fp32
    [B, H] and v_scale fp32 [B, H, D] (every head of the input, indexed by real head)."""

    k8: torch.Tensor
    k_scale: torch.Tensor
    v8t: torch.Tensor
    v_scale: torch.Tensor
    lp: int


def fp8_prepare_kv(k, v, *, n_slots: int, src: torch.Tensor | None = None, n_h: int | None = None,
                   head_tab: torch.Tensor | None = None) -> FP8KV:
    """Quantise k and v [B, H, L, D] (any row stride, last-dim stride 1) for the FP8 kernels.

    Slot i of the output holds token src[i] (int32, -1 = padding: zeros) for i < len(src), or token
    i when src is None (slots >= L: zeros); n_slots slots are filled, rounded up to a multiple of 128.
    head_tab: int32/int64 [n_h] head table (program head i = head head_tab[i]); None = every head."""
    B, H, L, D = k.shape
    n_h = H if head_tab is None else int(n_h)
    k_mean, k_scale, v_scale = fp8_stats(k, v)
    lp = -(-int(n_slots) // _SLOT_ALIGN) * _SLOT_ALIGN
    dev = k.device
    k8 = torch.empty(B * n_h, lp, D, dtype=torch.float8_e4m3fn, device=dev)
    v8t = torch.empty(B * n_h, D, lp, dtype=torch.float8_e4m3fn, device=dev)
    n_src = int(src.numel()) if src is not None else L
    idx64 = max((L - 1) * x.stride(2) + (H - 1) * x.stride(1) + (B - 1) * x.stride(0) for x in (k, v)) + D >= 2**31
    dummy = k_scale
    _fp8_kv_prep_kernel[(lp // _PREP_BLOCK, B * n_h)](
        k, v, src if src is not None else dummy, head_tab if head_tab is not None else dummy, k_mean, k_scale,
        v_scale, k8, v8t,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        n_h, H, n_src, lp,
        HEAD_DIM=D, HAS_SRC=src is not None, HAS_HEADS=head_tab is not None, IDX64=bool(idx64),
        EMULATE=interpreting(), BLOCK=_PREP_BLOCK, num_warps=4,
    )
    return FP8KV(k8, k_scale, v8t, v_scale, lp)


def _attn_configs():
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w in ((128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4)) for s in (2, 3, 4)]


_TUNED = None


def _tuned():
    global _TUNED
    if _TUNED is None:
        import triton

        kw = dict(configs=_attn_configs(), key=["M", "N", "HEAD_DIM", "HAS_BIAS"])
        try:
            _TUNED = triton.autotune(**kw, cache_results=True)(_fp8_attn_kernel)
        except TypeError:
            _TUNED = triton.autotune(**kw)(_fp8_attn_kernel)
    return _TUNED


INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _key_bias(kv_mask: torch.Tensor, B: int, n_keys: int, device) -> torch.Tensor:
    """kv_mask bool [B or 1, L] / [L] / per head [B, n_h, L] -> additive fp32 bias (0 / -inf) with a head axis."""
    km = kv_mask.to(device=device, dtype=torch.bool)
    if km.dim() == 1:
        km = km[None]
    if km.dim() == 2:
        km = km[:, None]
    if km.dim() != 3 or km.shape[-1] != n_keys or km.shape[0] not in (1, B):
        raise ValueError(f"fp8_attention: kv_mask must be bool [B, {n_keys}], [{n_keys}] or [B, heads, {n_keys}], "
                         f"got {tuple(kv_mask.shape)}")
    return torch.zeros(km.shape, dtype=torch.float32, device=device).masked_fill_(~km, float("-inf"))


def fp8_attention(q, k, v, *, kv_mask=None, scale=None, out=None, heads=None, config=None):
    """Dense attention with Q, K, P, V in e4m3 (vorta_ops/fp8.py's scheme; reference:
    vorta_ops.fp8.fp8_attention_reference). q, k, v [B, H, L, D] (any row strides; Lq may differ
    from Lk), head dim 32..256 a power of two. kv_mask: bool [B, Lk] / [Lk] (or [B, n_h, Lk] per
    program head), True = attend. heads: a head subset, written into ``out`` (then required) whose
    other heads stay untouched. Returns out ([B, H, Lq, D], q's dtype)."""
    what = "fp8_attention"
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what} wants q [B, H, Lq, D] and k, v [B, H, Lk, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[3]
    check_fp8_head_dim(D, what)
    check_fp8_device(q, what)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, M, _ = q.shape
    N = k.shape[2]
    if heads is not None:
        require_out(out, q, what)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.device != q.device:
        raise ValueError(f"{what}: out must be {tuple(q.shape)} on {q.device}, got {tuple(out.shape)} on {out.device}")
    o = out if out.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)
    n_h, head_tab = kernel_head_table(heads, H, q.device, what, q)
    prep = fp8_prepare_kv(k, v, n_slots=N, n_h=n_h, head_tab=head_tab if heads is not None else None)
    bias = _key_bias(kv_mask, B, N, q.device) if kv_mask is not None else prep.k_scale
    if kv_mask is not None and bias.shape[1] not in (1, n_h):
        raise ValueError(f"{what}: a per-head kv_mask needs {n_h} heads, got {bias.shape[1]}")
    s_bias_b = bias.stride(0) if kv_mask is not None and bias.shape[0] > 1 else 0
    s_bias_h = bias.stride(1) if kv_mask is not None and bias.shape[1] > 1 else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    idx64 = max((M - 1) * x.stride(2) + (H - 1) * x.stride(1) + (B - 1) * x.stride(0) for x in (q, o)) + D >= 2**31
    args = (q, prep.k8, prep.k_scale, prep.v8t, prep.v_scale, o, bias, head_tab,
            q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), s_bias_b, s_bias_h,
            n_h, H, M, N, prep.lp, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, HAS_BIAS=kv_mask is not None, HAS_HEADS=heads is not None, IDX64=bool(idx64),
                FP8_UPCAST=interpreting())
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        c = {"num_warps": 4, "num_stages": 1 if interpreting() else 3, **config}
        if c["BLOCK_N"] > _SLOT_ALIGN or (not interpreting() and min(c["BLOCK_M"], c["BLOCK_N"]) < 32):
            raise ValueError(f"{what}: BLOCK_N must be at most {_SLOT_ALIGN} and BLOCK_M, BLOCK_N at least 32 "
                             f"(8-bit tensor-core dots), got {c['BLOCK_M']}, {c['BLOCK_N']}")
        _fp8_attn_kernel[(-(-M // c["BLOCK_M"]), B * n_h)](*args, **meta, **c)
    else:
        _tuned()[lambda m: (-(-M // m["BLOCK_M"]), B * n_h)](*args, **meta)
    if o is not out:
        if heads is None:
            out.copy_(o)
        else:
            idx = head_tab.long()
            out.index_copy_(1, idx, o.index_select(1, idx))
    return out
