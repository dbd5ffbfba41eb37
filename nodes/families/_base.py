"""What every model family shares: the spec and layout types, the Family record a family module
registers, and small helpers for token counts and file headers. Imports nothing from ComfyUI."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


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
    variant: str = ""  # a variant of the family; "" = the family's base variant
    # joint attention (HunyuanVideo): where the text tokens sit relative to the (reference +) video
    # tokens in this ComfyUI version: "after" or "before"; "" for models without joint attention
    # (Wan) or when not known (a spec read from a file header)
    joint_text: str = ""

    def __post_init__(self):
        if not self.variant:
            from . import get

            object.__setattr__(self, "variant", get(self.family).base_variant)

    def describe(self) -> str:
        from . import variant_label

        return f"{self.class_name} ({variant_label(self.variant)}): {self.blocks} blocks x {self.heads} heads, embed dim {self.embed_dim}"


@dataclass(frozen=True)
class CallLayout:
    """Where the extra tokens of one model call sit around the video grid in block self-attention."""

    n_before: int  # known extra tokens before the grid (reference latents)
    n_after: int  # known extra tokens after the grid (reference / pose tokens)
    rest: str  # where tokens not accounted for go: "none" (must be none), "before" or "after"
    routable: bool = True
    why: str = ""  # when not routable


def split_tokens(spec: ModelSpec, layout: CallLayout, L: int, n_grid: int) -> tuple[int, int] | None:
    """(n_prefix, n_suffix) extra tokens around the n_grid video tokens of a block self-attention call
    of length L, or None when this call does not have the layout the variant routes (run it dense)."""
    if layout is None or not layout.routable:
        return None
    rest = L - n_grid - layout.n_before - layout.n_after
    if rest < 0:
        return None
    if layout.rest == "none":
        return (layout.n_before, layout.n_after) if rest == 0 else None
    if layout.rest == "before":
        return (layout.n_before + rest, layout.n_after)
    if layout.rest == "after":
        return (layout.n_before, layout.n_after + rest)
    return None


@dataclass(frozen=True)
class Family:
    """One model family, as its module registers it (module attribute FAMILY)."""

    name: str  # ModelSpec.family, and the family a router file names
    # exact diffusion-model class name -> its base variant (a subclass is refused, never matched)
    classes: dict[str, str]
    # variant -> label, the family's base variant first
    variants: dict[str, str]
    # this family's part of the "supported: ..." list of a refusal
    supported_text: str
    # diffusion model of one of `classes` -> ModelSpec; raises UnsupportedModelError (refuse()) for
    # configurations VORTA cannot route
    inspect: Callable[[Any], ModelSpec]
    # the /prompt rules: tensor name -> shape of a model file's header -> ModelSpec, or None when the
    # file is not this family's (or is a configuration inspect refuses)
    from_header: Callable[[dict], "ModelSpec | None"]
    # (dm, spec, t, dtype, device) -> the router input for timestep t: [embed_dim] float32 on the CPU
    router_embedding: Callable[..., Any]
    # (spec, transformer_options, named forward args, x_shape [B, C, T, H, W]) -> token grid (t, h, w)
    video_grid: Callable[..., tuple[int, int, int]]
    # (spec, named forward args, grid) -> CallLayout of one model call
    call_layout: Callable[..., CallLayout]
    # (spec, layout, L, n_grid) -> (n_prefix, n_suffix) or None (dense)
    split_tokens: Callable[..., "tuple[int, int] | None"] = split_tokens
    # variant -> the sliding-tile size it was trained with (or a good default without a trained one)
    official_tiles: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # variant -> official VORTA router (Hugging Face Wenhao-Sun/VORTA): (folder, model, blocks, heads, embed)
    official_routers: dict[str, tuple[str, str, int, int, int]] = field(default_factory=dict)
    order: int = 100  # place in the supported list (and in header detection)
    # what the core-set branch compares tokens by when Apply's similarity is "auto": "q" or "qk"
    similarity: str = "q"

    @property
    def base_variant(self) -> str:
        return next(iter(self.variants))


def refuse(name: str, why: str) -> UnsupportedModelError:
    """The refusal of a model: what it is, why, and what is supported."""
    from . import supported_text

    return UnsupportedModelError(
        f"VORTA does not support {name} models{why}; supported: {supported_text()}. "
        f"Connect one of those models, or bypass this node."
    )


def patch3(dm, name: str) -> tuple[int, int, int]:
    """The model's 3D patch size; a 2D patch (an image model) is refused."""
    patch = tuple(int(p) for p in dm.patch_size)
    if len(patch) != 3:
        raise refuse(name, f" with a {len(patch)}D patch {patch} (an image model)")
    return patch  # type: ignore[return-value]


def token_grid(spec: ModelSpec, x_shape, extra_frames: int = 0) -> tuple[int, int, int]:
    """Token grid of a latent [B, C, T, H, W] after patching (ComfyUI pads to the patch size)."""
    T, H, W = x_shape[2] + extra_frames, x_shape[3], x_shape[4]
    return tuple(math.ceil(n / p) for n, p in zip((T, H, W), spec.patch_size))  # type: ignore[return-value]


def is5d(t) -> bool:
    return t is not None and hasattr(t, "shape") and len(t.shape) == 5


def padded_tokens(shape, patch) -> int:
    """Tokens of a patch embedding that pads to the patch size (ComfyUI's pad_to_patch_size)."""
    return math.prod(math.ceil(n / p) for n, p in zip(shape, patch))


def conv_tokens(shape, patch) -> int:
    """Tokens of a plain strided conv (no padding) of kernel = stride = patch."""
    return math.prod(n // p for n, p in zip(shape, patch))


# where a model's tensors sit in a file: checkpoints, bare diffusion-model files
HEADER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def header_prefix(shapes: dict, *markers: str) -> str | None:
    """The first prefix under which the file has every marker key, else None."""
    for pre in HEADER_PREFIXES:
        if all(pre + m in shapes for m in markers):
            return pre
    return None


def count_indexed(keys, prefix: str) -> int:
    """Number of `prefix<i>.` entries (max index + 1): blocks in a state dict."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(ids) + 1 if ids else 0
