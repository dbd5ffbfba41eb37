"""nodes.models against small fakes named like ComfyUI's classes (no ComfyUI needed): variant
detection and refusals, the token grid and split of each variant, router advice, and the /prompt-time
spec of each variant's file header. tests/test_comfyui_variants.py checks the same on the real classes."""
from __future__ import annotations

import pytest
import torch

from nodes.models import (
    HUNYUAN15_TILE,
    UnsupportedModelError,
    call_layout,
    check_router_fits,
    inspect_model,
    router_embedding,
    split_tokens,
    video_grid,
)
from nodes.prompt_check import spec_from_shapes
from vorta_ops.router import RouterSet
from vorta_ops.sliding_tile import HUNYUAN_TILE, WAN_TILE


# ---- fakes -------------------------------------------------------------------------------------

from model_fakes import (  # noqa: E402
    AnimateWanModel, CameraWanModel, HumoWanModel, HunyuanVideo, SCAILWanModel, VaceWanModel, WanModel, WanModel_S2V,
)


class OldS2V(WanModel):  # as ComfyUI 0.3.64: no transformer_options for the blocks
    def forward_orig(self, x, transformer_options={}):
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        return blocks_replace[("double_block", 0)]({"img": x}, {})


OldS2V.__name__ = "WanModel_S2V"


class MyWan(WanModel):  # a subclass nobody told VORTA about
    pass


class MyHunyuan(HunyuanVideo):
    pass


class FluxLike(torch.nn.Module):
    patch_size = (2, 2)


def t5(*shape):
    return torch.zeros(*shape)


# ---- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, variant",
    [
        (WanModel(), "wan"),
        (WanModel(ref_conv=True), "wan_refconv"),
        (VaceWanModel(), "wan_vace"),
        (CameraWanModel(), "wan_camera"),
        (WanModel_S2V(), "wan_s2v"),
        (HumoWanModel(), "wan_humo"),
        (AnimateWanModel(), "wan_animate"),
        (SCAILWanModel(), "wan_scail"),
    ],
)
def test_wan_variants_by_exact_class(model, variant):
    spec = inspect_model(model)
    assert (spec.family, spec.variant, spec.blocks, spec.heads, spec.embed_dim) == ("wan", variant, 2, 2, 256)
    assert spec.official_tile == WAN_TILE and spec.block_keys == (("double_block", 0), ("double_block", 1))
    assert spec.joint_text == ""


def test_hunyuan_variants_by_config():
    old = inspect_model(HunyuanVideo(flipped=True))  # ComfyUI 0.3.64: video, then text
    new = inspect_model(HunyuanVideo())  # 0.19.3: text first
    assert (old.variant, old.joint_text, new.variant, new.joint_text) == ("hunyuan_video", "after", "hunyuan_video", "before")
    assert old.blocks == 5 and old.block_keys[2] == ("single_block", 0) and old.official_tile == HUNYUAN_TILE
    v15 = inspect_model(HunyuanVideo(hidden=2048, heads=16, double=54, single=0, patch=(1, 1, 1), vector=False, vision=True))
    assert (v15.variant, v15.family, v15.blocks, v15.heads, v15.embed_dim) == ("hunyuan_video_1.5", "hunyuan", 54, 16, 2048)
    assert v15.official_tile == HUNYUAN15_TILE == (4, 8, 8)
    assert "HunyuanVideo 1.5" in v15.describe()


@pytest.mark.parametrize(
    "model, says",
    [
        (MyWan(), "MyWan models (a subclass of WanModel whose token layout VORTA does not know)"),
        (MyHunyuan(), "MyHunyuan models (a subclass of HunyuanVideo"),
        (FluxLike(), "does not support FluxLike models; supported: Wan 2.1 / 2.2"),
        (OldS2V(), "WanModel_S2V (Wan 2.2 S2V) models on this ComfyUI version: its blocks run without transformer_options"),
        (HunyuanVideo(patch=(1, 1, 1), vector=False), "HunyuanImage 2.1 refiner"),
        (HunyuanVideo(patch=(1, 1)), "with a 2D patch (1, 1) (an image model)"),
    ],
)
def test_refusals_name_the_model_and_list_what_is_supported(model, says):
    with pytest.raises(UnsupportedModelError) as e:
        inspect_model(model)
    msg = str(e.value)
    assert says in msg
    for name in ("WanModel", "VaceWanModel", "CameraWanModel", "WanModel_S2V", "HumoWanModel", "AnimateWanModel",
                 "SCAILWanModel", "HunyuanVideo 1.5"):
        assert name in msg


