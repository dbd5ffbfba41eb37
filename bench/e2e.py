"""End to end on ComfyUI's own model code: seconds per denoising step, peak memory and fidelity of
VORTA against ComfyUI core's sparse attention (Sol-Attn) and the dense backends, in one run (GPU; a
benchmark, not a test).

    python -m bench.e2e --comfy PATH_TO_COMFYUI_TREE [--models wan1.3b-480p,wan14b-720p] [--steps 5] [--merge]

How the models are made and sampled (nothing is downloaded; speed does not depend on the weights):
- ComfyUI's WanModel (HunyuanVideo: its HunyuanVideo class, 256 text tokens and a CLIP pooled vector in
  the conditioning) is built on the meta device with the real configuration, a random bf16 state
  dict is made from its shapes (matrices N(0, 0.02), vectors N(0, 0.01), norm weights 1), and
  comfy.sd.load_diffusion_model_state_dict loads it, as the UNETLoader does: model detection, config,
  ModelPatcher. Wan 2.1 14B at 720p runs with fewer blocks than its 40 (``--blocks``, default 8;
  every block is the same, so seconds per step scale with the block count: the table gives the
  measured figure and the full-model estimate); HunyuanVideo 720p x 129 frames with 2 double + 4
  single blocks of its 20 + 40. HunyuanVideo 1.5 (ComfyUI's HunyuanVideo15: the same class with a
  vision input and 54 double blocks, width 2048, 16 heads, patch 1x1x1, 32 latent channels + 32
  image-condition + 1 mask channels, Qwen2.5-VL text of width 3584) T2V at 720p x 121 frames
  (32x31x45x80, 111,600 tokens) with 6 of its 54 blocks: text-to-video, so ComfyUI's own concat_cond
  fills the image and mask channels with zeros, and there is no vision (clip_fea) or glyph (byT5) input.
- Every method samples the same latent (Wan 2.1 480p x 81 frames = 16x21x60x104; 720p = 16x21x90x160)
  with comfy.sample.sample (euler, simple schedule, CFG 5: cond and uncond batched as ComfyUI does),
  the same seed and random text conditioning [1, 512, 4096] (HunyuanVideo 1.5: [1, 256, 3584], no
  pooled vector). Step 0 (cold caches, autotuning) and
  the last step are not timed; the steps between are, from the sampler callback with a device sync.
- VORTA is applied by nodes.patch.apply_vorta on a ModelPatcher clone, exactly as the VORTA Apply
  node does. Sol-Attn is installed the way core installs it: an optimized_attention_override that
  sends self-attention (>= 12288 tokens, head dim 128, no mask) to comfy_kitchen.sol_attn and
  everything else on (no dense start steps or dense blocks for either method: kernels compared).
- Random weights make every head diffuse, which no sparse method is made for. A second variant,
  "structured", gives 60% of each block's heads a shared per-head bias on the q and k projections:
  after Wan's own RMSNorm and 3D RoPE those heads' scores then fall off with 3D distance (local
  heads, as real video DiTs have); the other heads stay random.
- Also: fp8 weights (``--fp8``; ComfyUI's fp8 matrix multiplication with ``--fast fp8_matrix_mult``) dense and
  with VORTA; comfy-kitchen's INT8 attention and SageAttention 1.0.6 (carry its wheel) as dense backends
  (every unmasked call), core's EasyCache alone and
  on top of VORTA (its node's defaults; the timed steps include the ones it skips), and VORTA's set-up host
  time per step (router table + routing plan, summed over the step's model calls).
- Fidelity, same seed and inputs: each step's denoised prediction (the sampler callback's x0)
  against dense cuDNN's (relative L2, cosine; mean over the steps) and the final latent's PSNR
  (peak = the dense final latent's max - min). Weights are random: quality with real weights is for
  users to confirm (VORTA Fidelity Check node).

Writes bench/results/e2e-<gpu>.json and .md after every measured row (with --merge: the earlier
rows plus this run's so far), so a run cut off by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

MODELS = {  # name: ComfyUI model config, latent [C, T, H, W], blocks actually built (of the config's)
    "wan1.3b-480p": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), (16, 21, 60, 104), 30),
    "wan14b-720p": (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), (16, 21, 90, 160), 8),
    # HunyuanVideo T2V 720p x 129 frames: 20 double + 40 single blocks; built with 2 + 4 (the same ratio)
    "hunyuan-720p": (dict(family="hunyuan", hidden_size=3072, num_heads=24, depth=20, depth_single_blocks=40,
                          num_layers=60), (16, 33, 90, 160), 6),
    # HunyuanVideo 1.5 T2V 720p x 121 frames: 54 double blocks (no single ones); built with 6
    "hunyuan15-720p": (dict(family="hunyuan15", hidden_size=2048, num_heads=16, depth=54, depth_single_blocks=0,
                            num_layers=54), (32, 31, 45, 80), 6),
    "tiny": (dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2), (16, 3, 8, 12), 2),  # CPU smoke runs
    "tiny-hunyuan": (dict(family="hunyuan", hidden_size=256, num_heads=2, depth=1, depth_single_blocks=2, num_layers=3),
                     (16, 3, 8, 12), 3),
    "tiny-hunyuan15": (dict(family="hunyuan15", hidden_size=256, num_heads=2, depth=2, depth_single_blocks=0,
                            num_layers=2), (32, 3, 4, 6), 2),
}
BIG = ("wan14b-720p", "hunyuan-720p", "hunyuan15-720p")  # built with fewer blocks (--blocks)
TEXT_TOKENS = 256  # HunyuanVideo's (and 1.5's) text tokens in each self-attention call
# ComfyUI's HunyuanVideo class arguments by version (the config its model detection derives from a file)
HUNYUAN_ARGS = {
    "hunyuan": dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, patch_size=[1, 2, 2],
                    guidance_embed=True, byt5=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False),
    "hunyuan15": dict(in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=3584, patch_size=[1, 1, 1],
                      guidance_embed=False, byt5=True, use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True),
}
SOL_TAUS = (1.0, 1.3, 2.0)
SOL_MIN_TOKENS = 12288  # core's node leaves shorter sequences dense
STRUCTURED_SHARE = 0.6


def setup_comfy(path: str, fast=()):
    sys.path.insert(0, str(Path(path).resolve()))
    argv, sys.argv = sys.argv, [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"]) + (
        ["--fast", *fast] if fast else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (parses the args)
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401

    sys.argv = argv


def _meta_model(cfg, blocks):
    """ComfyUI's model class with this config on the meta device, ``blocks`` transformer blocks."""
    import comfy.ops

    with torch.device("meta"):
        if _is_hunyuan(cfg):
            from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams
            import dataclasses

            double = _hunyuan_double(cfg, blocks)
            later = ("use_cond_type_embedding", "vision_in_dim", "meanflow_sum")  # HunyuanVideo 1.5's (ComfyUI >= 0.3.7x)
            fields = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
            args = {k: v for k, v in HUNYUAN_ARGS[cfg["family"]].items() if k not in later or k in fields}
            return HunyuanVideo(image_model="hunyuan_video", hidden_size=cfg["hidden_size"], mlp_ratio=4.0,
                                num_heads=cfg["num_heads"], depth=double, depth_single_blocks=blocks - double,
                                axes_dim=[16, 56, 56], theta=256, qkv_bias=True, meanflow=False,
                                operations=comfy.ops.disable_weight_init, **args)
        from comfy.ldm.wan.model import WanModel

        return WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, freq_dim=256, text_dim=4096,
                        operations=comfy.ops.disable_weight_init,
                        **{k: v for k, v in dict(cfg, num_layers=blocks).items() if k != "family"})


