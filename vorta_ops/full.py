"""Full (dense) attention branch.

q, k, v: [B, H, L, D] (any strides; head subsets may be views). kv_mask: optional bool [B, Lk],
True = the key may be attended. flash-attn is used when it imports and the tensors are on CUDA in
fp16/bf16 with no mask; otherwise torch SDPA (which itself picks cuDNN / flash / efficient / math).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["full_attention", "FLASH_ATTN_AVAILABLE", "sdpa_mask"]

log = logging.getLogger("vorta")

try:  # optional: pip install flash-attn (the `flash` extra); never required
    from flash_attn import flash_attn_func as _flash_attn_func

    FLASH_ATTN_AVAILABLE = True
except Exception:  # ImportError, or a broken build whose import raises something else
    _flash_attn_func = None
    FLASH_ATTN_AVAILABLE = False


def sdpa_mask(kv_mask: torch.Tensor | None) -> torch.Tensor | None:
    """bool [B, Lk] key mask -> bool [B, 1, 1, Lk] SDPA mask (True = attend)."""
    if kv_mask is None:
        return None
    return kv_mask[:, None, None, :]


def _use_flash(q: torch.Tensor, kv_mask) -> bool:
    return (
        FLASH_ATTN_AVAILABLE
        and kv_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    )


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention. Returns [B, H, Lq, D] in q's dtype."""
    if _use_flash(q, kv_mask):
        # flash-attn wants [B, L, H, D]; transposing the views is free when the caller's tensors
        # are [B, L, H, D] underneath (as ComfyUI's are).
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(kv_mask), scale=scale)
