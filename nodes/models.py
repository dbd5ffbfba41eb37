"""What VORTA needs to know about a ComfyUI diffusion model: variant, blocks, heads, router input,
and where the latent video tokens sit in each self-attention call.

The knowledge itself lives in one module per model family (nodes/families/: wan.py, hunyuan.py; see
nodes/families/__init__.py for the variants and how to add a family). This module is the stable
interface over that registry: each function here dispatches to the family of the model or spec.
Works on the model objects themselves (detected by exact class name and config attributes), so
tests can use small fakes; nothing here imports ComfyUI.
"""
from __future__ import annotations

import torch

from . import families as _families
from .families import CallLayout, ModelSpec, UnsupportedModelError, token_grid
from .families.hunyuan import HUNYUAN15_TILE

__all__ = [
    "CallLayout", "ModelSpec", "UnsupportedModelError", "SUPPORTED_TEXT", "HUNYUAN15_TILE", "call_layout",
    "check_router_fits", "inspect_model", "model_family", "router_embedding", "router_suggestion", "split_tokens",
    "token_grid", "video_grid",
]

# exact diffusion model class name -> family / base variant; variant -> label / family; variant ->
# official router (folder, model, blocks, heads, embed): views of the family registry
SUPPORTED = {c: f.name for f in _families.FAMILIES for c in f.classes}
WAN_CLASSES = dict(_families.get("wan").classes)
HUNYUAN_CLASSES = dict(_families.get("hunyuan").classes)
VARIANT_LABELS = {v: label for f in _families.FAMILIES for v, label in f.variants.items()}
VARIANT_FAMILY = {v: f.name for f in _families.FAMILIES for v in f.variants}
OFFICIAL_ROUTERS = {v: r for f in _families.FAMILIES for v, r in f.official_routers.items()}

SUPPORTED_TEXT = _families.supported_text()


def model_family(diffusion_model) -> str | None:
    """The family name ("wan", "hunyuan", ...) for the exact supported classes, else None."""
    fam = _families.family_of(diffusion_model)
    return fam.name if fam is not None else None


def inspect_model(diffusion_model) -> ModelSpec:
    """The model's ModelSpec; UnsupportedModelError naming it and listing what is supported."""
    return _families.inspect(diffusion_model)


def router_suggestion(spec: ModelSpec) -> str:
    """The closing advice of a router/model mismatch, naming the model's own family."""
    return _families.router_suggestion(spec)


def check_router_fits(router, spec: ModelSpec, kind: str = "VORTA router", advice: str | None = None) -> None:
    """Raise a ValueError naming both sides when the router was not made for this model. A router
    without an embedding (a measured table) is checked on family, blocks and heads; ``advice`` replaces
    the family's closing suggestion."""
    sizes = [("blocks", router.blocks, spec.blocks), ("heads", router.heads, spec.heads)]
    if getattr(router, "embed_dim", None) is not None:
        sizes.append(("embed dim", router.embed_dim, spec.embed_dim))
    mismatches = [f"{what}: router {r}, model {m}" for what, r, m in sizes if r != m]
    if router.family not in ("generic", spec.family):
        mismatches.insert(0, f"family: router {router.family}, model {spec.family}")
    if mismatches:
        raise ValueError(
            f"this {kind} does not fit the model ({'; '.join(mismatches)}). "
            f"Router: {router.describe()}. Model: {spec.describe()}. "
            f"{advice if advice is not None else router_suggestion(spec)}"
        )


def router_embedding(diffusion_model, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    """The router's input for timestep t (0..1000): [embed_dim] float32 on the CPU (the family's
    time embedding of the diffusion model)."""
    return _families.router_embedding(diffusion_model, spec, t, dtype, device)


def video_grid(spec: ModelSpec, transformer_options: dict, named: dict, x_shape) -> tuple[int, int, int]:
    """The latent token grid (t, h, w) of one model call, from the diffusion model forward's arguments.

    Computed from the shapes, not read from transformer_options["grid_sizes"]: ComfyUI (0.19.3) sets
    that inside forward_orig, after the DIFFUSION_MODEL wrapper that calls this, and not for every
    variant (Camera, S2V, HuMo and Animate never set it)."""
    return _families.video_grid(spec, transformer_options, named, x_shape)


def call_layout(spec: ModelSpec, named: dict, grid) -> CallLayout:
    """The token layout of one model call (computed once per call, from the forward's arguments)."""
    return _families.call_layout(spec, named, grid)


def split_tokens(spec: ModelSpec, layout: CallLayout, L: int, n_grid: int) -> tuple[int, int] | None:
    """(n_prefix, n_suffix) extra tokens around the n_grid video tokens of a block self-attention call
    of length L, or None when this call does not have the layout the variant routes (run it dense)."""
    return _families.split_tokens(spec, layout, L, n_grid)