def _is_hunyuan(cfg) -> bool:
    return cfg.get("family", "wan").startswith("hunyuan")


def _hunyuan_double(cfg, blocks) -> int:
    """Double blocks of ``blocks`` built, in the full model's double : single ratio."""
    return max(1, round(blocks * cfg["depth"] / cfg["num_layers"]))


def _qk_projections(cfg, blocks):
    """(state-dict name, slice of it) of each block's q and k output rows, per head: where a shared
    per-head bias makes a head local (Wan: separate q / k Linear layers; HunyuanVideo: one qkv)."""
    heads = cfg["num_heads"]
    dim = cfg.get("dim") or cfg["hidden_size"]
    d = dim // heads
    out = []
    if _is_hunyuan(cfg):
        double = _hunyuan_double(cfg, blocks)
        names = [f"double_blocks.{b}.img_attn.qkv.bias" for b in range(double)]
        names += [f"single_blocks.{b}.linear1.bias" for b in range(blocks - double)]
        for name in names:  # q rows [0, dim), k rows [dim, 2 dim)
            out.append([(name, slice(h * d, (h + 1) * d), slice(dim + h * d, dim + (h + 1) * d)) for h in range(heads)])
        return out, d
    for b in range(blocks):
        out.append([((f"blocks.{b}.self_attn.q.bias", f"blocks.{b}.self_attn.k.bias"), slice(h * d, (h + 1) * d))
                    for h in range(heads)])
    return out, d