def test_hunyuan_without_double_blocks_is_not_routed():
    spec = inspect_model(HunyuanVideo(double=0))
    assert spec.joint_text == ""
    lay = call_layout(spec, {}, (3, 4, 4))
    assert not lay.routable and split_tokens(spec, lay, 60, 48) is None


# ---- grid and split --------------------------------------------------------------------------


def test_video_grid_wan_pads_and_counts_time_concat_frames():
    spec = inspect_model(WanModel())
    stale = {"grid_sizes": (9, 9, 9)}  # left by another call: not trusted
    assert video_grid(spec, stale, {}, (1, 16, 3, 9, 13)) == (3, 5, 7)
    assert video_grid(spec, {}, {"time_dim_concat": t5(1, 16, 2, 9, 13)}, (1, 16, 3, 9, 13)) == (5, 5, 7)
    assert video_grid(spec, {}, {"reference_latent": t5(1, 16, 1, 8, 8)}, (1, 16, 3, 8, 8)) == (3, 4, 4)
    with pytest.raises(ValueError, match="video latent"):
        video_grid(spec, {}, {}, (1, 16, 8, 8))


def test_video_grid_scail_puts_reference_frames_in_the_grid():
    spec = inspect_model(SCAILWanModel())
    named = {"reference_latent": t5(1, 20, 1, 8, 8), "pose_latents": t5(1, 20, 3, 4, 4)}
    assert video_grid(spec, {}, named, (1, 20, 3, 8, 8)) == (4, 4, 4)


def test_video_grid_hunyuan():
    assert video_grid(inspect_model(HunyuanVideo()), {}, {"ref_latent": t5(1, 16, 1, 8, 8)}, (1, 16, 3, 9, 8)) == (3, 5, 4)
    v15 = inspect_model(HunyuanVideo(patch=(1, 1, 1), vector=False, vision=True))
    assert video_grid(v15, {}, {}, (1, 65, 31, 30, 53)) == (31, 30, 53)


def _split(model, named, x_shape, L):
    spec = inspect_model(model)
    grid = video_grid(spec, {}, named, x_shape)
    n = grid[0] * grid[1] * grid[2]
    return split_tokens(spec, call_layout(spec, named, grid), L, n)


X = (1, 16, 3, 8, 8)  # -> 3 x 4 x 4 = 48 video tokens


@pytest.mark.parametrize("cls", [WanModel, VaceWanModel, CameraWanModel, AnimateWanModel])
def test_grid_only_variants(cls):
    assert _split(cls(), {}, X, 48) == (0, 0)
    assert _split(cls(), {"reference_latent": t5(1, 16, 8, 8)}, X, 48) == (0, 0)  # ignored without ref_conv
    assert _split(cls(), {}, X, 64) is None  # unexpected extra tokens: dense
    assert _split(cls(), {}, X, 16) is None  # shorter than the video: not video


def test_wan_refconv_reference_first():
    named = {"reference_latent": t5(1, 16, 9, 8)}  # unpadded 2D conv: 4 x 4 tokens
    assert _split(WanModel(ref_conv=True), named, X, 64) == (16, 0)
    assert _split(WanModel(ref_conv=True), named, X, 48) is None
    assert _split(WanModel(ref_conv=True), {}, X, 48) == (0, 0)


def test_s2v_reference_and_motion_after():
    named = {"reference_latent": t5(1, 16, 1, 8, 8), "reference_motion": t5(1, 16, 19, 8, 8)}
    assert _split(WanModel_S2V(), named, X, 88) == (0, 40)
    assert _split(WanModel_S2V(), {}, X, 48) == (0, 0)
    assert _split(WanModel_S2V(), {}, X, 40) is None


