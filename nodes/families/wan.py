"""Wan 2.1 / 2.2 and the models built on its DiT (ComfyUI 0.3.64 .. 0.19.3).

Exact class -> variant (token layout of a block's self-attention):

    WanModel         wan           Wan 2.1 T2V / I2V / FLF2V / Fun, Wan 2.2 A14B experts, Wan 2.2 5B,
                                   FlowRVS: the video grid (time_dim_concat frames are part of the grid)
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

Blocks: `blocks`, keyed ("double_block", i). Router input: time_embedding(sinusoidal(t, freq_dim)).
Header (/prompt): head.modulation + blocks.0.self_attn.q.weight; heads = width // 128; the variant
by the marker key ComfyUI's model detection checks for it.
"""
from __future__ import annotations

import inspect as _inspect
import math

import torch

from vorta_ops.router import sinusoidal_embedding
from vorta_ops.sliding_tile import WAN_TILE

from ._base import CallLayout, Family, ModelSpec, conv_tokens, count_indexed, header_prefix, is5d, padded_tokens, patch3, refuse, token_grid

CLASSES = {
    "WanModel": "wan",
    "VaceWanModel": "wan_vace",
    "CameraWanModel": "wan_camera",
    "WanModel_S2V": "wan_s2v",
    "HumoWanModel": "wan_humo",
    "AnimateWanModel": "wan_animate",
    "SCAILWanModel": "wan_scail",
}
VARIANTS = {
    "wan": "Wan 2.1/2.2 (T2V, I2V, FLF2V, Fun, 2.2 5B)",
    "wan_refconv": "Wan Fun with a reference-image conv",
    "wan_vace": "Wan VACE",
    "wan_camera": "Wan Fun Camera",
    "wan_s2v": "Wan 2.2 S2V",
    "wan_humo": "HuMo",
    "wan_animate": "Wan 2.2 Animate",
    "wan_scail": "SCAIL",
}
SUPPORTED_TEXT = (
    "Wan 2.1 / 2.2 (WanModel: T2V, I2V, FLF2V, Fun, 2.2 A14B and 5B; VaceWanModel: VACE; CameraWanModel: "
    "Fun Camera; WanModel_S2V: S2V; HumoWanModel: HuMo; AnimateWanModel: Animate; SCAILWanModel: SCAIL)"
)
OFFICIAL_ROUTERS = {"wan": ("wan-14B", "Wan 2.1 T2V 14B", 40, 40, 5120)}
TILES = {v: WAN_TILE for v in VARIANTS}


# ---- detection: model object -------------------------------------------------------------------


def _passes_options_to_blocks(cls) -> bool:
    """Does cls.forward_orig hand transformer_options to the "dit" block patches (and so to the
    blocks' attention)? ComfyUI 0.3.64's WanModel_S2V does not: its attention never reaches an
    attention override, and a block patch gets no transformer_options."""
    try:
        src = _inspect.getsource(cls.forward_orig)
    except (AttributeError, OSError, TypeError):
        return False
    return "'transformer_options': transformer_options" in src or '"transformer_options": transformer_options' in src


def _spec(name, variant, blocks, heads, dim, patch) -> ModelSpec:
    keys = tuple(("double_block", i) for i in range(blocks))
    return ModelSpec("wan", blocks, heads, dim, tuple(patch), TILES[variant], keys, name, variant)


def inspect(dm) -> ModelSpec:
    name = type(dm).__name__
    variant = CLASSES[name]
    patch = patch3(dm, name)
    if variant == "wan" and getattr(dm, "ref_conv", None) is not None:
        variant = "wan_refconv"
    if variant == "wan_s2v" and not _passes_options_to_blocks(type(dm)):
        raise refuse(
            f"{name} (Wan 2.2 S2V)",
            " on this ComfyUI version: its blocks run without transformer_options, so no attention override "
            "reaches them (update ComfyUI: 0.19.3 passes them)",
        )
    return _spec(name, variant, len(dm.blocks), int(dm.num_heads), int(dm.dim), patch)


# ---- detection: file header (/prompt) ----------------------------------------------------------

