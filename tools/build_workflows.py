"""Writes workflows/*.json (ComfyUI frontend "UI" format) from the compact graphs below.

    python tools/build_workflows.py

Each graph: the core nodes users start from (ComfyUI's own video templates), plus VORTA Router
Loader -> VORTA Apply on every diffusion model, a VORTA Gate Visualizer, and a Note saying which
files go where. tests/test_comfyui_integration.py converts every file and validates it against a
real server's /object_info.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

# output types of the node types used below (inputs are declared per use)
OUTPUTS = {
    "UNETLoader": [("MODEL", "MODEL")], "CLIPLoader": [("CLIP", "CLIP")], "DualCLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")], "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "ModelSamplingSD3": [("MODEL", "MODEL")], "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")], "KSamplerAdvanced": [("LATENT", "LATENT")], "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveAnimatedWEBP": [], "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "VortaRouterLoader": [("router", "VORTA_ROUTER")], "VortaApply": [("MODEL", "MODEL")],
    "VortaTrainingFreeRouter": [("router", "VORTA_ROUTER")], "Wan22ImageToVideoLatent": [("LATENT", "LATENT")],
    "VortaGateVisualizer": [("image", "IMAGE"), ("summary", "STRING")], "Note": [],
    "VortaFidelityCheck": [("routed_latent", "LATENT"), ("report", "STRING"), ("plot", "IMAGE")], "PreviewImage": [],
    "VortaSaveMeasuredRouter": [("path", "STRING")],
}
# link inputs (name, type) per node type, in schema order
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")], "ModelSamplingSD3": [("model", "MODEL")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
    "KSamplerAdvanced": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")], "SaveAnimatedWEBP": [("images", "IMAGE")],
    "FluxGuidance": [("conditioning", "CONDITIONING")], "VortaApply": [("model", "MODEL"), ("router", "VORTA_ROUTER")],
    "VortaGateVisualizer": [("model", "MODEL"), ("router", "VORTA_ROUTER"), ("sigmas", "SIGMAS"), ("latent", "LATENT")],
    "Wan22ImageToVideoLatent": [("vae", "VAE"), ("start_image", "IMAGE")],
    "VortaFidelityCheck": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                           ("latent_image", "LATENT")],
    "PreviewImage": [("images", "IMAGE")], "VortaSaveMeasuredRouter": [("model", "MODEL"), ("latent", "LATENT")],
}
TITLE_W = 320
OPTIONAL_UNLINKED = {("VortaGateVisualizer", "router"), ("VortaGateVisualizer", "sigmas"), ("Wan22ImageToVideoLatent", "start_image")}

# VortaApply widgets: enabled, tile, window, bucket, keep_ratio, similarity, dense start %, dense end %, dense blocks,
# tau_sparse, precision
APPLY_DEFAULT = [True, "official", "3,3,3", "2,3,2", 0.5, "auto", 0.0, 0.0, "", 0.3, "bf16"]
GATE_LAST_RUN = ["last run", 20, "simple"]


def build(name: str, nodes: list[dict], note: str) -> dict:
    ids = {n["key"]: i + 1 for i, n in enumerate(nodes)}
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for n in nodes:
        for inp, (src, slot) in n.get("links", {}).items():
            lid = len(links) + 1
            t = OUTPUTS[next(m["type"] for m in nodes if m["key"] == src)][slot][1]
            links.append([lid, ids[src], slot, ids[n["key"]], inp, t])
            out_links.setdefault((ids[src], slot), []).append(lid)
    nodes = nodes + [{"key": "note", "type": "Note", "pos": [20, -260], "size": [520, 220], "widgets": [note]}]
    ids["note"] = len(ids) + 1
    for order, n in enumerate(nodes):
        nid = ids[n["key"]]
        inputs = []
        for slot, (iname, itype) in enumerate(INPUTS.get(n["type"], [])):
            lk = next((l for l in links if l[3] == nid and l[4] == iname), None)
            if lk is None and (n["type"], iname) in OPTIONAL_UNLINKED:
                inputs.append({"name": iname, "type": itype, "link": None, "shape": 7})  # optional, unconnected
                continue
            inputs.append({"name": iname, "type": itype, "link": lk[0] if lk else None})
        outputs = [
            {"name": oname, "type": otype, "links": out_links.get((nid, s), []), "slot_index": s}
            for s, (oname, otype) in enumerate(OUTPUTS[n["type"]])
        ]
        ui_nodes.append({
            "id": nid, "type": n["type"], "pos": n["pos"], "size": n.get("size", [TITLE_W, 130]), "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": n["type"]}, "widgets_values": n.get("widgets", []),
            **({"title": n["title"]} if "title" in n else {}),
        })
    for l in links:  # the UI format stores the target slot index, not the input name
        target = next(u for u in ui_nodes if u["id"] == l[3])
        l[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == l[4])
    return {
        "last_node_id": max(u["id"] for u in ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
        "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [80, 320]}, "vorta_workflow": name}, "version": 0.4,
    }


NEG = "static, blurry, low quality, jpeg artifacts, deformed, watermark, text"
POS = "a red fox trotting through fresh snow in a birch forest at sunrise, cinematic, detailed fur"


def wan21_t2v_14b():
    nodes = [
        {"key": "unet", "type": "UNETLoader", "pos": [20, 20], "widgets": ["wan2.1_t2v_14B_bf16.safetensors", "default"]},
        {"key": "clip", "type": "CLIPLoader", "pos": [20, 180], "widgets": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]},
        {"key": "vae", "type": "VAELoader", "pos": [20, 340], "widgets": ["wan_2.1_vae.safetensors"]},
        {"key": "router", "type": "VortaRouterLoader", "pos": [20, 460], "widgets": ["wan-14B_router.safetensors"]},
        {"key": "shift", "type": "ModelSamplingSD3", "pos": [380, 20], "widgets": [5.0], "links": {"model": ("unet", 0)}},
        {"key": "vorta", "type": "VortaApply", "pos": [380, 160], "size": [320, 300], "widgets": APPLY_DEFAULT,
         "links": {"model": ("shift", 0), "router": ("router", 0)}},
        {"key": "pos", "type": "CLIPTextEncode", "pos": [740, 20], "size": [400, 160], "widgets": [POS], "links": {"clip": ("clip", 0)}},
        {"key": "neg", "type": "CLIPTextEncode", "pos": [740, 220], "size": [400, 160], "widgets": [NEG], "links": {"clip": ("clip", 0)}},
        # 77 frames at 1280x720 -> latent grid (20, 45, 80): the official VORTA benchmark size
        {"key": "latent", "type": "EmptyHunyuanLatentVideo", "pos": [740, 420], "widgets": [1280, 720, 77, 1]},
        {"key": "ks", "type": "KSampler", "pos": [1180, 20], "size": [320, 270], "widgets": [1234, "fixed", 50, 5.0, "uni_pc", "simple", 1.0],
         "links": {"model": ("vorta", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0)}},
        {"key": "dec", "type": "VAEDecode", "pos": [1540, 20], "links": {"samples": ("ks", 0), "vae": ("vae", 0)}},
        {"key": "save", "type": "SaveAnimatedWEBP", "pos": [1540, 140], "size": [400, 420], "widgets": ["vorta/wan21_t2v_14b", 15.0, False, 90, "default"],
         "links": {"images": ("dec", 0)}},
        {"key": "gate", "type": "VortaGateVisualizer", "pos": [1180, 340], "size": [320, 300], "widgets": ["last run", 50, "simple"],
         "links": {"model": ("vorta", 0), "latent": ("ks", 0)}},
    ]
    note = ("VORTA on Wan 2.1 T2V 14B.\n\nFiles:\n- models/diffusion_models/wan2.1_t2v_14B_bf16.safetensors (or fp8)\n"
            "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n- models/vae/wan_2.1_vae.safetensors\n"
            "- models/vorta_routers/wan-14B_router.safetensors: the official router from Hugging Face Wenhao-Sun/VORTA, "
            "wan-14B/train/ckpt/step-000100/router.pt (put the .pt there as is, or convert: python -m vorta_ops convert router.pt wan-14B_router.safetensors).\n\n"
            "tile 'official' = (5,9,8), the tiles the router was trained with; 'aligned' = (4,8,8) is faster. "
            "The gate visualizer shows what each block and head ran at each step.")
    return build("wan21_t2v_14b", nodes, note)


def wan22_a14b():
    common_adv = ["enable", 1234, "fixed", 20, 3.5, "euler", "simple"]
    nodes = [
        {"key": "hi", "type": "UNETLoader", "pos": [20, 20], "widgets": ["wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "default"]},
        {"key": "lo", "type": "UNETLoader", "pos": [20, 180], "widgets": ["wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "default"]},
        {"key": "clip", "type": "CLIPLoader", "pos": [20, 340], "widgets": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]},
        {"key": "vae", "type": "VAELoader", "pos": [20, 500], "widgets": ["wan_2.1_vae.safetensors"]},
        {"key": "r_hi", "type": "VortaRouterLoader", "pos": [20, 620], "title": "VORTA Router (high-noise expert)", "widgets": ["wan22_high_noise_router.safetensors"]},
        {"key": "r_lo", "type": "VortaRouterLoader", "pos": [20, 740], "title": "VORTA Router (low-noise expert)", "widgets": ["wan22_low_noise_router.safetensors"]},
        {"key": "s_hi", "type": "ModelSamplingSD3", "pos": [380, 20], "widgets": [8.0], "links": {"model": ("hi", 0)}},
        {"key": "s_lo", "type": "ModelSamplingSD3", "pos": [380, 160], "widgets": [8.0], "links": {"model": ("lo", 0)}},
        {"key": "v_hi", "type": "VortaApply", "pos": [380, 300], "size": [320, 300], "title": "VORTA Apply (high noise)", "widgets": APPLY_DEFAULT,
         "links": {"model": ("s_hi", 0), "router": ("r_hi", 0)}},
        {"key": "v_lo", "type": "VortaApply", "pos": [380, 640], "size": [320, 300], "title": "VORTA Apply (low noise)", "widgets": APPLY_DEFAULT,
         "links": {"model": ("s_lo", 0), "router": ("r_lo", 0)}},
        {"key": "pos", "type": "CLIPTextEncode", "pos": [740, 20], "size": [400, 160], "widgets": [POS], "links": {"clip": ("clip", 0)}},
        {"key": "neg", "type": "CLIPTextEncode", "pos": [740, 220], "size": [400, 160], "widgets": [NEG], "links": {"clip": ("clip", 0)}},
        {"key": "latent", "type": "EmptyHunyuanLatentVideo", "pos": [740, 420], "widgets": [1280, 720, 77, 1]},
        {"key": "k1", "type": "KSamplerAdvanced", "pos": [1180, 20], "size": [320, 330], "title": "KSampler (high noise, steps 0-10)",
         "widgets": common_adv + [0, 10, "enable"],
         "links": {"model": ("v_hi", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0)}},
        {"key": "k2", "type": "KSamplerAdvanced", "pos": [1180, 400], "size": [320, 330], "title": "KSampler (low noise, steps 10-20)",
         "widgets": ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
         "links": {"model": ("v_lo", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("k1", 0)}},
        {"key": "dec", "type": "VAEDecode", "pos": [1540, 20], "links": {"samples": ("k2", 0), "vae": ("vae", 0)}},
        {"key": "save", "type": "SaveAnimatedWEBP", "pos": [1540, 140], "size": [400, 420], "widgets": ["vorta/wan22_a14b", 16.0, False, 90, "default"],
         "links": {"images": ("dec", 0)}},
        {"key": "g_hi", "type": "VortaGateVisualizer", "pos": [1980, 20], "size": [320, 300], "title": "Gates (high noise)",
         "widgets": GATE_LAST_RUN, "links": {"model": ("v_hi", 0), "latent": ("k1", 0)}},
        {"key": "g_lo", "type": "VortaGateVisualizer", "pos": [2340, 20], "size": [320, 300], "title": "Gates (low noise)",
         "widgets": GATE_LAST_RUN, "links": {"model": ("v_lo", 0), "latent": ("k2", 0)}},
    ]
    note = ("VORTA on Wan 2.2 T2V A14B: each expert is its own MODEL and takes its own router.\n\nFiles:\n"
            "- models/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors and ..._low_noise_...\n"
            "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors, models/vae/wan_2.1_vae.safetensors\n"
            "- models/vorta_routers/: one router per expert. No official Wan 2.2 routers exist yet; the official wan-14B "
            "router (Hugging Face Wenhao-Sun/VORTA) has the right shape (40 blocks x 40 heads, dim 5120) and loads for both, "
            "but was trained on Wan 2.1: check quality, or use dense_start_percent to keep early steps dense.")
    return build("wan22_a14b", nodes, note)


def hunyuan_t2v():
    nodes = [
        {"key": "unet", "type": "UNETLoader", "pos": [20, 20], "widgets": ["hunyuan_video_t2v_720p_bf16.safetensors", "default"]},
        {"key": "clip", "type": "DualCLIPLoader", "pos": [20, 180], "widgets": ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"]},
        {"key": "vae", "type": "VAELoader", "pos": [20, 360], "widgets": ["hunyuan_video_vae_bf16.safetensors"]},
        {"key": "router", "type": "VortaRouterLoader", "pos": [20, 480], "widgets": ["hunyuan_router.safetensors"]},
        {"key": "shift", "type": "ModelSamplingSD3", "pos": [380, 20], "widgets": [5.0], "links": {"model": ("unet", 0)}},
        {"key": "vorta", "type": "VortaApply", "pos": [380, 160], "size": [320, 300], "widgets": APPLY_DEFAULT,
         "links": {"model": ("shift", 0), "router": ("router", 0)}},
        {"key": "pos", "type": "CLIPTextEncode", "pos": [740, 20], "size": [400, 160], "widgets": [POS], "links": {"clip": ("clip", 0)}},
        {"key": "guid", "type": "FluxGuidance", "pos": [740, 220], "widgets": [6.0], "links": {"conditioning": ("pos", 0)}},
        # 117 frames at 1280x720 -> latent grid (30, 45, 80): the official VORTA benchmark size
        {"key": "latent", "type": "EmptyHunyuanLatentVideo", "pos": [740, 360], "widgets": [1280, 720, 117, 1]},
        {"key": "ks", "type": "KSampler", "pos": [1180, 20], "size": [320, 270], "widgets": [1234, "fixed", 50, 1.0, "euler", "simple", 1.0],
         "links": {"model": ("vorta", 0), "positive": ("guid", 0), "negative": ("guid", 0), "latent_image": ("latent", 0)}},
        {"key": "dec", "type": "VAEDecode", "pos": [1540, 20], "links": {"samples": ("ks", 0), "vae": ("vae", 0)}},
        {"key": "save", "type": "SaveAnimatedWEBP", "pos": [1540, 140], "size": [400, 420], "widgets": ["vorta/hunyuan_t2v", 24.0, False, 90, "default"],
         "links": {"images": ("dec", 0)}},
        {"key": "gate", "type": "VortaGateVisualizer", "pos": [1180, 340], "size": [320, 300], "widgets": ["last run", 50, "simple"],
         "links": {"model": ("vorta", 0), "latent": ("ks", 0)}},
    ]
    note = ("VORTA on HunyuanVideo T2V (video tokens first, text after).\n\nFiles:\n"
            "- models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors\n"
            "- models/text_encoders/clip_l.safetensors and llava_llama3_fp8_scaled.safetensors\n"
            "- models/vae/hunyuan_video_vae_bf16.safetensors\n"
            "- models/vorta_routers/hunyuan_router.safetensors: the official router from Hugging Face Wenhao-Sun/VORTA, "
            "hunyuan/train/ckpt/step-000100/router.pt (the .pt loads as is, or convert it with python -m vorta_ops convert).\n\n"
            "tile 'official' = (6,9,8) for HunyuanVideo; core-set similarity 'auto' selects q and k separately, as the official code does.")
    return build("hunyuan_t2v", nodes, note)


def _wan22_5b_nodes():
    return [
        {"key": "unet", "type": "UNETLoader", "pos": [20, 20], "widgets": ["wan2.2_ti2v_5B_fp16.safetensors", "default"]},
        {"key": "clip", "type": "CLIPLoader", "pos": [20, 180], "widgets": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]},
        {"key": "vae", "type": "VAELoader", "pos": [20, 340], "widgets": ["wan2.2_vae.safetensors"]},
        # tau, warm-up %, spans, sampled rows, seed
        {"key": "router", "type": "VortaTrainingFreeRouter", "pos": [20, 460], "size": [320, 200], "widgets": [0.3, 10.0, 4, 256, 0]},
        {"key": "vorta", "type": "VortaApply", "pos": [380, 20], "size": [320, 300], "widgets": APPLY_DEFAULT,
         "links": {"model": ("unet", 0), "router": ("router", 0)}},
        {"key": "shift", "type": "ModelSamplingSD3", "pos": [380, 360], "widgets": [8.0], "links": {"model": ("vorta", 0)}},
        {"key": "pos", "type": "CLIPTextEncode", "pos": [740, 20], "size": [400, 160], "widgets": [POS], "links": {"clip": ("clip", 0)}},
        {"key": "neg", "type": "CLIPTextEncode", "pos": [740, 220], "size": [400, 160], "widgets": [NEG], "links": {"clip": ("clip", 0)}},
        {"key": "latent", "type": "Wan22ImageToVideoLatent", "pos": [740, 420], "widgets": [1280, 704, 121, 1],
         "links": {"vae": ("vae", 0)}},
        {"key": "ks", "type": "KSampler", "pos": [1180, 20], "size": [320, 270], "widgets": [1234, "fixed", 30, 5.0, "uni_pc", "simple", 1.0],
         "links": {"model": ("shift", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("latent", 0)}},
        {"key": "dec", "type": "VAEDecode", "pos": [1540, 20], "links": {"samples": ("ks", 0), "vae": ("vae", 0)}},
        {"key": "save", "type": "SaveAnimatedWEBP", "pos": [1540, 140], "size": [400, 420], "widgets": ["vorta/wan22_5b", 24.0, False, 90, "default"],
         "links": {"images": ("dec", 0)}},
        {"key": "gate", "type": "VortaGateVisualizer", "pos": [1180, 340], "size": [320, 300], "widgets": ["last run", 30, "simple"],
         "links": {"model": ("vorta", 0), "latent": ("ks", 0)}},
    ]


FILES_5B = ("Files:\n- models/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors\n"
            "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n- models/vae/wan2.2_vae.safetensors")


def wan22_5b_training_free():
    note = ("VORTA on Wan 2.2 TI2V 5B with the Training-Free Router: no router file. At the start of each of 4 spans of the "
            "denoising (after a 10% dense warm-up) it measures, per block and head, how far each sparse branch lands from "
            "full attention on 256 sampled query rows, routes that step by its own measurement, and the rest of the span by "
            "it: each head to the cheapest branch within tau. The measurements are kept in models/vorta_routers/tables: a "
            "second run of the same model, size and settings measures nothing.\n\n" + FILES_5B + "\n\nVORTA Apply may sit "
            "before or after ModelSamplingSD3, LoRAs and other patches. tau 0.3 is a starting point measured on synthetic "
            "heads: lower it if quality drops, raise it for speed; the gate visualizer shows what ran.")
    return build("wan22_5b_training_free", _wan22_5b_nodes(), note)


def wan22_5b_fidelity_check():
    nodes = _wan22_5b_nodes()
    ks = next(n for n in nodes if n["key"] == "ks")
    # seed, control, steps, cfg, sampler, scheduler, denoise, steps_to_check
    ks.update(type="VortaFidelityCheck", size=[320, 330], widgets=[1234, "fixed", 30, 5.0, "uni_pc", "simple", 1.0, 8])
    nodes += [
        {"key": "plot", "type": "PreviewImage", "pos": [1540, 600], "size": [320, 260], "links": {"images": ("ks", 2)}},
        {"key": "saverouter", "type": "VortaSaveMeasuredRouter", "pos": [1180, 680], "size": [320, 110],
         "widgets": ["wan22_5b_measured"], "links": {"model": ("vorta", 0), "latent": ("ks", 0)}},
    ]
    note = ("Wan 2.2 TI2V 5B with the Training-Free Router (no router file) and VORTA Fidelity Check in place of the "
            "KSampler: it samples the graph dense and routed on the same seed and reports, per step, how far the routed "
            "denoised prediction is from the dense one (relative L2, cosine) and the final latent's PSNR, with a plot, so you "
            "see on your own prompt and weights what the speed costs. steps_to_check 8 stops the dense pass after 8 steps "
            "(0 = all). The routed latent goes on to the VAE as a KSampler's would. VORTA Save Measured Router then writes "
            "what the training-free router measured as a router file (models/vorta_routers) that the VORTA Router Loader "
            "loads with no measuring.\n\n" + FILES_5B)
    return build("wan22_5b_fidelity_check", nodes, note)


def main():
    OUT.mkdir(exist_ok=True)
    for fn, name in ((wan21_t2v_14b, "vorta_wan21_t2v_14b.json"), (wan22_a14b, "vorta_wan22_a14b_t2v.json"),
                     (hunyuan_t2v, "vorta_hunyuan_video_t2v.json"),
                     (wan22_5b_training_free, "vorta_wan22_5b_training_free.json"),
                     (wan22_5b_fidelity_check, "vorta_wan22_5b_fidelity_check.json")):
        (OUT / name).write_text(json.dumps(fn(), indent=1) + "\n")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
