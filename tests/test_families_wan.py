"""nodes/families/wan.py and the family registry, against small fakes named like ComfyUI's classes
(no ComfyUI needed): one detection path, so for every Wan variant the spec of a model object and the
spec of its state-dict header (the /prompt rules) agree. tests/test_nodes_models.py covers the same
variants through nodes.models; tests/test_comfyui_variants.py on the real classes."""
from __future__ import annotations

import ast
import pathlib

import pytest

from nodes import families, models
from nodes.families import wan
from vorta_ops.sliding_tile import WAN_TILE


from model_fakes import (
    AnimateWanModel, CameraWanModel, HumoWanModel, SCAILWanModel, VaceWanModel, WanModel, WanModel_S2V,
)



def wan_header(extra=(), dim=256, blocks=2, pre=""):
    s = {f"{pre}head.modulation": (1, 2, dim), f"{pre}patch_embedding.weight": (dim, 16, 1, 2, 2)}
    s.update({f"{pre}blocks.{i}.self_attn.q.weight": (dim, dim) for i in range(blocks)})
    s.update({f"{pre}{k}": (1,) for k in extra})
    return s


# variant -> (model object, the marker keys of its state dict)
VARIANTS = {
    "wan": (lambda: WanModel(), ("img_emb.proj.0.bias",)),
    "wan_refconv": (lambda: WanModel(ref_conv=True), ("ref_conv.weight",)),
    "wan_vace": (lambda: VaceWanModel(), ("vace_patch_embedding.weight", "vace_blocks.0.after_proj.weight")),
    "wan_camera": (lambda: CameraWanModel(), ("control_adapter.conv.weight",)),
    "wan_s2v": (lambda: WanModel_S2V(), ("casual_audio_encoder.encoder.final_linear.weight",)),
    "wan_humo": (lambda: HumoWanModel(), ("audio_proj.audio_proj_glob_1.layer.bias",)),
    "wan_animate": (lambda: AnimateWanModel(), ("face_adapter.fuser_blocks.0.k_norm.weight",)),
    "wan_scail": (lambda: SCAILWanModel(), ("patch_embedding_pose.weight",)),
}


def _key(spec):
    return (spec.family, spec.variant, spec.blocks, spec.heads, spec.embed_dim, spec.patch_size, spec.official_tile,
            spec.block_keys, spec.joint_text)


def test_every_variant_is_covered():
    assert set(VARIANTS) == set(wan.VARIANTS) == set(wan.TILES)
    assert set(wan.CLASSES.values()) <= set(wan.VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pre", ["", "model.diffusion_model.", "diffusion_model."])
def test_object_and_header_specs_agree(variant, pre):
    make, keys = VARIANTS[variant]
    obj = families.inspect(make())
    head = families.from_header(wan_header(keys, pre=pre))
    assert obj.variant == variant
    assert _key(obj) == _key(head)
    assert head.class_name == f"{obj.class_name} (file header)"
    # the family's own functions are what the registry and nodes.models run
    assert _key(wan.FAMILY.inspect(make())) == _key(models.inspect_model(make())) == _key(obj)
    assert _key(wan.FAMILY.from_header(wan_header(keys, pre=pre))) == _key(head)


def test_header_rules_follow_comfyui_detection_order():
    # a file with several marker keys is the first variant ComfyUI's detection checks for
    both = wan_header(("patch_embedding_pose.weight", "vace_patch_embedding.weight", "ref_conv.weight"))
    assert families.from_header(both).variant == "wan_vace"
    assert families.from_header(wan_header(dim=5120, blocks=40)).heads == 40
    assert families.from_header({"blocks.0.self_attn.q.weight": (1,)}) is None  # no head.modulation: not Wan


def test_registry():
    assert [f.name for f in families.FAMILIES][:2] == ["wan", "hunyuan"]
    assert families.get("wan") is wan.FAMILY
    assert families.family_of(VaceWanModel()) is wan.FAMILY
    assert families.family_of(type("MyWan", (WanModel,), {})()) is None  # exact class only
    assert families.supported_text() == models.SUPPORTED_TEXT
    assert models.SUPPORTED_TEXT.startswith(wan.SUPPORTED_TEXT + " and ")
    assert models.WAN_CLASSES == wan.CLASSES and models.OFFICIAL_ROUTERS["wan"] == wan.OFFICIAL_ROUTERS["wan"]
    assert models.VARIANT_FAMILY["wan_scail"] == "wan" and models.VARIANT_LABELS["wan_humo"] == "HuMo"
    assert models.ModelSpec("wan", 1, 1, 128, (1, 2, 2), WAN_TILE, (("double_block", 0),), "WanModel").variant == "wan"


def test_family_modules_import_nothing_from_comfyui():
    for path in pathlib.Path(families.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "comfy" or n.startswith(("comfy.", "comfy_")) or n in ("nodes", "folder_paths")
                           for n in names), f"{path.name} imports {names}"
