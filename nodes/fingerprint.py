"""A stable fingerprint of the weights a sampler runs with: the model's own weights and every weight
patch on them (LoRAs with their strengths), for keys that must survive a restart (the training-free
router's on-disk measurements). ComfyUI's patches_uuid changes with every clone and process, so it
cannot serve.

Cheap by design: per tensor its name, shape, dtype and a few values read at fixed strides (reading
whole 14B-parameter models is out of the question); a LoRA's up/down tensors are sampled the same
way. A weight that has a patch is read by shape only: ComfyUI applies LoRAs in place, so its values
differ before and after the first load, while the patch's digest already says what changes. Two models that agree on every sampled value of every tensor get the same fingerprint; any
change of a LoRA, its strength, the model file or its dtype changes it.
"""
from __future__ import annotations

import hashlib
import logging
import numbers

import torch

__all__ = ["model_fingerprint", "SAMPLES"]

log = logging.getLogger("vorta")

SAMPLES = 16  # values read per tensor


def sample_index(n: int, k: int = SAMPLES) -> torch.Tensor:
    """k positions spread evenly over [0, n), the first and the last included, in exact integer
    arithmetic (a float linspace rounds past n - 1 beyond 2**24 elements)."""
    k = min(k, n)
    if k <= 1:
        return torch.zeros(k, dtype=torch.long)
    return torch.arange(k, dtype=torch.long) * (n - 1) // (k - 1)


def _tensor_digest(h, t: torch.Tensor) -> None:
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    try:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        if n:
            vals = flat.index_select(0, sample_index(n).to(flat.device)).to("cpu", torch.float64)
            h.update(vals.numpy().tobytes())
    except Exception:  # quantized / offloaded storage that cannot be indexed: shape and dtype only
        h.update(b"?")


def _digest(h, value, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        _tensor_digest(h, value)
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _digest(h, v, depth + 1)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _digest(h, value[k], depth + 1)
    elif value is None or isinstance(value, (str, bool, numbers.Number)):
        h.update(repr(value).encode())
    else:  # a weight adapter object (newer ComfyUI): its type and its tensors
        h.update(type(value).__name__.encode())
        weights = getattr(value, "weights", None)
        if weights is not None:
            _digest(h, weights, depth + 1)


def model_fingerprint(patcher) -> str | None:
    """Hex digest of a ComfyUI ModelPatcher's diffusion model weights and weight patches, or None
    when it cannot be read (then nothing is cached on disk)."""
    try:
        dm = patcher.model.diffusion_model
        h = hashlib.sha256(type(dm).__name__.encode())
        patches = getattr(patcher, "patches", {}) or {}
        # a patched weight may hold base + patch (ComfyUI applies LoRAs in place and keeps them applied
        # between runs): its values are not read, the patch's own digest below stands for the change
        patched = {k.split("diffusion_model.", 1)[1] for k in patches if isinstance(k, str) and "diffusion_model." in k}
        for name, t in dm.state_dict(keep_vars=True).items():
            h.update(name.encode())
            if name in patched:
                h.update(f"{tuple(t.shape)}|{t.dtype}|patched".encode())
            else:
                _tensor_digest(h, t)
        for key in sorted(patches):
            h.update(f"patch:{key}".encode())
            _digest(h, patches[key])
        return h.hexdigest()[:32]
    except Exception:
        log.debug("VORTA: no model fingerprint", exc_info=True)
        return None
