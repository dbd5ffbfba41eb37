"""FP8 (e4m3) attention numerics: the quantisation the FP8 kernels are to use, and a plain torch
reference of attention computed that way (the CPU reference the kernels will be tested against).

The scheme (SageAttention-style, adapted to one that does not depend on how a kernel blocks the
sequence, so a reference can reproduce a kernel's quantisation bit for bit):

* K is smoothed first: its per-head mean over the sequence is subtracted. Every score of a query row
  then moves by the same amount (q . mean), which softmax ignores, while K's values centre on 0 and
  use e4m3's range better (video DiTs' keys carry a large shared component).
* Q: one scale per token (row), amax / 448. K (smoothed): one scale per head, amax over the head's
  keys / 448. e4m3 is a floating-point format, so a key far below the head's largest still keeps its
  3 mantissa bits (down to amax / 28,672, where the subnormals start). Per-token K scales gave
  the same distance from exact attention (this reference at head dim 128: video-like 0.0216 both;
  random 0.0514 per token, 0.0519 per head). One K scale lets a kernel fold Q's row scale, K's scale and the
  softmax scale into one factor per row, applied in the exp2's multiply-add: the scores are
  dot(q8, k8) * scale_q[m] * scale_k with fp32 accumulation.
* P: the online softmax's exp(s - running max) lies in (0, 1]; it goes to e4m3 scaled by 448
  (``P_SCALE``: small probabilities stay out of e4m3's subnormals), the scale divided back with the
  row sum l, which is taken in fp32 before the rounding.
* V: one scale per channel over the whole sequence (amax / 448). P . V in fp32, then times the
  channel scale and divided by l.

``fp8_attention_reference`` computes this with the row's global max in place of the running one
(the only difference from a kernel: where P's rounding happens, not how Q, K and V are rounded).
Its distance from exact attention is the FP8 quality measure (``tests/test_fp8.py``).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

__all__ = ["E4M3_MAX", "FP8", "P_SCALE", "PRECISIONS", "scales_of", "fp8_supported", "fp8_unsupported_reason", "quantize_rows", "quantize_heads", "quantize_channels", "smooth_keys", "fp8_attention_reference"]

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
PRECISIONS = ("bf16", "fp8")  # the attention precisions the kernels, dispatch and the nodes take
# P = exp(s - max) lies in (0, 1]: rounded as it is, values under 2**-6 land on e4m3's coarse subnormal
# steps and under 2**-10 on zero, while the row sum l keeps them, so diffuse rows shrink (a 16k-key
# row at score std 2: 6.8% error, output norm 0.95x). P is rounded scaled to e4m3's top (x 448) and the
# scale divided back with l: 1.0% there.
P_SCALE = 448.0
_TINY = 1e-12


def fp8_unsupported_reason(device) -> str | None:
    """Why the FP8 kernels cannot run on ``device`` (one line), or None where they can: a CUDA GPU
    with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell; not ROCm) and triton with
    the kernels registered (or the Triton interpreter, TRITON_INTERPRET=1)."""
    dev = torch.device(device)
    why = _reason(dev.type, dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else None))
    if why is None:
        from .sliding_tile import available_backends

        if "triton-fp8" not in available_backends():
            why = "the FP8 kernels need triton, whose kernels did not load here (see the log at start-up)"
    return why


@functools.lru_cache(maxsize=16)
def _reason(kind: str, index) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the FP8 kernels need triton, which is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    if kind != "cuda":
        return f"the FP8 kernels need a CUDA GPU with FP8 tensor cores (sm_89+: Ada, Hopper, Blackwell); the model runs on {kind}"
    if torch.version.hip is not None:
        return "the FP8 kernels use NVIDIA's e4m3 tensor-core format (sm_89+); ROCm GPUs are not supported"
    cap = torch.cuda.get_device_capability(index)
    if cap < (8, 9):
        return (f"the FP8 kernels need FP8 tensor cores (sm_89+: Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(index)} is sm_{cap[0]}{cap[1]}")
    return None


def fp8_supported(device) -> bool:
    return fp8_unsupported_reason(device) is None


def scales_of(amax: torch.Tensor) -> torch.Tensor:
    """e4m3 scales from absolute maxima: amax / 448, and 1 where everything is zero."""
    return torch.where(amax > _TINY, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (last dim shared): (x8 e4m3 [..., L, D], scale float32 [..., L, 1]), x ~= x8 * scale.
    A row of zeros gets scale 1 and zeros."""
    xf = x.float()
    scale = scales_of(xf.abs().amax(-1, keepdim=True))
    return (xf / scale).to(FP8), scale


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per head over its sequence and channels (the last two dims): (x8 e4m3 [..., L, D],
    scale float32 [..., 1, 1])."""
    xf = x.float()
    scale = scales_of(xf.abs().amax((-2, -1), keepdim=True))
    return (xf / scale).to(FP8), scale


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel over the sequence (dim -2): (x8 e4m3 [..., L, D], scale float32 [..., 1, D])."""
    xf = x.float()
    scale = scales_of(xf.abs().amax(-2, keepdim=True))
    return (xf / scale).to(FP8), scale


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """k minus its per-head mean over the sequence (fp32): softmax(q k^T) does not change."""
    kf = k.float()
    return kf - kf.mean(-2, keepdim=True)


def fp8_attention_reference(q, k, v, *, scale: float | None = None, smooth: bool = True, fp8_p: bool = True,
                            kv_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention [B, H, L, D] with Q, K, V (and P) rounded to e4m3 as the FP8 kernels round them;
    float32 out. kv_mask: optional bool [B, Lk] (True = attend); attn_mask: optional bool
    [Lq, Lk] (e.g. vorta_ops.sliding_tile.sliding_tile_mask: the FP8 sliding tile's reference).
    Smoothing and V's scales use every key either way, as the kernels do."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q8, qs = quantize_rows(q)
    k8, ks = quantize_heads(smooth_keys(k) if smooth else k)
    v8, vs = quantize_channels(v)
    s = (q8.float() @ k8.float().transpose(-1, -2)) * (qs * ks) * scale
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key left: zeros out
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if fp8_p:
        p = (p * P_SCALE).to(FP8).float() / P_SCALE
    out = (p @ v8.float()) * vs
    return out / torch.where(l > 0, l, torch.ones_like(l))