def random_state_dict(cfg, blocks, device, dtype, structured: bool, seed=0):
    """The model's state dict shapes, filled at random on ``device`` (see the module docstring)."""
    meta = _meta_model(cfg, blocks)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, p in meta.state_dict().items():
        t = torch.empty(p.shape, device=device, dtype=dtype)
        if ("norm" in name or "scale" in name) and name.endswith(("weight", "scale")):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02 if p.dim() > 1 else 0.01, generator=g)
        sd[name] = t
    if structured:
        per_block, d = _qk_projections(cfg, blocks)
        cpu = torch.Generator().manual_seed(seed + 1)
        for heads in per_block:
            chosen = torch.randperm(len(heads), generator=cpu)[: round(len(heads) * STRUCTURED_SHARE)].tolist()
            for h in chosen:
                bias = torch.randn(d, generator=cpu).to(device, dtype)
                entry = heads[h]
                if isinstance(entry[0], tuple):  # Wan: the same bias on q and k
                    for name in entry[0]:
                        sd[name][entry[1]] = bias
                else:  # HunyuanVideo: q and k rows of one qkv bias
                    sd[entry[0]][entry[1]] = bias
                    sd[entry[0]][entry[2]] = bias
    return sd


def load_model(sd, dtype, fp8=False):
    """The UNETLoader's path; fp8: weights stored as float8_e4m3fn (UNETLoader's weight_dtype
    fp8_e4m3fn), with ComfyUI's fp8 matrix multiplication where --fast fp8_matrix_mult is on."""
    import comfy.sd

    if fp8:
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn,
                                                                           "fp8_optimizations": True})
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})


def table_router(table, spec):
    """A file router whose decision is ``table`` [blocks, heads] at every step, fitting ``spec``."""
    from vorta_ops.router import RouterSet

    t = torch.as_tensor(table)
    blocks, heads = t.shape
    b = torch.zeros(blocks, heads, 3)
    b.scatter_(-1, t.long()[..., None], 20.0)
    return RouterSet(spec.family, torch.zeros(blocks, heads * 3, spec.embed_dim), b.reshape(blocks, heads * 3))


