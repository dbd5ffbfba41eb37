"""Model families VORTA routes, one module each, and the one detection path over them.

Each family module (wan.py, hunyuan.py) holds everything VORTA knows about its models: detection
by exact class name (never a subclass) and config attributes, the "dit" block keys, the router's
input embedding, the token layout of a call (video grid, prefix / suffix tokens), the official tile
and router, and the rules that read the same spec from a model file's header at /prompt time. Both
detections (model object: inspect; header: from_header) live side by side there. Nothing here or in
a family module imports ComfyUI: models are recognised by class name and attributes (duck typing).

Adding a family:
  1. nodes/families/<name>.py defining FAMILY = Family(...) (see _base.Family): name (the family a
     router file names), classes (exact class name -> base variant), variants (variant -> label,
     base first), supported_text (its part of the refusal's "supported:" list), inspect(dm) ->
     ModelSpec (raise _base.refuse(...) for configurations it cannot route), from_header(shapes) ->
     ModelSpec | None, router_embedding, video_grid, call_layout (split_tokens defaults to the
     generic one), official_tiles, official_routers, order (place in the supported list),
     similarity (the core-set default).
  2. tests/test_families_<name>.py: its variants against small fakes, and for each variant the spec
     from a fake model object equal to the spec from its state-dict header.
  3. (optional) the real classes in tests/test_comfyui_variants.py.
The module is found by itself (every module here not starting with "_" is a family); nodes/models.py
and nodes/prompt_check.py dispatch through this registry and need no change.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from ._base import CallLayout, Family, ModelSpec, UnsupportedModelError, refuse, token_grid

__all__ = [
    "CallLayout", "Family", "ModelSpec", "UnsupportedModelError", "FAMILIES", "call_layout", "family_of", "from_header",
    "get", "inspect", "router_embedding", "router_suggestion", "split_tokens", "supported_text", "token_grid",
    "variant_label", "video_grid",
]


def _discover() -> tuple[Family, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"{__name__}.{info.name} defines no FAMILY = Family(...)")
        found.append(fam)
    found.sort(key=lambda f: (f.order, f.name))
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        raise ValueError(f"two model families with one name: {names}")
    classes = [c for f in found for c in f.classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"a model class claimed by two families: {classes}")
    return tuple(found)


FAMILIES: tuple[Family, ...] = _discover()
_BY_NAME = {f.name: f for f in FAMILIES}
_BY_CLASS = {c: f for f in FAMILIES for c in f.classes}
_LABELS = {v: label for f in FAMILIES for v, label in f.variants.items()}


def get(name: str) -> Family:
    """The family registered under name (ModelSpec.family)."""
    return _BY_NAME[name]


def family_of(diffusion_model) -> Family | None:
    """The family of the model's exact class, else None (a subclass is not its base's family)."""
    return _BY_CLASS.get(type(diffusion_model).__name__)


def variant_label(variant: str) -> str:
    return _LABELS.get(variant, variant)


def supported_text() -> str:
    parts = [f.supported_text for f in FAMILIES]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ---- the one detection path ------------------------------------------------------------------------


def inspect(diffusion_model) -> ModelSpec:
    """The ModelSpec of a diffusion model of an exact registered class; UnsupportedModelError (naming
    the model and listing what is supported) for anything else, subclasses included."""
    cls = type(diffusion_model)
    fam = _BY_CLASS.get(cls.__name__)
    if fam is not None:
        return fam.inspect(diffusion_model)
    for base in cls.__mro__[1:]:
        if base.__name__ in _BY_CLASS:
            raise refuse(cls.__name__, f" (a subclass of {base.__name__} whose token layout VORTA does not know)")
    raise refuse(cls.__name__, "")


def from_header(shapes: dict[str, tuple[int, ...]]) -> ModelSpec | None:
    """The ModelSpec of a model file from its tensor names and shapes alone (the /prompt rules of
    each family), or None when no family recognises it (or it is a configuration VORTA refuses)."""
    for fam in FAMILIES:
        spec = fam.from_header(shapes)
        if spec is not None:
            return spec
    return None


# ---- per-spec dispatch -----------------------------------------------------------------------------


def router_embedding(diffusion_model, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    return get(spec.family).router_embedding(diffusion_model, spec, t, dtype, device)


def video_grid(spec: ModelSpec, transformer_options: dict, named: dict, x_shape) -> tuple[int, int, int]:
    if len(x_shape) != 5:
        raise ValueError(f"expected a video latent [B, C, T, H, W], got shape {tuple(x_shape)}")
    return get(spec.family).video_grid(spec, transformer_options, named, x_shape)


def call_layout(spec: ModelSpec, named: dict, grid) -> CallLayout:
    return get(spec.family).call_layout(spec, named, grid)


def split_tokens(spec: ModelSpec, layout: CallLayout, L: int, n_grid: int) -> tuple[int, int] | None:
    return get(spec.family).split_tokens(spec, layout, L, n_grid)


def router_suggestion(spec: ModelSpec) -> str:
    """The closing advice of a router/model mismatch, naming the model's own family."""
    sizes = f"{spec.blocks} blocks x {spec.heads} heads x embed {spec.embed_dim}"
    fam = _BY_NAME.get(spec.family)
    official = fam.official_routers.get(spec.variant) if fam is not None else None
    if official is not None:
        folder, model, b, h, e = official
        if (spec.blocks, spec.heads, spec.embed_dim) == (b, h, e):
            return f"Load the router trained for this model (e.g. {folder} for {model})."
        return (
            f"Load the router trained for this model: the official {folder} router is for {model} "
            f"({b} blocks x {h} heads x embed {e}); this model needs a router made for it ({sizes})."
        )
    return (
        f"Load the router trained for this model: VORTA has no official router for {variant_label(spec.variant)}; "
        f"it needs a router made for this model ({sizes})."
    )