# variant by the state-dict key that ComfyUI's model detection checks for it (in its order)
HEADER_VARIANT_KEYS = (
    ("vace_patch_embedding.weight", "wan_vace", "VaceWanModel"),
    ("control_adapter.conv.weight", "wan_camera", "CameraWanModel"),
    ("casual_audio_encoder.encoder.final_linear.weight", "wan_s2v", "WanModel_S2V"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "wan_humo", "HumoWanModel"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "wan_animate", "AnimateWanModel"),
    ("patch_embedding_pose.weight", "wan_scail", "SCAILWanModel"),
)


def from_header(shapes: dict) -> ModelSpec | None:
    pre = header_prefix(shapes, "head.modulation", "blocks.0.self_attn.q.weight")
    if pre is None:
        return None
    dim = shapes[pre + "head.modulation"][-1]
    blocks = count_indexed(shapes, pre + "blocks.")
    patch = tuple(shapes.get(pre + "patch_embedding.weight", (0, 0, 1, 2, 2))[2:])
    variant, cls = "wan", "WanModel"
    for key, v, c in HEADER_VARIANT_KEYS:
        if pre + key in shapes:
            variant, cls = v, c
            break
    else:
        if pre + "ref_conv.weight" in shapes:
            variant = "wan_refconv"
    return _spec(f"{cls} (file header)", variant, blocks, dim // 128, dim, patch)


# ---- router input and token layout -------------------------------------------------------------


def router_embedding(dm, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    """time_embedding(sinusoidal(t, freq_dim)), every variant."""
    with torch.no_grad():
        e = dm.time_embedding(sinusoidal_embedding(t, dm.freq_dim).to(device, dtype))
    return e[0].float().cpu()


def video_grid(spec: ModelSpec, transformer_options: dict, named: dict, x_shape) -> tuple[int, int, int]:
    """x padded to the patch, plus time_dim_concat frames in time (part of the grid); SCAIL also puts
    its reference frames before the video frames in time (part of the grid too)."""
    pt = spec.patch_size[0]
    t, h, w = token_grid(spec, x_shape)
    tdc = named.get("time_dim_concat")
    if is5d(tdc):
        t += math.ceil(tdc.shape[2] / pt)
    if spec.variant == "wan_scail":
        ref = named.get("reference_latent")
        if is5d(ref):
            t += math.ceil(ref.shape[2] / pt)
    return (t, h, w)


def call_layout(spec: ModelSpec, named: dict, grid) -> CallLayout:
    v = spec.variant
    patch = spec.patch_size
    if v == "wan_refconv":  # [reference image (ref_conv, a 2D conv without padding)][video]
        ref = named.get("reference_latent")
        n_ref = conv_tokens(ref.shape[-2:], patch[1:]) if ref is not None and hasattr(ref, "shape") and len(ref.shape) >= 4 else 0
        return CallLayout(n_ref, 0, "none")
    if v == "wan_s2v":  # [video][reference frames][motion frames]; ref/motion counts vary with the packer
        return CallLayout(0, 0, "after")
    if v == "wan_humo":  # [video][reference frames (patch_embedding, no padding)]
        ref = named.get("reference_latent")
        n_ref = conv_tokens(ref.shape[2:], patch) if is5d(ref) else 0
        if grid[0] == 1 and n_ref == 0 and named.get("audio_embed") is not None:
            # the per-frame audio attention would then have the shape of video self-attention
            return CallLayout(0, 0, "none", False, "one latent frame with audio: per-frame audio attention looks like self-attention")
        return CallLayout(0, n_ref, "none")
    if v == "wan_scail":  # [reference + video frames][pose tokens (padded to the patch)]
        pose = named.get("pose_latents")
        n_pose = padded_tokens(pose.shape[2:], patch) if is5d(pose) else 0
        return CallLayout(0, n_pose, "none")
    if v in ("wan", "wan_vace", "wan_camera", "wan_animate"):
        return CallLayout(0, 0, "none")
    return CallLayout(0, 0, "none", False, f"variant {v!r} has no known layout")


FAMILY = Family(
    name="wan",
    classes=CLASSES,
    variants=VARIANTS,
    supported_text=SUPPORTED_TEXT,
    inspect=inspect,
    from_header=from_header,
    router_embedding=router_embedding,
    video_grid=video_grid,
    call_layout=call_layout,
    official_tiles=TILES,
    official_routers=OFFICIAL_ROUTERS,
    order=0,
)
