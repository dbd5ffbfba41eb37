"""What VORTA needs to know about a ComfyUI diffusion model: family, blocks, heads, router input.

Works on the model objects themselves (duck-typed by class name and attributes), so tests can use
small fakes; nothing here imports ComfyUI.

Supported:
    wan      comfy.ldm.wan.model.WanModel and subclasses (Wan 2.1 T2V/I2V 1.3B/14B, Wan 2.2 A14B
             experts and 5B); router input = time_embedding(sinusoidal(t)), size = model dim.
    hunyuan  comfy.ldm.hunyuan_video.model.HunyuanVideo (T2V); router input = the clean
             time_in(sinusoidal(t)) embedding without guidance / pooled text, size = hidden size;
             blocks = dual-stream blocks, then single-stream blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vorta_ops.router import sinusoidal_embedding
from vorta_ops.sliding_tile import HUNYUAN_TILE, WAN_TILE

SUPPORTED = {
    "WanModel": "wan",
    "HunyuanVideo": "hunyuan",
}
SUPPORTED_TEXT = "Wan 2.1 / 2.2 (WanModel and its variants) and HunyuanVideo (T2V)"


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    family: str
    blocks: int
    heads: int
    embed_dim: int
    patch_size: tuple[int, int, int]
    official_tile: tuple[int, int, int]
    # ("double_block", i) / ("single_block", i) keys of ComfyUI's "dit" block replace patches,
    # in VORTA block order
    block_keys: tuple[tuple[str, int], ...]
    class_name: str

    def describe(self) -> str:
        return f"{self.class_name} ({self.family}): {self.blocks} blocks x {self.heads} heads, embed dim {self.embed_dim}"


def model_family(diffusion_model) -> str | None:
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    return None


def inspect_model(diffusion_model) -> ModelSpec:
    family = model_family(diffusion_model)
    name = type(diffusion_model).__name__
    if family is None:
        raise UnsupportedModelError(
            f"VORTA does not support {name} models; supported: {SUPPORTED_TEXT}. "
            f"Connect a Wan or HunyuanVideo model, or bypass this node."
        )
    patch = tuple(int(p) for p in diffusion_model.patch_size)
    if len(patch) != 3:
        raise UnsupportedModelError(f"{name} uses a {len(patch)}D patch {patch}; VORTA needs a 3D (video) patch")
    if family == "wan":
        blocks = len(diffusion_model.blocks)
        keys = tuple(("double_block", i) for i in range(blocks))
        return ModelSpec("wan", blocks, int(diffusion_model.num_heads), int(diffusion_model.dim), patch, WAN_TILE, keys, name)
    n_double, n_single = len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)
    keys = tuple(("double_block", i) for i in range(n_double)) + tuple(("single_block", i) for i in range(n_single))
    return ModelSpec(
        "hunyuan", n_double + n_single, int(diffusion_model.num_heads), int(diffusion_model.hidden_size),
        patch, HUNYUAN_TILE, keys, name,
    )


def check_router_fits(router, spec: ModelSpec) -> None:
    """Raise a ValueError naming both sides when the router was not made for this model."""
    mismatches = [
        f"{what}: router {r}, model {m}"
        for what, r, m in (
            ("blocks", router.blocks, spec.blocks),
            ("heads", router.heads, spec.heads),
            ("embed dim", router.embed_dim, spec.embed_dim),
        )
        if r != m
    ]
    if router.family not in ("generic", spec.family):
        mismatches.insert(0, f"family: router {router.family}, model {spec.family}")
    if mismatches:
        raise ValueError(
            f"this VORTA router does not fit the model ({'; '.join(mismatches)}). "
            f"Router: {router.describe()}. Model: {spec.describe()}. "
            f"Load the router trained for this model (e.g. wan-14B for Wan 2.1 14B)."
        )


def router_embedding(diffusion_model, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    """The router's input for timestep t (0..1000): [embed_dim] float32 on the CPU."""
    with torch.no_grad():
        if spec.family == "wan":
            sin = sinusoidal_embedding(t, diffusion_model.freq_dim).to(device, dtype)
            e = diffusion_model.time_embedding(sin)
        else:
            sin = sinusoidal_embedding(t, 256).to(device, dtype)
            e = diffusion_model.time_in(sin)
    return e[0].float().cpu()


def token_grid(spec: ModelSpec, x_shape, extra_frames: int = 0) -> tuple[int, int, int]:
    """Token grid of a latent [B, C, T, H, W] after patching (ComfyUI pads to the patch size)."""
    T, H, W = x_shape[2] + extra_frames, x_shape[3], x_shape[4]
    return tuple(math.ceil(n / p) for n, p in zip((T, H, W), spec.patch_size))  # type: ignore[return-value]


def prefix_tokens(spec: ModelSpec, kwargs: dict) -> int:
    """Grid-external tokens placed before the video tokens (reference latents)."""
    ref = kwargs.get("ref_latent") if spec.family == "hunyuan" else None
    if ref is None or not hasattr(ref, "shape") or ref.dim() != 5:
        return 0
    return math.prod(math.ceil(n / p) for n, p in zip(ref.shape[2:], spec.patch_size))