def mix_table(blocks, heads, kind, seed=0):
    from vorta_ops.branches import CORESET, SLIDING

    if kind == "sliding":
        return torch.full((blocks, heads), SLIDING, dtype=torch.int8)
    if kind == "coreset":
        return torch.full((blocks, heads), CORESET, dtype=torch.int8)
    g = torch.Generator().manual_seed(seed)  # half sliding tile, half core-set, scattered per block
    rows = []
    for _ in range(blocks):
        row = torch.tensor([SLIDING] * (heads // 2) + [CORESET] * (heads - heads // 2), dtype=torch.int8)
        rows.append(row[torch.randperm(heads, generator=g)])
    return torch.stack(rows)


def _bhld(args, kwargs):
    """(q, k, v as [B, H, L, D] views, heads) of an optimized_attention call without a mask, or None.
    Wan calls it with [B, L, H*D]; HunyuanVideo (Flux's attention) with [B, H, L, D] and skip_reshape."""
    q, k, v = args[:3]
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    if kwargs.get("mask") is not None:
        return None
    if kwargs.get("skip_reshape"):
        return (q, k, v, heads) if q.dim() == 4 else None
    if q.dim() != 3:
        return None
    return (*(x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v)), heads)


def _attention_out(out, kwargs, layout="bhld"):
    """out ([B, H, L, D], or [B, L, H, D] for layout "blhd") as the caller expects it."""
    if layout == "blhd":
        out = out.transpose(1, 2)
    if kwargs.get("skip_output_reshape"):
        return out
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def sol_override(tau):
    import comfy_kitchen as ck

    def override(func, *args, **kwargs):
        x = _bhld(args, kwargs)
        if x is None or x[0].shape != x[1].shape or x[0].shape[2] < SOL_MIN_TOKENS or x[0].shape[-1] != 128:
            return func(*args, **kwargs)
        out = ck.sol_attn(*(t.transpose(1, 2) for t in x[:3]), tau=tau)  # [B, L, H, 128]
        return _attention_out(out, kwargs, "blhd")

    return override


def int8_override(func, *args, **kwargs):
    """comfy-kitchen's INT8 attention for every call without a mask (a dense INT8 backend)."""
    import comfy_kitchen as ck

    x = _bhld(args, kwargs)
    if x is None:
        return func(*args, **kwargs)
    return _attention_out(ck.int8_attention(*x[:3]), kwargs)


def sage_override(func, *args, **kwargs):
    """SageAttention v1 (PyPI 1.0.6: INT8 QK^T, Triton) for every call without a mask, as its ComfyUI
    users run it (a dense INT8 alternative)."""
    from sageattention import sageattn

    x = _bhld(args, kwargs)
    if x is None:
        return func(*args, **kwargs)
    return _attention_out(sageattn(*x[:3], tensor_layout="HND"), kwargs)


def _stand_in_pyav():
    """comfy_api imports PyAV (video files) when it is imported; EasyCache never uses it. Where PyAV is
    not installed (the benchmark's GPU machine), stand-in av modules let comfy_extras.nodes_easycache load."""
    import importlib.abc
    import importlib.machinery
    import types

    class _AnyMeta(type):
        def __getattr__(cls, name):
            return cls

    class _Any(metaclass=_AnyMeta):
        def __init__(self, *a, **k):
            pass

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "av" or name.startswith("av."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = types.ModuleType(spec.name)
            m.__path__ = []
            m.__getattr__ = lambda name: _Any
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def easycache_kind(kind: str) -> tuple[str | None, float]:
    """A method kind with EasyCache -> (the kind under it, None for the dense model; reuse threshold):
    "easycache" (the node's default 0.2), "easycache@T", "INNER + easycache", "INNER + easycache@T"."""
    inner, sep, tail = kind.partition(" + easycache")
    if not sep:
        inner, tail = None, kind[len("easycache"):]
    return inner, float(tail[1:]) if tail.startswith("@") else 0.2


def with_easycache(model, threshold=0.2):
    """ComfyUI core's EasyCache on top of a model (its node's defaults; reuse_threshold given)."""
    try:
        from comfy_extras.nodes_easycache import EasyCacheNode
    except ModuleNotFoundError as e:
        if e.name != "av" and not (e.name or "").startswith("av."):
            raise
        _stand_in_pyav()
        from comfy_extras.nodes_easycache import EasyCacheNode

    out = EasyCacheNode.execute(model, reuse_threshold=threshold, start_percent=0.15, end_percent=0.95, verbose=False)
    return out.result[0] if hasattr(out, "result") else out[0]


class SetupTimer:
    """Host time of VORTA's per-model-call set-up (router table + routing plan), summed."""

    def __enter__(self):
        import nodes.patch as P

        self.P, self.orig, self.seconds, self.calls = P, P._setup_call, 0.0, 0

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self.orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        P._setup_call = timed
        return self

    def __exit__(self, *exc):
        self.P._setup_call = self.orig


def no_self_attention(func, *args, **kwargs):
    """Self-attention returns v unchanged (what the rest of the step costs without it); HunyuanVideo's
    joint attention (text + video) included, in the layout its caller expects."""
    q, k, v = args[:3]
    if q.shape != k.shape or kwargs.get("mask") is not None:
        return func(*args, **kwargs)
    if not kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape"):
        return v
    x = _bhld(args, kwargs)
    return func(*args, **kwargs) if x is None else _attention_out(x[2], kwargs)


def sdpa_backend(name):
    if not torch.cuda.is_available() or name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def sample(patcher, latent_shape, steps, seed, device, family="wan"):
    """(per-step seconds, x0 per step, final latent, peak GiB, transformer forward calls) of one sampling
    run. The calls count what a step cache skipped (cond + uncond batched: one call per step run)."""
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, *latent_shape)
    noise = torch.randn(latent.shape, generator=g)
    if family == "hunyuan":  # LLM text tokens + the CLIP pooled vector
        cond = [[torch.randn(1, TEXT_TOKENS, 4096, generator=g) * 0.1, {"pooled_output": torch.randn(1, 768, generator=g)}]]
        uncond = [[torch.randn(1, TEXT_TOKENS, 4096, generator=g) * 0.1, {"pooled_output": torch.randn(1, 768, generator=g)}]]
    elif family == "hunyuan15":  # Qwen2.5-VL text tokens, no pooled vector (as its text encoder gives)
        cond = [[torch.randn(1, TEXT_TOKENS, 3584, generator=g) * 0.1, {"pooled_output": None}]]
        uncond = [[torch.randn(1, TEXT_TOKENS, 3584, generator=g) * 0.1, {"pooled_output": None}]]
    else:
        cond = [[torch.randn(1, 512, 4096, generator=g) * 0.1, {}]]
        uncond = [[torch.randn(1, 512, 4096, generator=g) * 0.1, {}]]
    stamps, x0s = [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def callback(step, x0, x, total):
        sync()
        stamps.append(time.perf_counter())
        x0s.append(x0.detach().float().cpu())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    stamps.append(time.perf_counter())
    calls = []
    dm = patcher.model.diffusion_model  # a step cache wraps the transformer's forward: count its first block's runs
    first = next(getattr(dm, n)[0] for n in ("blocks", "double_blocks", "single_blocks") if len(getattr(dm, n, ())))
    hook = first.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = comfy.sample.sample(patcher, noise, steps, 5.0, "euler", "simple", cond, uncond, latent,
                                  callback=callback, disable_pbar=True, seed=seed)
    finally:
        hook.remove()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    return durations, x0s, out.float().cpu(), peak, len(calls)


def fidelity(x0s, final, ref_x0s, ref_final):
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(x0s, ref_x0s)]
    cos = [float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(x0s, ref_x0s)]
    mse = float((final - ref_final).pow(2).mean())
    peak = float(ref_final.max() - ref_final.min())
    psnr = float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)
    return sum(rel) / len(rel), sum(cos) / len(cos), psnr