def test_humo_reference_after_and_audio_attention_is_not_video():
    named = {"reference_latent": t5(1, 16, 1, 9, 8), "audio_embed": t5(1, 3, 8, 5, 1280)}  # 1 x 4 x 4 (unpadded)
    assert _split(HumoWanModel(), named, X, 64) == (0, 16)
    assert _split(HumoWanModel(), named, X, 16) is None  # per-frame audio attention: 16 tokens a frame
    assert _split(HumoWanModel(), named, X, 48) is None
    # one latent frame, no reference: the per-frame audio attention has the video's shape: never routed
    one = (1, 16, 1, 8, 8)
    assert _split(HumoWanModel(), {"audio_embed": t5(1, 1, 8, 5, 1280)}, one, 16) is None
    assert _split(HumoWanModel(), {}, one, 16) == (0, 0)


def test_scail_pose_after_padded():
    named = {"reference_latent": t5(1, 20, 1, 8, 8), "pose_latents": t5(1, 20, 3, 3, 4)}  # pose padded to 3 x 2 x 2
    assert _split(SCAILWanModel(), named, (1, 20, 3, 8, 8), 64 + 12) == (0, 12)
    assert _split(SCAILWanModel(), {}, (1, 20, 3, 8, 8), 48) == (0, 0)


def test_hunyuan_text_and_reference_by_joint_order():
    named = {"ref_latent": t5(1, 16, 1, 7, 8)}  # img_in pads: 1 x 4 x 4 = 16
    assert _split(HunyuanVideo(flipped=True), named, X, 16 + 48 + 6) == (16, 6)  # [ref][video][text]
    assert _split(HunyuanVideo(), named, X, 16 + 48 + 6) == (22, 0)  # [text][ref][video]
    assert _split(HunyuanVideo(), {}, X, 48 + 6) == (6, 0)
    assert _split(HunyuanVideo(flipped=True), {}, X, 48) == (0, 0)
    assert _split(HunyuanVideo(), named, X, 60) is None  # shorter than reference + video
    assert _split(HunyuanVideo(), {}, X, 6) is None  # the text refiner


# ---- router advice and embedding -----------------------------------------------------------------


def router(family="wan", blocks=2, heads=2, embed=256):
    return RouterSet(family, torch.zeros(blocks, heads * 3, embed), torch.zeros(blocks, heads * 3))


def _fit_error(r, model):
    with pytest.raises(ValueError) as e:
        check_router_fits(r, inspect_model(model))
    return str(e.value)


def test_router_advice_names_the_models_own_family():
    msg = _fit_error(router(blocks=3), WanModel(dim=5120, heads=40, blocks=40))
    assert "blocks: router 3, model 40" in msg and "Load the router trained for this model" in msg
    assert msg.endswith("(e.g. wan-14B for Wan 2.1 T2V 14B).")
    msg = _fit_error(router("hunyuan"), HunyuanVideo(hidden=3072, heads=24, double=20, single=40))
    assert msg.endswith("(e.g. hunyuan for HunyuanVideo T2V).") and "wan-14B" not in msg
    msg = _fit_error(router(blocks=3), WanModel())  # a Wan size without an official router
    assert "the official wan-14B router is for Wan 2.1 T2V 14B" in msg and "(2 blocks x 2 heads x embed 256)" in msg
    msg = _fit_error(router("hunyuan", blocks=60, heads=24, embed=3072),
                     HunyuanVideo(hidden=2048, heads=16, double=54, single=0, patch=(1, 1, 1), vector=False, vision=True))
    assert "Load the router trained for this model: VORTA has no official router for HunyuanVideo 1.5" in msg
    assert "(54 blocks x 16 heads x embed 2048)" in msg and "blocks: router 60, model 54" in msg
    msg = _fit_error(router(blocks=3), HumoWanModel())
    assert "no official router for HuMo" in msg
    check_router_fits(router(), inspect_model(VaceWanModel()))  # fits: no error


