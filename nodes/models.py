"""What VORTA needs to know about a ComfyUI diffusion model: variant, blocks, heads, router input,
and where the latent video tokens sit in each self-attention call.

Works on the model objects themselves (detected by exact class name and config attributes), so
tests can use small fakes; nothing here imports ComfyUI.

Variants (ComfyUI 0.3.64 .. 0.19.3; diffusion model class -> variant):

    WanModel         wan           Wan 2.1 T2V / I2V / FLF2V / Fun, Wan 2.2 A14B experts, Wan 2.2 5B,
                                   FlowRVS: self-attention = the video grid (time_dim_concat frames
                                   are part of the grid)
                     wan_refconv   the same with a reference-image conv (Fun models with ref_conv):
                                   the reference image's tokens come first, then the grid
    VaceWanModel     wan_vace      grid only; VACE blocks run after main block i, outside its "dit"
                                   block patch (with ComfyUI's block_index still i): not routed
    CameraWanModel   wan_camera    grid only (camera features are added to the video tokens)
    WanModel_S2V     wan_s2v       grid, then reference-image and motion-frame tokens; needs a ComfyUI
                                   whose S2V passes transformer_options to its blocks
    HumoWanModel     wan_humo      grid, then reference-image tokens; per-frame audio attention
                                   (skip_reshape) inside the block
    AnimateWanModel  wan_animate   grid only (reference image = latent frame 0, pose added in place;
                                   face attention after the block, without transformer_options)
    SCAILWanModel    wan_scail     grid = reference frames + video frames, then pose tokens
    HunyuanVideo     hunyuan_video      HunyuanVideo T2V / I2V / SkyReels I2V (CLIP vector input)
                     hunyuan_video_1.5  HunyuanVideo 1.5 (vision input, no CLIP vector)
                     Joint attention over text + reference latent + video; text after the video on
                     ComfyUI versions whose double blocks have flipped_img_txt (0.3.64), text first on
                     later ones (0.19.3).

Router input: Wan = time_embedding(sinusoidal(t, freq_dim)); HunyuanVideo = time_in(sinusoidal(t,
256)) without guidance / pooled text. Blocks: Wan blocks; HunyuanVideo double, then single blocks.
"""
from __future__ import annotations

import inspect as _inspect
import math
from dataclasses import dataclass

import torch

from vorta_ops.router import sinusoidal_embedding
from vorta_ops.sliding_tile import ALIGNED_TILE, HUNYUAN_TILE, WAN_TILE

# exact diffusion model class name -> variant (WanModel and HunyuanVideo split further by config)
WAN_CLASSES = {
    "WanModel": "wan",
    "VaceWanModel": "wan_vace",
    "CameraWanModel": "wan_camera",
    "WanModel_S2V": "wan_s2v",
    "HumoWanModel": "wan_humo",
    "AnimateWanModel": "wan_animate",
    "SCAILWanModel": "wan_scail",
}
HUNYUAN_CLASSES = {"HunyuanVideo": "hunyuan_video"}
SUPPORTED = {**{k: "wan" for k in WAN_CLASSES}, **{k: "hunyuan" for k in HUNYUAN_CLASSES}}

VARIANT_LABELS = {
    "wan": "Wan 2.1/2.2 (T2V, I2V, FLF2V, Fun, 2.2 5B)",
    "wan_refconv": "Wan Fun with a reference-image conv",
    "wan_vace": "Wan VACE",
    "wan_camera": "Wan Fun Camera",
    "wan_s2v": "Wan 2.2 S2V",
    "wan_humo": "HuMo",
    "wan_animate": "Wan 2.2 Animate",
    "wan_scail": "SCAIL",
    "hunyuan_video": "HunyuanVideo (T2V, I2V)",
    "hunyuan_video_1.5": "HunyuanVideo 1.5",
}
VARIANT_FAMILY = {v: ("hunyuan" if v.startswith("hunyuan") else "wan") for v in VARIANT_LABELS}

SUPPORTED_TEXT = (
    "Wan 2.1 / 2.2 (WanModel: T2V, I2V, FLF2V, Fun, 2.2 A14B and 5B; VaceWanModel: VACE; CameraWanModel: "
    "Fun Camera; WanModel_S2V: S2V; HumoWanModel: HuMo; AnimateWanModel: Animate; SCAILWanModel: SCAIL) "
    "and HunyuanVideo (HunyuanVideo: T2V / I2V and HunyuanVideo 1.5)"
)