def run_model(name, steps, seed, device, dtype, blocks_override=None, variants=("random", "structured"), only=None,
              fp8=False, on_row=None, easycache_thresholds=()):
    """This model's rows; ``on_row(rows so far)`` after each one (the caller writes them)."""
    from nodes.patch import VortaOptions, apply_vorta
    from nodes.training_free import TrainingFreeProvider

    cfg, latent, blocks = MODELS[name]
    if blocks_override:
        blocks = blocks_override
    rows = []
    timed = slice(1, steps - 1)  # not step 0 (cold), not the last (a distilled rule may run it dense)
    for variant in variants:
        sd = random_state_dict(cfg, blocks, device, dtype, structured=(variant == "structured"))
        # (ComfyUI's loader empties the dict it is given: each load gets its own)
        fp8_base = load_model(dict(sd), dtype, fp8=True) if fp8 and variant == "random" else None
        base = load_model(sd, dtype)
        del sd
        from nodes.models import inspect_model

        spec = inspect_model(base.model.diffusion_model)
        family = cfg.get("family", "wan")

        def patched(kind):
            if kind == "dense":
                return base
            if kind == "fp8 dense":
                return fp8_base
            if kind == "fp8 mix official":
                return apply_vorta(fp8_base, table_router(mix_table(spec.blocks, spec.heads, "mix"), spec),
                                   VortaOptions(tile="official"))[0]
            if kind.startswith("sol"):
                m = base.clone()
                m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sol_override(float(kind[3:]))
                return m
            if kind in ("int8", "sage"):
                m = base.clone()
                m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
                    int8_override if kind == "int8" else sage_override)
                return m
            if "easycache" in kind:
                inner, threshold = easycache_kind(kind)
                return with_easycache(base if inner is None else patched(inner), threshold)
            if kind == "no self-attention":
                m = base.clone()
                m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = no_self_attention
                return m
            if kind == "training-free":
                return apply_vorta(base, TrainingFreeProvider(), VortaOptions(tile="official"))[0]
            tile = "aligned" if kind.endswith("aligned") else "official"
            mix = "sliding" if kind.startswith("all sliding") else "coreset" if kind.startswith("all core-set") else "mix"
            return apply_vorta(base, table_router(mix_table(spec.blocks, spec.heads, mix), spec), VortaOptions(tile=tile))[0]

        methods = [("dense cuDNN SDPA", "dense", "cudnn"), ("dense flash SDPA", "dense", "flash"),
                   ("self-attention skipped", "no self-attention", "cudnn")]
        if device.type == "cuda":
            methods.append(("dense INT8 (comfy-kitchen int8_attention)", "int8", None))
            methods.append(("dense SageAttention 1.0.6 (INT8, Triton)", "sage", None))
        if variant == "random":
            methods += [("VORTA 50/50 mix, official tiles", "mix official", "cudnn"),
                        ("VORTA 50/50 mix, aligned tiles", "mix aligned", "cudnn"),
                        ("VORTA all sliding tile (official)", "all sliding official", "cudnn"),
                        ("VORTA all core-set", "all core-set official", "cudnn")]
        else:
            methods += [("VORTA 50/50 mix, official tiles", "mix official", "cudnn"),
                        ("VORTA training-free (tau 0.3)", "training-free", "cudnn")]
        methods += [(f"Sol-Attn tau {t:g} (comfy-kitchen)", f"sol{t}", "cudnn") for t in SOL_TAUS]
        if fp8_base is not None:  # fp8 weights (fast fp8 matmul where ComfyUI's --fast enables it), alone and with VORTA
            methods += [("fp8 weights, dense cuDNN", "fp8 dense", "cudnn"),
                        ("fp8 weights + VORTA 50/50 official", "fp8 mix official", "cudnn")]
        if variant == "random":  # what users stack: a step cache on top (skipped steps x attention saved)
            methods += [("EasyCache (core defaults)", "easycache", "cudnn"),
                        ("VORTA 50/50 official + EasyCache", "mix official + easycache", "cudnn")]
            for t in easycache_thresholds:  # random weights change the output a lot per step: a looser cache
                methods += [(f"EasyCache (reuse threshold {t:g})", f"easycache@{t:g}", "cudnn"),
                            (f"VORTA 50/50 official + EasyCache (reuse threshold {t:g})",
                             f"mix official + easycache@{t:g}", "cudnn")]
        if only:  # a subset (debugging): the reference first
            methods = methods[:1] + [m for m in methods[1:] if any(o in m[0] for o in only)]
        ref = None
        for label, kind, backend in methods:
            try:
                m = patched(kind)
                with sdpa_backend(backend):
                    if kind == "training-free":
                        sample(m, latent, steps, seed, device, family)  # measures (kept in memory), then the timed run
                    with SetupTimer() as setup:
                        durations, x0s, final, peak, calls = sample(m, latent, steps, seed, device, family)
            except Exception as e:  # one method failing must not lose the others
                import traceback

                rows.append(dict(model=name, variant=variant, method=label, error=f"{type(e).__name__}: {e}"[:300]))
                if on_row is not None:
                    on_row(rows)
                print("FAILED", name, variant, label, e, flush=True)
                traceback.print_exc()
                if "device-side assert" in str(e) or "illegal memory access" in str(e):
                    print("the CUDA context is lost: no further method can run", flush=True)
                    return rows
                continue
            s = durations[timed] or durations
            sec = sum(s) / len(s)
            row = dict(model=name, variant=variant, resolution="x".join(map(str, latent)), method=label, steps=steps,
                       blocks_run=blocks,
                       blocks_model=cfg["num_layers"], s_per_step=round(sec, 4),
                       s_per_step_full_model=round(sec * cfg["num_layers"] / blocks, 3), peak_mem_gb=round(peak, 2),
                       overhead_ms=round(setup.seconds * 1e3 / steps, 3) if setup.calls else None,
                       model_calls=calls)
            if ref is None:
                ref = (x0s, final, sec)
            row["speedup_vs_dense"] = round(ref[2] / sec, 3)
            if kind != "no self-attention":
                rel, cos, psnr = fidelity(x0s, final, ref[0], ref[1])
                row.update(rel_l2_step_mean=round(rel, 5), cosine_step_mean=round(cos, 6),
                           psnr_final=round(psnr, 2) if math.isfinite(psnr) else "inf")
            rows.append(row)
            print(row, flush=True)
            if on_row is not None:
                on_row(rows)
        del base, fp8_base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def attach_shares(rows):
    """Each row's dense_self_attention_share: 1 - (self-attention skipped) / (dense cuDNN) s per step of
    its model, weights and blocks built, from the rows in the table (after a merge: the latest run of
    each). Seconds per step hardly depend on the number of steps, so where the two rows come from runs
    of different lengths, the dense run nearest in steps to the skipped one is used."""
    def by_model(method):
        found = {}
        for x in rows:
            if x.get("method") == method and "s_per_step" in x:
                m, v, _, n, b = _row_key(x)
                found.setdefault((m, v, b), []).append(x)
        return found

    def nearest(found, steps):
        return min(found, key=lambda x: abs((x.get("steps") or 0) - (steps or 0)))

    dense, skipped = by_model("dense cuDNN SDPA"), by_model("self-attention skipped")
    for r in rows:
        m, v, _, n, b = _row_key(r)
        if (m, v, b) in dense and (m, v, b) in skipped:
            sk = nearest(skipped[(m, v, b)], n)
            de = nearest(dense[(m, v, b)], sk.get("steps"))
            r["dense_self_attention_share"] = round(1 - sk["s_per_step"] / de["s_per_step"], 3)
        else:
            r.pop("dense_self_attention_share", None)
    return rows