@pytest.mark.parametrize(
    "model", [WanModel(), SCAILWanModel(), WanModel_S2V(), HunyuanVideo(), HunyuanVideo(patch=(1, 1, 1), vector=False, vision=True)]
)
def test_router_embedding_for_every_routed_variant(model):
    e = router_embedding(model, inspect_model(model), 500.0, torch.float32, "cpu")
    assert e.shape == (256,) and e.dtype == torch.float32 and torch.isfinite(e).all()


# ---- file headers (the /prompt-time check) -------------------------------------------------------


def wan_header(extra=(), dim=256, blocks=2, pre=""):
    s = {f"{pre}head.modulation": (1, 2, dim), f"{pre}patch_embedding.weight": (dim, 16, 1, 2, 2)}
    s.update({f"{pre}blocks.{i}.self_attn.q.weight": (dim, dim) for i in range(blocks)})
    s.update({f"{pre}{k}": (1,) for k in extra})
    return s


@pytest.mark.parametrize(
    "keys, variant",
    [
        ((), "wan"),
        (("img_emb.proj.0.bias",), "wan"),
        (("ref_conv.weight",), "wan_refconv"),
        (("vace_patch_embedding.weight", "vace_blocks.0.after_proj.weight"), "wan_vace"),
        (("control_adapter.conv.weight",), "wan_camera"),
        (("casual_audio_encoder.encoder.final_linear.weight",), "wan_s2v"),
        (("audio_proj.audio_proj_glob_1.layer.bias",), "wan_humo"),
        (("face_adapter.fuser_blocks.0.k_norm.weight",), "wan_animate"),
        (("patch_embedding_pose.weight",), "wan_scail"),
    ],
)
def test_spec_from_wan_variant_headers(keys, variant):
    for pre in ("", "model.diffusion_model."):
        spec = spec_from_shapes(wan_header(keys, pre=pre))
        assert (spec.family, spec.variant, spec.blocks, spec.heads, spec.embed_dim, spec.patch_size) == ("wan", variant, 2, 2, 256, (1, 2, 2))


def hunyuan_header(hidden=256, double=2, single=3, patch=(1, 2, 2), extra=("vector_in.in_layer.weight",)):
    s = {"img_in.proj.weight": (hidden, 16, *patch), "txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,)}
    s.update({f"double_blocks.{i}.img_attn.qkv.weight": (3 * hidden, hidden) for i in range(double)})
    s.update({f"single_blocks.{i}.linear1.weight": (1,) for i in range(single)})
    s.update({k: (1,) for k in extra})
    return s


def test_spec_from_hunyuan_headers():
    hy = spec_from_shapes(hunyuan_header())
    assert (hy.variant, hy.blocks, hy.heads, hy.official_tile) == ("hunyuan_video", 5, 2, HUNYUAN_TILE)
    v15 = spec_from_shapes(hunyuan_header(2048, 54, 0, (1, 1, 1), ("vision_in.proj.0.weight", "cond_type_embedding.weight",
                                                                    "byt5_in.fc1.weight")))
    assert (v15.variant, v15.family, v15.blocks, v15.heads, v15.embed_dim, v15.patch_size, v15.official_tile) == (
        "hunyuan_video_1.5", "hunyuan", 54, 16, 2048, (1, 1, 1), (4, 8, 8))
    assert spec_from_shapes(hunyuan_header(patch=(1, 1, 1), extra=())) is None  # HunyuanImage 2.1 refiner
    assert spec_from_shapes(hunyuan_header(patch=(1, 1), extra=())) is None  # HunyuanImage 2.1


def test_header_spec_matches_runtime_spec():
    for header, model in (
        (wan_header(("audio_proj.audio_proj_glob_1.layer.bias",)), HumoWanModel()),
        (hunyuan_header(2048, 54, 0, (1, 1, 1), ("vision_in.proj.0.weight",)),
         HunyuanVideo(hidden=2048, heads=16, double=54, single=0, patch=(1, 1, 1), vector=False, vision=True)),
    ):
        a, b = spec_from_shapes(header), inspect_model(model)
        assert (a.family, a.variant, a.blocks, a.heads, a.embed_dim, a.official_tile, a.block_keys) == (
            b.family, b.variant, b.blocks, b.heads, b.embed_dim, b.official_tile, b.block_keys)