# official VORTA routers (Hugging Face Wenhao-Sun/VORTA): variant -> (folder, model, blocks, heads, embed)
OFFICIAL_ROUTERS = {
    "wan": ("wan-14B", "Wan 2.1 T2V 14B", 40, 40, 5120),
    "hunyuan_video": ("hunyuan", "HunyuanVideo T2V", 60, 24, 3072),
}

# HunyuanVideo 1.5 has no official router, so no trained tile. One token there is 16x16 pixels x 4
# frames (VAE 16x spatial, patch 1x1x1), the same extent as HunyuanVideo's (8x VAE, patch 1x2x2), but
# its grids are (31, 30, 53) at 480p and (31, 45, 80) at 720p (121 frames). (4, 8, 8) = 256 tokens is
# two whole 128-token kernel blocks (no in-tile padding, unlike HunyuanVideo's 432-token 6x9x8, which
# would also pad 480p to 36x36x56, +47%) and pads those grids by only 10-16% (t 31->32, h 30->32 /
# 45->48, w 53->56 / 80).
HUNYUAN15_TILE = ALIGNED_TILE


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
    variant: str = ""  # a VARIANT_LABELS key; "" = the family's base variant
    # HunyuanVideo joint attention: where the text tokens sit relative to the (reference +) video
    # tokens in this ComfyUI version: "after" or "before"; "" for models without joint attention
    # (Wan) or when not known (a spec read from a file header)
    joint_text: str = ""

    def __post_init__(self):
        if not self.variant:
            object.__setattr__(self, "variant", "hunyuan_video" if self.family == "hunyuan" else "wan")

    def describe(self) -> str:
        label = VARIANT_LABELS.get(self.variant, self.variant)
        return f"{self.class_name} ({label}): {self.blocks} blocks x {self.heads} heads, embed dim {self.embed_dim}"


def model_family(diffusion_model) -> str | None:
    """"wan" / "hunyuan" for the exact supported classes, else None."""
    return SUPPORTED.get(type(diffusion_model).__name__)


def _refuse(name: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"VORTA does not support {name} models{why}; supported: {SUPPORTED_TEXT}. "
        f"Connect one of those models, or bypass this node."
    )


def _passes_options_to_blocks(cls) -> bool:
    """Does cls.forward_orig hand transformer_options to the "dit" block patches (and so to the
    blocks' attention)? ComfyUI 0.3.64's WanModel_S2V does not: its attention never reaches an
    attention override, and a block patch gets no transformer_options."""
    try:
        src = _inspect.getsource(cls.forward_orig)
    except (AttributeError, OSError, TypeError):
        return False
    return "'transformer_options': transformer_options" in src or '"transformer_options": transformer_options' in src


def inspect_model(diffusion_model) -> ModelSpec:
    dm = diffusion_model
    cls = type(dm)
    name = cls.__name__
    if name in WAN_CLASSES:
        return _inspect_wan(dm, name, WAN_CLASSES[name])
    if name in HUNYUAN_CLASSES:
        return _inspect_hunyuan(dm, name)
    for base in cls.__mro__[1:]:
        if base.__name__ in SUPPORTED:
            raise _refuse(name, f" (a subclass of {base.__name__} whose token layout VORTA does not know)")
    raise _refuse(name, "")


def _patch3(dm, name: str) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in dm.patch_size)
    if len(patch) != 3:
        raise _refuse(name, f" with a {len(patch)}D patch {patch} (an image model)")
    return patch  # type: ignore[return-value]


def _inspect_wan(dm, name: str, variant: str) -> ModelSpec:
    patch = _patch3(dm, name)
    if variant == "wan" and getattr(dm, "ref_conv", None) is not None:
        variant = "wan_refconv"
    if variant == "wan_s2v" and not _passes_options_to_blocks(type(dm)):
        raise _refuse(
            f"{name} (Wan 2.2 S2V)",
            " on this ComfyUI version: its blocks run without transformer_options, so no attention override "
            "reaches them (update ComfyUI: 0.19.3 passes them)",
        )
    blocks = len(dm.blocks)
    keys = tuple(("double_block", i) for i in range(blocks))
    return ModelSpec("wan", blocks, int(dm.num_heads), int(dm.dim), patch, WAN_TILE, keys, name, variant)


