"""The /prompt-time router fit check on plain prompt dicts and tiny header-only files (no ComfyUI)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nodes.prompt_check import MARK, fit_errors, mark_prompt, marked_error, spec_from_shapes
from vorta_ops.router import RouterSet
from vorta_ops.router_io import save_router


def wan_file(path, dim=256, blocks=2, prefix=""):
    t = {f"{prefix}head.modulation": torch.zeros(1, 2, dim), f"{prefix}patch_embedding.weight": torch.zeros(dim, 16, 1, 2, 2)}
    for i in range(blocks):
        t[f"{prefix}blocks.{i}.self_attn.q.weight"] = torch.zeros(dim, 1)
    save_file(t, str(path))
    return str(path)


def hunyuan_file(path, hidden=256, double=2, single=3):
    t = {"img_in.proj.weight": torch.zeros(hidden, 16, 1, 2, 2),
         "txt_in.individual_token_refiner.blocks.0.norm1.weight": torch.zeros(hidden)}
    t.update({f"double_blocks.{i}.img_attn.qkv.weight": torch.zeros(1) for i in range(double)})
    t.update({f"single_blocks.{i}.linear1.weight": torch.zeros(1) for i in range(single)})
    save_file(t, str(path))
    return str(path)


def router_file(path, family="wan", blocks=2, heads=2, embed=256):
    save_router(RouterSet(family, torch.zeros(blocks, heads * 3, embed), torch.zeros(blocks, heads * 3)), path)
    return str(path)


PASSES = {"LoraLoaderModelOnly", "ModelSamplingSD3"}


def passes_model(cls, slot):
    return cls in PASSES and slot == 0


def prompt(model_link=("1", 0), router="r.safetensors", unet="m.safetensors", enabled=True, loader="UNETLoader"):
    key = "unet_name" if loader == "UNETLoader" else "ckpt_name"
    return {
        "1": {"class_type": loader, "inputs": {key: unet}},
        "2": {"class_type": "VortaRouterLoader", "inputs": {"router_name": router}},
        "3": {"class_type": "VortaApply", "inputs": {"model": list(model_link), "router": ["2", 0], "enabled": enabled,
                                                     "tile": "official"}},
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x"}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 5.0}},
        "6": {"class_type": "SomeMerge", "inputs": {"model1": ["1", 0]}},
    }


@pytest.fixture
def files(tmp_path):
    paths = {
        ("diffusion_models", "m.safetensors"): wan_file(tmp_path / "m.safetensors"),
        ("checkpoints", "ck.safetensors"): wan_file(tmp_path / "ck.safetensors", blocks=3, prefix="model.diffusion_model."),
        ("diffusion_models", "hy.safetensors"): hunyuan_file(tmp_path / "hy.safetensors"),
        ("vorta_routers", "r.safetensors"): router_file(tmp_path / "r.safetensors"),
        ("vorta_routers", "r3.safetensors"): router_file(tmp_path / "r3.safetensors", blocks=3),
        ("vorta_routers", "hy5.safetensors"): router_file(tmp_path / "hy5.safetensors", "hunyuan", blocks=5),
    }
    return lambda folder, name: paths.get((folder, name))


def test_spec_from_header_shapes(files):
    from nodes.prompt_check import file_shapes

    wan = spec_from_shapes(file_shapes(files("diffusion_models", "m.safetensors")))
    assert (wan.family, wan.blocks, wan.heads, wan.embed_dim, wan.patch_size) == ("wan", 2, 2, 256, (1, 2, 2))
    ck = spec_from_shapes(file_shapes(files("checkpoints", "ck.safetensors")))
    assert (ck.family, ck.blocks) == ("wan", 3)
    hy = spec_from_shapes(file_shapes(files("diffusion_models", "hy.safetensors")))
    assert (hy.family, hy.blocks, hy.heads, hy.embed_dim) == ("hunyuan", 5, 2, 256)
    assert spec_from_shapes({"x_embedder.proj.weight": (8, 4)}) is None


def test_fitting_router_gives_no_error(files):
    assert fit_errors(prompt(), passes_model, files) == {}
    assert fit_errors(prompt(unet="hy.safetensors", router="hy5.safetensors"), passes_model, files) == {}


def test_mismatch_found_directly_and_through_pass_through_nodes(files):
    for link in (("1", 0), ("4", 0), ("5", 0)):
        errs = fit_errors(prompt(link, router="r3.safetensors"), passes_model, files)
        assert list(errs) == ["3"] and "blocks: router 3, model 2" in errs["3"]
    errs = fit_errors(prompt(loader="CheckpointLoaderSimple", unet="ck.safetensors"), passes_model, files)
    assert "blocks: router 2, model 3" in errs["3"]
    errs = fit_errors(prompt(unet="hy.safetensors"), passes_model, files)  # a Wan router on HunyuanVideo
    assert "family: router wan, model hunyuan" in errs["3"]


def test_untraceable_or_disabled_is_left_alone(files):
    bad = "r3.safetensors"
    assert fit_errors(prompt(("6", 0), router=bad), passes_model, files) == {}  # a merge: not followed
    assert fit_errors(prompt(("4", 1), router=bad), passes_model, files) == {}  # another output slot
    assert fit_errors(prompt(router=bad, enabled=False), passes_model, files) == {}
    assert fit_errors(prompt(router=bad, unet="missing.safetensors"), passes_model, files) == {}
    assert fit_errors(prompt(router="missing.safetensors"), passes_model, files) == {}
    p = prompt(router=bad)
    p["1"]["inputs"]["unet_name"] = ["9", 0]  # a file name coming from a link
    assert fit_errors(p, passes_model, files) == {}


def test_mark_puts_the_message_where_validation_reads_it(files):
    data = {"prompt": prompt(router="r3.safetensors"), "client_id": "x"}
    out = mark_prompt(data, passes_model, files)
    tile = out["prompt"]["3"]["inputs"]["tile"]
    assert tile.startswith(MARK) and "blocks: router 3, model 2" in marked_error(tile)
    assert marked_error("official") is None
    ok = mark_prompt({"prompt": prompt()}, passes_model, files)
    assert ok["prompt"]["3"]["inputs"]["tile"] == "official"
    assert mark_prompt({"no prompt": 1}, passes_model, files) == {"no prompt": 1}


def test_gguf_model_file_is_read_like_comfyui_gguf_reads_it(files, tmp_path):
    """A Q8_0 GGUF of the Wan file (5D patch embedding flattened, shape kept in metadata): the same
    spec as the safetensors, and a UnetLoaderGGUF behind Apply is checked at /prompt too."""
    pytest.importorskip("gguf", reason="the gguf package (pip install gguf) reads GGUF headers")
    import comfy_harness
    from nodes.prompt_check import file_shapes

    src = files("diffusion_models", "m.safetensors")
    gg = str(comfy_harness.to_gguf(src, tmp_path / "m.gguf"))
    assert spec_from_shapes(file_shapes(gg)) == spec_from_shapes(file_shapes(src))

    def resolve(folder, name):
        return gg if (folder, name) == ("unet_gguf", "m.gguf") else files(folder, name)

    p = prompt(router="r3.safetensors", unet="m.gguf")
    p["1"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "m.gguf"}}
    assert "blocks: router 3, model 2" in fit_errors(p, passes_model, resolve)["3"]
    p["2"]["inputs"]["router_name"] = "r.safetensors"
    assert fit_errors(p, passes_model, resolve) == {}


def test_option_errors_are_marked_once_per_node(files):
    """Wrong options are found when the prompt is posted and handed to Apply's validation as one
    message (ComfyUI would repeat a message once per validated input)."""
    from nodes.patch import options_error

    data = {"prompt": prompt()}
    apply_id = next(k for k, v in data["prompt"].items() if v["class_type"] == "VortaApply")
    data["prompt"][apply_id]["inputs"].update(window="2,3,3", tile="official", bucket="2,3,2", keep_ratio=0.5,
                                              similarity="auto", dense_start_percent=0.0, dense_end_percent=0.0, dense_blocks="")
    out = mark_prompt(data, passes_model, files, options_error)
    assert "window must be odd" in marked_error(out["prompt"][apply_id]["inputs"]["tile"])
    fine = {"prompt": prompt()}
    fine["prompt"][apply_id]["inputs"].update(window="3,3,3", tile="4,8,8", bucket="2,3,2", keep_ratio=0.5,
                                              similarity="auto", dense_start_percent=60.0, dense_end_percent=50.0, dense_blocks="")
    msg = marked_error(mark_prompt(fine, passes_model, files, options_error)["prompt"][apply_id]["inputs"]["tile"])
    assert msg == "dense_start_percent + dense_end_percent is 110.0, at most 100"
    linked = {"prompt": prompt()}
    linked["prompt"][apply_id]["inputs"].update(window=["99", 0])  # from a link: left to execute
    assert options_error(linked["prompt"][apply_id]["inputs"]) is None
