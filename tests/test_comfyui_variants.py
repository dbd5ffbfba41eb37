"""Every ComfyUI video model variant VORTA knows, built tiny (random weights, 2 heads of 128, 1-2
blocks) from each ComfyUI tree's own classes, run once with a recording attention override and
"dit" block patches like the pack's: nodes.models' verdict per variant (routes / refused with the
supported list) and, for routed ones, its token layout against what the real model does; and the
/prompt-time header rules on each model's own state dict against its object spec.

Layout check, per routed variant: every self-attention call inside a main-block patch has length
prefix + prod(grid) + suffix with split_tokens' (prefix, suffix), which match the extra tokens the
inputs add (read off ComfyUI's code); and the video tokens really sit at [prefix, prefix + grid):
between two forwards that differ only in the video latent, exactly those rows of the first block's
q change (q rows are per-token projections, before any mixing).
"""
from __future__ import annotations

import functools
import json
import math
import subprocess

import pytest

import comfy_harness as h

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(h.skip_reason() is not None, reason=h.skip_reason() or "")]

TREES = h.comfy_trees()

# routed variants: probe name -> (class, variant, grid, (prefix, suffix)); HunyuanVideo's (prefix,
# suffix) depends on the tree's joint-attention order (text after the video, or before).
# Inputs (see _PROBE): video latent 3 x 8 x 8 (Wan patch 1x2x2 -> 3 x 4 x 4 tokens); text 6 tokens.
ROUTED = {
    "wan_t2v": ("WanModel", "wan", (4, 4, 4), (0, 0)),  # + 1 time_dim_concat frame, in the grid
    "wan_i2v": ("WanModel", "wan", (3, 4, 4), (0, 0)),
    "wan22_5b": ("WanModel", "wan", (3, 4, 4), (0, 0)),
    "wan_refconv": ("WanModel", "wan_refconv", (3, 4, 4), (16, 0)),  # ref_conv image 8x8 -> 16 tokens first
    "wan_vace": ("VaceWanModel", "wan_vace", (3, 4, 4), (0, 0)),
    "wan_camera": ("CameraWanModel", "wan_camera", (3, 4, 4), (0, 0)),
    "wan_s2v": ("WanModel_S2V", "wan_s2v", (3, 4, 4), (0, 40)),  # ref 1x4x4 + motion 16 + 4 + 4 after
    "wan_humo": ("HumoWanModel", "wan_humo", (3, 4, 4), (0, 16)),  # ref frame 1x4x4 after
    "wan_animate": ("AnimateWanModel", "wan_animate", (3, 4, 4), (0, 0)),
    "wan_scail": ("SCAILWanModel", "wan_scail", (4, 4, 4), (0, 12)),  # ref frame in the grid; pose 3x2x2 after
    "hunyuan_video": ("HunyuanVideo", "hunyuan_video", (3, 4, 4), {"after": (16, 6), "before": (22, 0)}),
    "hunyuan_video_single": ("HunyuanVideo", "hunyuan_video", (3, 4, 4), {"after": (16, 6), "before": (22, 0)}),
    "hunyuan_video_1.5": ("HunyuanVideo", "hunyuan_video_1.5", (3, 4, 4), (15, 0)),  # vision 5 + byt5 4 + text 6 first
}
REFUSED = {
    "wan_subclass": "a subclass of WanModel",
    "hunyuan_image_refiner": "HunyuanImage 2.1 refiner",
    "hunyuan_image_2.1": "2D patch",
}
# the tree's class for each probe name (a variant is skipped only where its class is missing)
NEW_CLASSES = {"wan_scail": "SCAILWanModel", "hunyuan_video_1.5": "HunyuanVideo 1.5 config (vision_in_dim)"}


