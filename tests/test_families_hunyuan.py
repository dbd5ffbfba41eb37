"""nodes/families/hunyuan.py against small fakes named like ComfyUI's class (no ComfyUI needed): one
detection path, so for every HunyuanVideo variant the spec of a model object and the spec of its
state-dict header (the /prompt rules) agree, and the image models of the same class are refused by
both. tests/test_nodes_models.py covers the same through nodes.models; tests/test_comfyui_variants.py
on the real class."""
from __future__ import annotations

import pytest
import torch

from nodes import families, models
from nodes.families import hunyuan
from vorta_ops.sliding_tile import ALIGNED_TILE, HUNYUAN_TILE


from model_fakes import HunyuanVideo


def hunyuan_header(hidden=256, double=2, single=3, patch=(1, 2, 2), extra=("vector_in.in_layer.weight",), pre=""):
    s = {f"{pre}img_in.proj.weight": (hidden, 16, *patch), f"{pre}txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,)}
    s.update({f"{pre}double_blocks.{i}.img_attn.qkv.weight": (3 * hidden, hidden) for i in range(double)})
    s.update({f"{pre}single_blocks.{i}.linear1.weight": (1,) for i in range(single)})
    s.update({f"{pre}{k}": (1,) for k in extra})
    return s


# variant -> (model object, header kwargs)
VARIANTS = {
    "hunyuan_video": (lambda: HunyuanVideo(), {}),
    "hunyuan_video_1.5": (lambda: HunyuanVideo(hidden=2048, heads=16, double=54, single=0, patch=(1, 1, 1), vector=False, vision=True),
                          dict(hidden=2048, double=54, single=0, patch=(1, 1, 1),
                               extra=("vision_in.proj.0.weight", "cond_type_embedding.weight", "byt5_in.fc1.weight"))),
}
REFUSED = {  # same class, image models: the object is refused, the header gives no spec
    "HunyuanImage 2.1 refiner": (lambda: HunyuanVideo(patch=(1, 1, 1), vector=False), dict(patch=(1, 1, 1), extra=())),
    "2D patch": (lambda: HunyuanVideo(patch=(1, 1)), dict(patch=(1, 1), extra=())),
}


def _key(spec):
    return (spec.family, spec.variant, spec.blocks, spec.heads, spec.embed_dim, spec.patch_size, spec.official_tile, spec.block_keys)


def test_every_variant_is_covered():
    assert set(VARIANTS) == set(hunyuan.VARIANTS) == set(hunyuan.TILES)
    assert hunyuan.TILES == {"hunyuan_video": HUNYUAN_TILE, "hunyuan_video_1.5": ALIGNED_TILE}
    assert models.HUNYUAN15_TILE == hunyuan.HUNYUAN15_TILE == (4, 8, 8)
    assert (hunyuan.FAMILY.similarity, families.get("wan").similarity) == ("qk", "q")  # patch.py's "auto"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pre", ["", "model.diffusion_model."])
def test_object_and_header_specs_agree(variant, pre):
    make, kw = VARIANTS[variant]
    obj = families.inspect(make())
    head = families.from_header(hunyuan_header(pre=pre, **kw))
    assert obj.variant == variant
    assert _key(obj) == _key(head)
    # the joint-attention order is a property of the ComfyUI version, not of the file: unknown there
    assert obj.joint_text == "before" and head.joint_text == ""
    assert _key(hunyuan.FAMILY.inspect(make())) == _key(models.inspect_model(make())) == _key(obj)


@pytest.mark.parametrize("says", list(REFUSED))
def test_image_models_refused_by_both(says):
    make, kw = REFUSED[says]
    with pytest.raises(families.UnsupportedModelError, match=says):
        families.inspect(make())
    assert families.from_header(hunyuan_header(**kw)) is None


def test_registry_dispatch_and_advice():
    spec = families.inspect(HunyuanVideo(flipped=True))
    assert families.family_of(HunyuanVideo()) is hunyuan.FAMILY and families.get(spec.family) is hunyuan.FAMILY
    assert families.family_of(type("MyHunyuan", (HunyuanVideo,), {})()) is None
    assert families.call_layout(spec, {}, (3, 4, 4)) == hunyuan.call_layout(spec, {}, (3, 4, 4))
    assert families.split_tokens(spec, families.call_layout(spec, {}, (3, 4, 4)), 48 + 6, 48) == (0, 6)
    big = families.inspect(HunyuanVideo(hidden=3072, heads=24, double=20, single=40))
    assert families.router_suggestion(big) == "Load the router trained for this model (e.g. hunyuan for HunyuanVideo T2V)."
    v15 = families.inspect(VARIANTS["hunyuan_video_1.5"][0]())
    assert "no official router for HunyuanVideo 1.5" in families.router_suggestion(v15)
    e = families.router_embedding(HunyuanVideo(), spec, 500.0, torch.float32, "cpu")
    assert e.shape == (256,) and e.dtype == torch.float32
