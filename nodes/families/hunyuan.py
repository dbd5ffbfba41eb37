"""HunyuanVideo and HunyuanVideo 1.5 (ComfyUI 0.3.64 .. 0.19.3).

Exact class HunyuanVideo, split by config:

    hunyuan_video      HunyuanVideo T2V / I2V / SkyReels I2V (CLIP vector input, vector_in)
    hunyuan_video_1.5  HunyuanVideo 1.5 (vision input, vision_in; no CLIP vector)
    refused            HunyuanImage 2.1 (2D patch) and its refiner (3D patch, neither input)

Joint attention over text + reference latent + video: text after the video on ComfyUI versions whose
double blocks have flipped_img_txt (0.3.64), text first on later ones (0.19.3).

Blocks: double, then single blocks. Router input: time_in(sinusoidal(t, 256)) without guidance /
pooled text / mean-flow terms. Header (/prompt): txt_in.individual_token_refiner + img_in.proj;
heads = width // 128.
"""
from __future__ import annotations

import torch

from vorta_ops.router import sinusoidal_embedding
from vorta_ops.sliding_tile import ALIGNED_TILE, HUNYUAN_TILE

from ._base import CallLayout, Family, ModelSpec, count_indexed, header_prefix, is5d, padded_tokens, patch3, refuse, token_grid

CLASSES = {"HunyuanVideo": "hunyuan_video"}
VARIANTS = {
    "hunyuan_video": "HunyuanVideo (T2V, I2V)",
    "hunyuan_video_1.5": "HunyuanVideo 1.5",
}
SUPPORTED_TEXT = "HunyuanVideo (HunyuanVideo: T2V / I2V and HunyuanVideo 1.5)"
OFFICIAL_ROUTERS = {"hunyuan_video": ("hunyuan", "HunyuanVideo T2V", 60, 24, 3072)}

# HunyuanVideo 1.5 has no official router, so no trained tile. One token there is 16x16 pixels x 4
# frames (VAE 16x spatial, patch 1x1x1), the same extent as HunyuanVideo's (8x VAE, patch 1x2x2), but
# its grids are (31, 30, 53) at 480p and (31, 45, 80) at 720p (121 frames). (4, 8, 8) = 256 tokens is
# two whole 128-token kernel blocks (no in-tile padding, unlike HunyuanVideo's 432-token 6x9x8, which
# would also pad 480p to 36x36x56, +47%) and pads those grids by only 10-16% (t 31->32, h 30->32 /
# 45->48, w 53->56 / 80).
HUNYUAN15_TILE = ALIGNED_TILE
TILES = {"hunyuan_video": HUNYUAN_TILE, "hunyuan_video_1.5": HUNYUAN15_TILE}


def _block_keys(n_double: int, n_single: int) -> tuple[tuple[str, int], ...]:
    return tuple(("double_block", i) for i in range(n_double)) + tuple(("single_block", i) for i in range(n_single))


# ---- detection: model object -------------------------------------------------------------------


def inspect(dm) -> ModelSpec:
    name = type(dm).__name__
    patch = patch3(dm, name)
    if getattr(dm, "vision_in", None) is not None:
        variant = "hunyuan_video_1.5"
    elif getattr(dm, "vector_in", None) is not None:
        variant = "hunyuan_video"
    else:  # HunyuanImage 2.1's refiner: same class, 3D patch, neither a CLIP vector nor a vision input
        raise refuse(f"{name} (HunyuanImage 2.1 refiner)", " (an image model: no CLIP vector or vision input)")
    n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
    # ComfyUI versions whose double blocks have flipped_img_txt (set by HunyuanVideo) put the video
    # before the text in both block kinds; later ones (no such attribute) put the text first
    joint_text = ("after" if getattr(dm.double_blocks[0], "flipped_img_txt", False) else "before") if n_double else ""
    return ModelSpec("hunyuan", n_double + n_single, int(dm.num_heads), int(dm.hidden_size), patch, TILES[variant],
                     _block_keys(n_double, n_single), name, variant, joint_text)


# ---- detection: file header (/prompt) ----------------------------------------------------------


def from_header(shapes: dict) -> ModelSpec | None:
    pre = header_prefix(shapes, "txt_in.individual_token_refiner.blocks.0.norm1.weight", "img_in.proj.weight")
    if pre is None:
        return None
    w = shapes[pre + "img_in.proj.weight"]
    hidden, patch = w[0], tuple(w[2:])
    if len(patch) != 3:
        return None  # HunyuanImage 2.1 (2D patch): refused
    if pre + "vision_in.proj.0.weight" in shapes:
        variant = "hunyuan_video_1.5"
    elif patch != (1, 1, 1) or any(k.startswith(pre + "vector_in.") for k in shapes):
        variant = "hunyuan_video"
    else:  # HunyuanImage 2.1 refiner: patch 1x1x1, neither a CLIP vector (vector_in) nor a vision input
        return None
    nd, ns = count_indexed(shapes, pre + "double_blocks."), count_indexed(shapes, pre + "single_blocks.")
    return ModelSpec("hunyuan", nd + ns, hidden // 128, hidden, patch, TILES[variant], _block_keys(nd, ns),
                     "HunyuanVideo (file header)", variant)


# ---- router input and token layout -------------------------------------------------------------


def router_embedding(dm, spec: ModelSpec, t: float, dtype, device) -> torch.Tensor:
    """time_in(sinusoidal(t, 256)), HunyuanVideo 1.5 included (guidance / mean-flow terms left out)."""
    with torch.no_grad():
        e = dm.time_in(sinusoidal_embedding(t, 256).to(device, dtype))
    return e[0].float().cpu()


def video_grid(spec: ModelSpec, transformer_options: dict, named: dict, x_shape) -> tuple[int, int, int]:
    """x padded to the patch (the reference latent is outside the grid: see call_layout)."""
    return token_grid(spec, x_shape)


def call_layout(spec: ModelSpec, named: dict, grid) -> CallLayout:
    ref = named.get("ref_latent")
    n_ref = padded_tokens(ref.shape[2:], spec.patch_size) if is5d(ref) else 0  # img_in pads
    if spec.joint_text == "after":  # [reference][video][text]
        return CallLayout(n_ref, 0, "after")
    if spec.joint_text == "before":  # [text][reference][video]
        return CallLayout(n_ref, 0, "before")
    return CallLayout(0, 0, "none", False, "unknown joint-attention order")


FAMILY = Family(
    name="hunyuan",
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
    order=1,
    similarity="qk",
)