@functools.lru_cache(maxsize=None)
def probe(tree: str) -> dict:
    res = subprocess.run(
        [h.comfy_python(), "-c", _PROBE, str(h.ROOT), *ROUTED, *REFUSED],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )
    line = [l for l in res.stdout.splitlines() if l.startswith("PROBE-JSON ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"probe failed in {tree}:\n{res.stderr[-4000:]}")
    return json.loads(line[0][len("PROBE-JSON "):])


def _result(tree, name):
    r = probe(str(tree))[name]
    if r["status"] == "skip":  # a class / config this (older) ComfyUI lacks: conftest's strict mode lets it through
        pytest.skip(f"not applicable: {name}: {r['reason']}")
    assert r["status"] != "error", r.get("trace")
    return r


TREE_IDS = [v for v, _ in TREES] or ["no-tree"]
TREE_PARAMS = [p for _, p in TREES] or [None]


@pytest.mark.parametrize("tree", TREE_PARAMS, ids=TREE_IDS)
@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_variants_name_what_is_supported(tree, name):
    r = _result(tree, name)
    assert r["status"] == "refused", r
    msg = r["message"]
    assert REFUSED[name] in msg and "supported: Wan 2.1 / 2.2" in msg
    for cls in ("VaceWanModel", "WanModel_S2V", "HumoWanModel", "AnimateWanModel", "SCAILWanModel", "HunyuanVideo 1.5"):
        assert cls in msg


@pytest.mark.parametrize("tree", TREE_PARAMS, ids=TREE_IDS)
@pytest.mark.parametrize("name", list(ROUTED))
def test_routed_variant_layout_matches_the_model(tree, name):
    r = _result(tree, name)
    cls, variant, grid, split = ROUTED[name]
    assert r["class"] == cls
    if name == "wan_s2v" and r["status"] == "refused":
        # ComfyUI 0.3.64: S2V's blocks get no transformer_options (neither the block patches nor the
        # attention), so no override could route them: the refusal must say so, and be true (2 blocks, 2 forwards)
        assert "transformer_options" in r["message"]
        assert r["no_options_patches"] == 2 * 2 and not [c for c in r["calls"] if c["same"]]
        return
    assert r["status"] == "routes", r.get("message")
    assert (r["variant"], r["family"], r["heads"], r["embed"]) == (variant, variant.split("_")[0], 2, 256)
    assert tuple(r["grid"]) == grid
    n = math.prod(grid)
    if isinstance(split, dict):
        split = split[r["joint_text"]]
    own = [c for c in r["calls"] if c["same"] and c["block"] is not None]
    main = [c for c in own if c["L"] >= n]
    assert len(main) == r["blocks"]  # one video self-attention per main block
    for c in main:
        assert tuple(c["split"]) == split and c["L"] == split[0] + n + split[1]
        if c["grid_sizes"] is not None:  # ComfyUI 0.19.3 sets it for some variants, inside the model
            assert tuple(c["grid_sizes"]) == grid
    for c in own:
        if c["L"] < n:  # e.g. HuMo's per-frame audio attention: same q/k shape, not video
            assert c["split"] is None and c["skip_reshape"]
    p = split[0]
    video = [[p, p + n]] if name != "hunyuan_video_single" else [[p - 16, p + n]]  # single block: ref rows mixed too
    assert r["video_rows"] == video
    # self-attention outside the main-block patches: text refiner (short), VACE blocks (video length,
    # with ComfyUI's block_index still naming the main block)
    outside = [c for c in r["calls"] if c["same"] and c["block"] is None]
    if name == "wan_vace":
        assert outside and all(c["L"] == n for c in outside)
        assert all(c["block_index"] == 0 for c in outside if c["block_index"] is not None)
    elif cls == "HunyuanVideo":
        assert outside and all(c["split"] is None for c in outside)
    else:
        assert not outside


@pytest.mark.parametrize("tree", TREE_PARAMS, ids=TREE_IDS)
@pytest.mark.parametrize("name", list(ROUTED) + list(REFUSED))
def test_header_spec_matches_the_model_spec(tree, name):
    """One detection path: the /prompt rules (families' from_header) on the real model's own
    state-dict header give the spec its model object gives, and nothing for the image models VORTA
    refuses."""
    r = _result(tree, name)
    head = r["header"]
    if name in ("hunyuan_image_refiner", "hunyuan_image_2.1"):
        assert head is None
        return
    if r["status"] == "refused":  # a subclass of WanModel / 0.3.64's S2V: a header cannot tell, Apply refuses at run
        assert head is not None and head["family"] == "wan"
        return
    assert head is not None, name
    got = {k: head[k] for k in ("family", "variant", "blocks", "heads", "embed", "patch", "tile", "block_keys")}
    want = {k: r[k] for k in ("family", "variant", "blocks", "heads", "embed", "patch", "tile", "block_keys")}
    assert got == want


@pytest.mark.parametrize("tree", TREE_PARAMS, ids=TREE_IDS)
def test_hunyuan_joint_order_follows_the_tree(tree):
    r = _result(tree, "hunyuan_video")
    src = (tree / "comfy/ldm/hunyuan_video/model.py").read_text()
    assert r["joint_text"] == ("after" if "flipped_img_txt=True" in src else "before")


def test_new_variants_exist_in_new_trees():
    """0.3.64 lacks SCAIL and HunyuanVideo 1.5; a tree that has them must not skip them."""
    for _, tree in TREES:
        text = (tree / "comfy/ldm/wan/model.py").read_text()
        r = probe(str(tree))
        if "class SCAILWanModel" in text:
            assert r["wan_scail"]["status"] == "routes"
        if "vision_in_dim" in (tree / "comfy/ldm/hunyuan_video/model.py").read_text():
            assert r["hunyuan_video_1.5"]["status"] == "routes"



# Run with cwd = a ComfyUI tree: argv = pack root, probe names. Prints PROBE-JSON {name: result}.
_PROBE = r'''
import importlib.util, inspect, json, math, sys, traceback
ROOT, VARIANTS = sys.argv[1], sys.argv[2:]
sys.argv = ["probe", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.ops
sys.path.append(ROOT)
# the pack's nodes/ as package "vorta_nodes" without running its __init__ (which registers ComfyUI
# nodes): its models module and the model-family registry it dispatches to
import types
_pkg = types.ModuleType("vorta_nodes")
_pkg.__path__ = [ROOT + "/nodes"]
sys.modules["vorta_nodes"] = _pkg
import importlib
VM = importlib.import_module("vorta_nodes.models")
VF = importlib.import_module("vorta_nodes.families")

ops = comfy.ops.disable_weight_init
torch.manual_seed(0)
D, HEADS, TXT = 256, 2, 32
R = lambda *s: torch.randn(*s) * 0.5


def init(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def wan_kw(**kw):
    base = dict(dim=D, ffn_dim=2 * D, num_heads=HEADS, num_layers=2, text_dim=TXT, freq_dim=256, in_dim=16, out_dim=16, operations=ops)
    base.update(kw)
    return base


def hy(**kw):
    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams
    fields = set(HunyuanVideoParams.__dataclass_fields__)
    base = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=TXT, hidden_size=D, mlp_ratio=2.0, num_heads=HEADS,
                depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True,
                guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    base.update(kw)
    missing = {k for k, v in base.items() if k not in fields and v not in (None, False)}
    if missing:
        raise LookupError(f"HunyuanVideoParams of this ComfyUI has no {sorted(missing)}")
    return HunyuanVideo(image_model="hunyuan_video", operations=ops, **{k: v for k, v in base.items() if k in fields})


def wan_cls(name):
    import comfy.ldm.wan.model as W
    if name == "AnimateWanModel":
        import comfy.ldm.wan.model_animate as A
        return getattr(A, name, None)
    return getattr(W, name, None)


def build(v):
    """(model, forward kwargs) per variant; LookupError when this ComfyUI lacks it."""
    x = lambda c=16, t=3, h=8, w=8: R(1, c, t, h, w)
    ctx = R(1, 6, TXT)
    t = torch.tensor([500.0])
    clip = R(1, 257, 1280)

    def need(name):
        c = wan_cls(name)
        if c is None:
            raise LookupError(f"{name} is not in this ComfyUI")
        return c
    if v == "wan_t2v":
        return need("WanModel")(**wan_kw()), dict(x=x(), timestep=t, context=ctx, time_dim_concat=x(t=1))
    if v == "wan_i2v":
        return need("WanModel")(**wan_kw(model_type="i2v", in_dim=36)), dict(x=x(36), timestep=t, context=ctx, clip_fea=clip)
    if v == "wan22_5b":
        return need("WanModel")(**wan_kw(in_dim=48, out_dim=48)), dict(x=x(48), timestep=t, context=ctx)
    if v == "wan_refconv":
        return need("WanModel")(**wan_kw(in_dim_ref_conv=16)), dict(x=x(), timestep=t, context=ctx, reference_latent=R(1, 16, 8, 8))
    if v == "wan_vace":
        m = need("VaceWanModel")(**wan_kw(vace_layers=1, vace_in_dim=96))
        return m, dict(x=x(), timestep=t, context=ctx, vace_context=R(1, 1, 96, 3, 8, 8), vace_strength=[1.0])
    if v == "wan_camera":
        m = need("CameraWanModel")(**wan_kw(model_type="camera", in_dim=32))
        return m, dict(x=x(32), timestep=t, context=ctx, clip_fea=clip, camera_conditions=R(1, 24, 3, 64, 64))
    if v == "wan_s2v":
        m = need("WanModel_S2V")(**wan_kw(audio_inject_layers=[0, 1]))
        return m, dict(x=x(), timestep=t, context=ctx, reference_latent=x(t=1), reference_motion=x(t=19))
    if v == "wan_humo":
        m = need("HumoWanModel")(**wan_kw())
        return m, dict(x=x(), timestep=t, context=ctx, reference_latent=x(t=1), audio_embed=R(1, 3, 8, 5, 1280))
    if v == "wan_animate":
        # 5 blocks: one face-adapter fuser block (num_layers // 5), the key ComfyUI (and the /prompt rules) detect Animate by
        m = need("AnimateWanModel")(**wan_kw(in_dim=36, num_layers=5))
        return m, dict(x=x(36), timestep=t, context=ctx, clip_fea=clip, pose_latents=x(t=2))
    if v == "wan_scail":
        m = need("SCAILWanModel")(**wan_kw(in_dim=20))
        return m, dict(x=x(20), timestep=t, context=ctx, clip_fea=clip, reference_latent=x(20, t=1), pose_latents=x(20, 3, 4, 4))
    if v == "wan_subclass":
        base = need("WanModel")
        return type("WanModelCustom", (base,), {})(**wan_kw(num_layers=1)), None
    if v == "hunyuan_video":
        m = hy()
        return m, dict(x=x(), timestep=t, context=ctx, y=R(1, 768), guidance=torch.tensor([6.0]),
                       attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]), ref_latent=x(t=1))
    if v == "hunyuan_video_single":  # the double block's text outputs zeroed: the single block's text rows stay text-only
        m = hy()
        return m, dict(x=x(), timestep=t, context=ctx, y=R(1, 768), guidance=torch.tensor([6.0]), ref_latent=x(t=1))
    if v == "hunyuan_video_1.5":
        m = hy(in_channels=65, out_channels=32, vec_in_dim=None, patch_size=[1, 1, 1], depth=2, depth_single_blocks=0,
               guidance_embed=False, byt5=True, use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True)
        return m, dict(x=x(65, 3, 4, 4), timestep=t, context=ctx, txt_byt5=R(1, 4, 1472), clip_fea=R(1, 5, 1152))
    if v == "hunyuan_image_refiner":
        return hy(vec_in_dim=None, patch_size=[1, 1, 1]), None
    if v == "hunyuan_image_2.1":
        return hy(vec_in_dim=None, patch_size=[1, 1], axes_dim=[64, 64]), None
    raise KeyError(v)


CAPTURE = {"hunyuan_video_single": 1}  # the VORTA block whose first self-attention q is compared
GRID_INPUTS = {"wan_t2v": ("x", "time_dim_concat"), "wan_scail": ("x", "reference_latent")}


def changed_rows(a, b):
    """Token rows where two q tensors differ ([B, L, HD] or [B, H, L, D] with skip_reshape)."""
    d = (a - b).abs()
    d = d.amax(dim=(0, 1, 3)) if d.dim() == 4 else d.amax(dim=(0, 2))
    rows = torch.nonzero(d > 1e-6).flatten().tolist()
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return runs


def run(v):
    try:
        m, kw = build(v)
    except LookupError as e:
        return {"status": "skip", "reason": str(e)}
    out = {"class": type(m).__name__}
    try:
        spec = VM.inspect_model(m)
        out.update(status="routes", variant=spec.variant, family=spec.family, blocks=spec.blocks, heads=spec.heads,
                   embed=spec.embed_dim, tile=list(spec.official_tile), joint_text=spec.joint_text)
    except VM.UnsupportedModelError as e:
        spec = None
        out.update(status="refused", message=str(e))
    if spec is not None:
        out["patch"] = list(spec.patch_size)
    # the /prompt-time rules on this model's own state-dict header
    hs = VF.from_header({k: tuple(t.shape) for k, t in m.state_dict().items()})
    out["header"] = None if hs is None else dict(
        family=hs.family, variant=hs.variant, blocks=hs.blocks, heads=hs.heads, embed=hs.embed_dim,
        patch=list(hs.patch_size), tile=list(hs.official_tile), block_keys=[list(k) for k in hs.block_keys])
    if spec is not None:
        out["block_keys"] = [list(k) for k in spec.block_keys]
    if kw is None:
        return out
    init(m)
    if v == "hunyuan_video_single":
        with torch.no_grad():
            b0 = m.double_blocks[0]
            for mod in (b0.txt_attn.proj, b0.txt_mlp[-1]):
                for p in mod.parameters():
                    p.zero_()
    state = {"calls": [], "no_options_patches": 0}

    def wrapper(executor, *args, **kwargs):
        dm = executor.class_obj
        b = inspect.signature(dm._forward).bind_partial(*args, **kwargs)
        named = dict(b.arguments)
        named.update(named.pop("kwargs", {}) or {})
        if spec is not None:
            grid = VM.video_grid(spec, named["transformer_options"], named, named["x"].shape)
            state["grid"] = list(grid)
            state["layout"] = VM.call_layout(spec, named, grid)
        return executor(*args, **kwargs)

    def make_patch(i):
        def patch(args, extra):
            to = args.get("transformer_options")
            if to is None:  # ComfyUI 0.3.64 S2V hands its blocks no transformer_options
                state["no_options_patches"] += 1
                return extra["original_block"](args)
            to["probe_block"] = i
            try:
                return extra["original_block"](args)
            finally:
                to.pop("probe_block", None)
        return patch

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        to = kwargs.get("transformer_options") or {}
        sr = bool(kwargs.get("skip_reshape", False))
        L = q.shape[2] if sr else q.shape[1]
        gs = to.get("grid_sizes")
        c = {"q": list(q.shape), "k": list(k.shape), "skip_reshape": sr, "L": int(L), "same": tuple(q.shape) == tuple(k.shape),
             "block": to.get("probe_block"), "block_index": to.get("block_index"), "block_type": to.get("block_type"),
             "grid_sizes": [int(g) for g in gs] if gs is not None else None}
        if spec is not None and "layout" in state and c["same"]:
            s = VM.split_tokens(spec, state["layout"], int(L), math.prod(state["grid"]))
            c["split"] = list(s) if s is not None else None
        state["calls"].append(c)
        if c["same"] and c["block"] == CAPTURE.get(v, 0) and "q0" not in state:
            state["q0"] = q.detach().clone()
        return func(*args, **kwargs)

    if hasattr(m, "double_blocks"):
        keys = [("double_block", i) for i in range(len(m.double_blocks))] + [("single_block", i) for i in range(len(m.single_blocks))]
    else:
        keys = [("double_block", i) for i in range(len(m.blocks))]
    to = {"optimized_attention_override": override, "wrappers": {"diffusion_model": {"probe": [wrapper]}},
          "patches_replace": {"dit": {k: make_patch(i) for i, k in enumerate(keys)}},
          "sigmas": torch.tensor([0.5]), "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
    with torch.no_grad():
        y = m(transformer_options=to, **kw)
        q_a = state.pop("q0", None)
        calls = state["calls"]
        state["calls"] = []
        kw2 = dict(kw)
        for name in GRID_INPUTS.get(v, ("x",)):  # new video tokens, same everything else
            kw2[name] = R(*kw[name].shape)
        m(transformer_options=to, **kw2)
        q_b = state.pop("q0", None)
        state["calls"] = calls
    out.update(video_rows=changed_rows(q_a, q_b) if q_a is not None and q_b is not None else None)
    out.update(out_shape=list(y.shape), calls=state["calls"], grid=state.get("grid"), no_options_patches=state["no_options_patches"],
               layout=vars(state["layout"]) if "layout" in state else None)
    return out


res = {}
for v in VARIANTS:
    try:
        res[v] = run(v)
    except Exception as e:
        res[v] = {"status": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
print("PROBE-JSON " + json.dumps(res))
'''