def _steps_text(rows, steps):
    """"5 steps", or per model where runs differ (rows written before rows carried steps: ``steps``)."""
    per = {}
    for r in rows:
        per.setdefault(r.get("steps", steps), []).append(r.get("model"))
    if len(per) <= 1:
        return f"{next(iter(per), steps)} steps"
    return "; ".join(f"{n} steps ({', '.join(dict.fromkeys(m))})" for n, m in sorted(per.items(), reverse=True))


def _calls(r):
    """' (17)' where a run's transformer calls differ from its steps (a step cache skipped some)."""
    return f" ({r['model_calls']})" if r.get("model_calls") not in (None, r.get("steps")) else ""


def write(rows, meta, steps):
    from bench.attention import save_results

    attach_shares(rows)

    md = [f"# End to end on ComfyUI's model code ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"ComfyUI {meta['comfyui']}, comfy-kitchen {meta['comfy_kitchen']}, Python {platform.python_version()})", "",
          f"comfy.sample.sample, euler / simple, CFG 5 (cond + uncond batched), {_steps_text(rows, steps)}, seconds per step = the "
          "mean of the steps between the first and the last; bf16 random weights (bench/e2e.py says how, and what "
          "'structured' means). Fidelity: against dense cuDNN on the same seed (mean over steps of the denoised "
          "prediction's relative L2 and cosine; final latent PSNR). Random weights: the quality of real weights is "
          "for users to confirm (VORTA Fidelity Check node).", "",
          "| model | weights | steps (model calls) | method | s / step (blocks run) | s / step, all blocks | x dense | peak GiB | rel. L2 | cosine | PSNR dB | set-up ms / step |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['variant']} | {r.get('steps', '')} | {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        md.append(f"| {r['model']} | {r['variant']} | {r.get('steps', '')}{_calls(r)} | {r['method']} | {r['s_per_step']} ({r['blocks_run']}) | "
                  f"{r['s_per_step_full_model']} | {r['speedup_vs_dense']} | {r['peak_mem_gb']} | {r.get('rel_l2_step_mean', '')} | "
                  f"{r.get('cosine_step_mean', '')} | {r.get('psnr_final', '')} | {r.get('overhead_ms') or ''} |")
    shares = {(r["model"], r["variant"], r.get("blocks_run")): r["dense_self_attention_share"] for r in rows
              if "dense_self_attention_share" in r}
    if shares:
        md += [""] + [f"Dense self-attention share of a step ({m}, {v} weights, {b} blocks): {s:.1%} (1 - step time with "
                      f"self-attention skipped / dense step time)." for (m, v, b), s in shares.items()]
    save_results("e2e", rows, meta, md)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, help="a ComfyUI source tree (e.g. 0.19.3 unpacked from ../shared/vendor)")
    ap.add_argument("--models", default="wan1.3b-480p,wan14b-720p,hunyuan-720p")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=None,
                    help="blocks to build for wan14b-720p (default 8 of 40), hunyuan-720p (default 6 of 60) and "
                         "hunyuan15-720p (default 6 of 54)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="random,structured")
    ap.add_argument("--only", default="", help="comma-separated substrings of the methods to run (besides dense cuDNN)")
    ap.add_argument("--easycache", default="", help="comma-separated EasyCache reuse thresholds to run besides the "
                                                   "node's default 0.2, alone and on top of VORTA (random weights)")
    ap.add_argument("--fp8", action="store_true", help="also fp8 weights (float8_e4m3fn), dense and with VORTA")
    ap.add_argument("--fast", default="", help="ComfyUI --fast features, e.g. fp8_matrix_mult")
    ap.add_argument("--drop", default="", help="with --merge: comma-separated MODEL:METHOD-substring pairs; earlier rows "
                                               "that match are dropped (measured wrongly), unless this run measures them again")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in bench/results/e2e-<gpu>.json, replacing those this run measures again "
                         "(same model, weights and method); each row's ratio is against dense cuDNN of its own run")
    a = ap.parse_args(argv)
    setup_comfy(a.comfy, a.fast.split(",") if a.fast else [])
    sys.path.insert(0, str(ROOT))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import triton

    try:
        from importlib.metadata import version

        ck = version("comfy_kitchen")
    except Exception:
        ck = "not installed"
    import comfyui_version  # noqa: F401  (ComfyUI's version module)

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "comfyui": getattr(sys.modules["comfyui_version"], "__version__", "?"),
            "comfy_kitchen": ck}
    previous = previous_rows(meta["device"]) if a.merge else None
    if previous is not None and a.drop:
        drops = [d.split(":", 1) for d in a.drop.split(",") if ":" in d]
        previous = [r for r in previous if not any(r.get("model") == m and sub in r.get("method", "") for m, sub in drops)]
    rows = []

    def flush(current=()):  # after every row: a run cut off keeps what it measured
        done = rows + list(current)
        write(merge_rows(previous, done) if previous is not None else done, meta, a.steps)

    for name in a.models.split(","):
        rows += run_model(name, a.steps, a.seed, device, dtype, a.blocks if name in BIG else None,
                          tuple(a.variants.split(",")), [o for o in a.only.split(",") if o], a.fp8, on_row=flush,
                          easycache_thresholds=[float(t) for t in a.easycache.split(",") if t])
    flush()


def _row_key(r: dict) -> tuple:
    """A row is measured again by a run of the same model, weights, method, number of steps and blocks (a
    longer run, e.g. for a step cache to reach its threshold, is kept beside the short one)."""
    return r.get("model"), r.get("variant"), r.get("method"), r.get("steps"), r.get("blocks_run")


def previous_rows(device_name: str) -> list[dict]:
    """The rows of an earlier run on this GPU (bench/results/e2e-<gpu>.json), [] when there is none."""
    import json

    from bench.attention import RESULTS

    path = RESULTS / f"e2e-{device_name.lower().replace(' ', '-')}.json"
    return json.loads(path.read_text()) if path.exists() else []


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """old with the rows new measures again replaced in place; new's other rows after the last row of
    their model (so a model's rows stay together), in new's order."""
    fresh = {_row_key(r): r for r in new}
    out = [fresh.pop(_row_key(r), r) for r in old]
    for r in new:
        if _row_key(r) not in fresh:
            continue
        at = max((i for i, o in enumerate(out) if o.get("model") == r.get("model")), default=len(out) - 1)
        out.insert(at + 1, fresh.pop(_row_key(r)))
    return out


if __name__ == "__main__":
    main()