def _inspect_hunyuan(dm, name: str) -> ModelSpec:
    patch = _patch3(dm, name)
    if getattr(dm, "vision_in", None) is not None:
        variant, tile = "hunyuan_video_1.5", HUNYUAN15_TILE
    elif getattr(dm, "vector_in", None) is not None:
        variant, tile = "hunyuan_video", HUNYUAN_TILE
    else:  # HunyuanImage 2.1's refiner: same class, 3D patch, neither a CLIP vector nor a vision input
        raise _refuse(f"{name} (HunyuanImage 2.1 refiner)", " (an image model: no CLIP vector or vision input)")
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    keys = tuple(("double_block", i) for i in range(n_double)) + tuple(("single_block", i) for i in range(n_single))
    # ComfyUI versions whose double blocks have flipped_img_txt (set by HunyuanVideo) put the video
    # before the text in both block kinds; later ones (no such attribute) put the text first
    joint_text = ("after" if getattr(dm.double_blocks[0], "flipped_img_txt", False) else "before") if n_double else ""
    return ModelSpec(
        "hunyuan", n_double + n_single, int(dm.num_heads), int(dm.hidden_size), patch, tile, keys, name, variant, joint_text,
    )


def router_suggestion(spec: ModelSpec) -> str:
    """The closing advice of a router/model mismatch, naming the model's own family."""
    sizes = f"{spec.blocks} blocks x {spec.heads} heads x embed {spec.embed_dim}"
    official = OFFICIAL_ROUTERS.get(spec.variant)
    if official is not None:
        folder, model, b, h, e = official
        if (spec.blocks, spec.heads, spec.embed_dim) == (b, h, e):
            return f"Load the router trained for this model (e.g. {folder} for {model})."
        return (
            f"Load the router trained for this model: the official {folder} router is for {model} "
            f"({b} blocks x {h} heads x embed {e}); this model needs a router made for it ({sizes})."
        )
    label = VARIANT_LABELS.get(spec.variant, spec.variant)
    return (
        f"Load the router trained for this model: VORTA has no official router for {label}; "
        f"it needs a router made for this model ({sizes})."
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
            f"{router_suggestion(spec)}"
        )


