"""The shared real-ComfyUI fixture (one server per ComfyUI tree under test, session-wide, loaded
by conftest's pytest_plugins) and prompt helpers of the integration tests."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as h
from vorta_ops.router import CORESET, FULL, SLIDING, RouterSet
from vorta_ops.router_io import save_router

WAN_DIM, WAN_BLOCKS, WAN_HEADS = 256, 2, 2


def biased_router(family, blocks, heads, embed, table, weight_scale=0.0):
    """A router whose argmax is `table` (blocks x heads) at every timestep."""
    b = torch.zeros(blocks, heads, 3)
    for i in range(blocks):
        for j in range(heads):
            b[i, j, table[i][j]] = 20.0
    w = torch.randn(blocks, heads * 3, embed, generator=torch.Generator().manual_seed(1)) * weight_scale
    return RouterSet(family, w, b.reshape(blocks, heads * 3))


MIX = [[CORESET, SLIDING], [SLIDING, CORESET]]


def write_tiny_lora(path, dim, blocks, rank=4):
    """A rank-4 LoRA on every self-attention projection of the tiny Wan (ComfyUI's
    diffusion_model.<key>.lora_up/lora_down naming)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    sd = {}
    for b in range(blocks):
        for proj in ("q", "k", "v", "o"):
            key = f"diffusion_model.blocks.{b}.self_attn.{proj}"
            sd[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.3
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.3
    save_file(sd, str(path))


TREES = h.comfy_trees() or [("none", None)]


@pytest.fixture(scope="session", params=TREES, ids=[v for v, _ in TREES])
def server(request, tmp_path_factory):
    """One real ComfyUI server per ComfyUI tree under test (COMFYUI_PATHS), each with the same
    tiny models and routers."""
    version, tree = request.param
    base = tmp_path_factory.mktemp(f"comfy-{version}")
    # graph breaks and recompiles under TorchCompileModel are counted from the server log
    srv = h.ComfyServer(base, tree, env={"TORCH_LOGS": "graph_breaks,recompiles"})
    srv.version = version
    srv.prepare()
    models = base / "models/diffusion_models"
    for kind, name, dim, layers in (("wan", "tiny_wan", WAN_DIM, WAN_BLOCKS), ("hunyuan", "tiny_hunyuan", 256, 1),
                                    ("wan22_5b", "tiny_wan22_5b", WAN_DIM, WAN_BLOCKS), ("wan_i2v", "tiny_wan_i2v", WAN_DIM, WAN_BLOCKS)):
        h.make_tiny_model(kind, models / f"{name}.safetensors", dim, layers, tree=tree)
    routers = base / "models/vorta_routers"
    save_router(biased_router("wan", 2, 2, WAN_DIM, MIX), routers / "wan_mix.safetensors")
    save_router(biased_router("wan", 2, 2, WAN_DIM, [[FULL, FULL], [FULL, FULL]]), routers / "wan_full.safetensors")
    save_router(biased_router("wan", 3, 2, WAN_DIM, [[FULL, FULL]] * 3), routers / "wan_3blocks.safetensors")
    # a real (weight-driven) router: decisions change with the timestep
    save_router(biased_router("wan", 2, 2, WAN_DIM, MIX, weight_scale=0.3), routers / "wan_live.safetensors")
    save_router(biased_router("hunyuan", 2, 2, 256, MIX), routers / "hy_mix.safetensors")
    save_router(biased_router("wan", 2, 2, WAN_DIM, [[SLIDING, CORESET], [CORESET, SLIDING]]), routers / "wan_swapped.safetensors")
    save_router(biased_router("wan", 2, 2, WAN_DIM, [[FULL, FULL], [CORESET, SLIDING]]), routers / "wan_half_full.safetensors")
    if h.gguf_skip_reason() is None:
        h.to_gguf(models / "tiny_wan.safetensors", models / "tiny_wan_q8.gguf")
    write_tiny_lora(base / "models/loras/tiny_wan_lora.safetensors", WAN_DIM, WAN_BLOCKS)
    srv.start()
    yield srv
    srv.stop()


def training_free_apply(p, tile="1,2,3", window="1,3,1", **router):
    """Put the Training-Free Router (node 2; tau 10: every sparse branch passes on random weights,
    whose heads are all diffuse, so routing shows) and VORTA Apply (node 3) between a prompt's loader
    (node 1) and its sampler (node 7). ``router``: the router node's inputs to change."""
    p["2"] = {"class_type": "VortaTrainingFreeRouter", "inputs": {"tau": 10.0, "warmup_percent": 0.0, "bins": 2,
                                                                   "rows": 16, "seed": 0, **router}}
    p["3"] = {"class_type": "VortaApply", "inputs": {
        "model": ["1", 0], "router": ["2", 0], "enabled": True, "tile": tile, "window": window, "bucket": "2,2,2",
        "keep_ratio": 0.5, "similarity": "auto", "dense_start_percent": 0.0, "dense_end_percent": 0.0, "dense_blocks": ""}}
    p["7"]["inputs"]["model"] = ["3", 0]
    return p


def wan_prompt(router=None, tile="1,2,2", window="1,1,1", prefix="out", override_file=None, extra=None):
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}},
        "4": {"class_type": "VortaTestConditioning", "inputs": {"seed": 1, "tokens": 8, "pooled": False}},
        "5": {"class_type": "VortaTestConditioning", "inputs": {"seed": 2, "tokens": 8, "pooled": False}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 96, "height": 64, "length": 9, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
                                                    "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0],
                                                    "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if override_file:
        p["20"] = {"class_type": "VortaTestOverride", "inputs": {"model": model, "counter_file": str(override_file)}}
        model = ["20", 0]
    if router:
        p["2"] = {"class_type": "VortaRouterLoader", "inputs": {"router_name": router}}
        p["3"] = {"class_type": "VortaApply", "inputs": {
            "model": model, "router": ["2", 0], "enabled": True, "tile": tile, "window": window, "bucket": "2,2,2",
            "keep_ratio": 0.5, "similarity": "auto", "dense_start_percent": 0.0, "dense_end_percent": 0.0, "dense_blocks": ""}}
        p["9"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "last run", "steps": 3,
                                                                  "scheduler": "simple", "latent": ["7", 0]}}
        p["10"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "predicted", "steps": 3,
                                                                   "scheduler": "simple"}}
        model = ["3", 0]
    p["7"]["inputs"]["model"] = model
    p.update(extra or {})
    return p