def router_embedding(diffusion_model, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    """The router's input for timestep t (0..1000): [embed_dim] float32 on the CPU. Every Wan variant
    embeds time with time_embedding(sinusoidal(t, freq_dim)), every HunyuanVideo one with
    time_in(sinusoidal(t, 256)) (HunyuanVideo 1.5 included; guidance / mean-flow terms left out)."""
    with torch.no_grad():
        if spec.family == "wan":
            sin = sinusoidal_embedding(t, diffusion_model.freq_dim).to(device, dtype)
            e = diffusion_model.time_embedding(sin)
        else:
            sin = sinusoidal_embedding(t, 256).to(device, dtype)
            e = diffusion_model.time_in(sin)
    return e[0].float().cpu()


# ---- token layout of one model call ------------------------------------------------------------


def token_grid(spec: ModelSpec, x_shape, extra_frames: int = 0) -> tuple[int, int, int]:
    """Token grid of a latent [B, C, T, H, W] after patching (ComfyUI pads to the patch size)."""
    T, H, W = x_shape[2] + extra_frames, x_shape[3], x_shape[4]
    return tuple(math.ceil(n / p) for n, p in zip((T, H, W), spec.patch_size))  # type: ignore[return-value]


def _is5d(t) -> bool:
    return t is not None and hasattr(t, "shape") and len(t.shape) == 5


def _padded_tokens(shape, patch) -> int:
    """Tokens of a patch embedding that pads to the patch size (ComfyUI's pad_to_patch_size)."""
    return math.prod(math.ceil(n / p) for n, p in zip(shape, patch))


def _conv_tokens(shape, patch) -> int:
    """Tokens of a plain strided conv (no padding) of kernel = stride = patch."""
    return math.prod(n // p for n, p in zip(shape, patch))


def video_grid(spec: ModelSpec, transformer_options: dict, named: dict, x_shape) -> tuple[int, int, int]:
    """The latent token grid (t, h, w) of one model call, from the diffusion model forward's arguments.

    Computed from the shapes, not read from transformer_options["grid_sizes"]: ComfyUI (0.19.3) sets
    that inside forward_orig, after the DIFFUSION_MODEL wrapper that calls this, and not for every
    variant (Camera, S2V, HuMo and Animate never set it). Wan variants pad x to the patch and append
    time_dim_concat frames to it in time (part of the grid); SCAIL also puts its reference frames
    before the video frames in time (part of the grid too)."""
    if len(x_shape) != 5:
        raise ValueError(f"expected a video latent [B, C, T, H, W], got shape {tuple(x_shape)}")
    pt = spec.patch_size[0]
    t, h, w = token_grid(spec, x_shape)
    if spec.family == "wan":
        tdc = named.get("time_dim_concat")
        if _is5d(tdc):
            t += math.ceil(tdc.shape[2] / pt)
        if spec.variant == "wan_scail":
            ref = named.get("reference_latent")
            if _is5d(ref):
                t += math.ceil(ref.shape[2] / pt)
    return (t, h, w)


@dataclass(frozen=True)
class CallLayout:
    """Where the extra tokens of one model call sit around the video grid in block self-attention."""

    n_before: int  # known extra tokens before the grid (reference latents)
    n_after: int  # known extra tokens after the grid (reference / pose tokens)
    rest: str  # where tokens not accounted for go: "none" (must be none), "before" or "after"
    routable: bool = True
    why: str = ""  # when not routable


def call_layout(spec: ModelSpec, named: dict, grid) -> CallLayout:
    """The token layout of one model call (computed once per call, from the forward's arguments)."""
    v = spec.variant
    patch = spec.patch_size
    if spec.family == "hunyuan":
        ref = named.get("ref_latent")
        n_ref = _padded_tokens(ref.shape[2:], patch) if _is5d(ref) else 0  # img_in pads
        if spec.joint_text == "after":  # [reference][video][text]
            return CallLayout(n_ref, 0, "after")
        if spec.joint_text == "before":  # [text][reference][video]
            return CallLayout(n_ref, 0, "before")
        return CallLayout(0, 0, "none", False, "unknown joint-attention order")
    if v == "wan_refconv":  # [reference image (ref_conv, a 2D conv without padding)][video]
        ref = named.get("reference_latent")
        n_ref = _conv_tokens(ref.shape[-2:], patch[1:]) if ref is not None and hasattr(ref, "shape") and len(ref.shape) >= 4 else 0
        return CallLayout(n_ref, 0, "none")
    if v == "wan_s2v":  # [video][reference frames][motion frames]; ref/motion counts vary with the packer
        return CallLayout(0, 0, "after")
    if v == "wan_humo":  # [video][reference frames (patch_embedding, no padding)]
        ref = named.get("reference_latent")
        n_ref = _conv_tokens(ref.shape[2:], patch) if _is5d(ref) else 0
        if grid[0] == 1 and n_ref == 0 and named.get("audio_embed") is not None:
            # the per-frame audio attention would then have the shape of video self-attention
            return CallLayout(0, 0, "none", False, "one latent frame with audio: per-frame audio attention looks like self-attention")
        return CallLayout(0, n_ref, "none")
    if v == "wan_scail":  # [reference + video frames][pose tokens (padded to the patch)]
        pose = named.get("pose_latents")
        n_pose = _padded_tokens(pose.shape[2:], patch) if _is5d(pose) else 0
        return CallLayout(0, n_pose, "none")
    if v in ("wan", "wan_vace", "wan_camera", "wan_animate"):
        return CallLayout(0, 0, "none")
    return CallLayout(0, 0, "none", False, f"variant {v!r} has no known layout")


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


def prefix_tokens(spec: ModelSpec, kwargs: dict) -> int:
    """Grid-external tokens placed before the video tokens by reference latents (HunyuanVideo
    ref_latent; Wan ref_conv). Kept for callers of the old interface; see call_layout."""
    lay = call_layout(spec, kwargs, (0, 0, 0))
    return lay.n_before if lay.routable else 0