def hunyuan_prompt(tokens=7, seed=0, prefix="hy", steps=2):
    """Tiny HunyuanVideo -> VORTA Apply (hy_mix) -> KSampler -> SaveLatent, with the executed gate
    view as node 9. 64x64x9 frames: a 3x4x4 = 48-token video grid."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_hunyuan.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "VortaRouterLoader", "inputs": {"router_name": "hy_mix.safetensors"}},
        "3": {"class_type": "VortaApply", "inputs": {
            "model": ["1", 0], "router": ["2", 0], "enabled": True, "tile": "1,2,2", "window": "1,1,1", "bucket": "2,2,2",
            "keep_ratio": 0.5, "similarity": "auto", "dense_start_percent": 0.0, "dense_end_percent": 0.0, "dense_blocks": ""}},
        "4": {"class_type": "VortaTestConditioning", "inputs": {"seed": 1, "tokens": tokens, "pooled": True}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                                                    "scheduler": "simple", "positive": ["4", 0], "negative": ["4", 0],
                                                    "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
        "9": {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "last run", "steps": steps,
                                                              "scheduler": "simple", "latent": ["7", 0]}},
    }


def latent_of(server, entry, node="8"):
    files = list((server.base / "output").glob(f"{entry['outputs'][node]['latents'][0]['filename']}"))
    return load_file(str(files[0]))["latent_tensor"]


def saved_latent(server, prefix):
    (f,) = sorted((server.base / "output").glob(f"{prefix}_[0-9]*.latent"))
    return load_file(str(f))["latent_tensor"]


def gates(entry, node):
    return entry["outputs"][node]["vorta_gates"][0]


