"""Drive a real ComfyUI for integration tests: tiny random-weight checkpoints, a headless server
on 127.0.0.1 with this pack in custom_nodes, prompts posted over HTTP.

Needs COMFYUI_PATH (a ComfyUI source tree) and a Python that has ComfyUI's requirements; tests
that use it skip with the reason when either is missing.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def comfy_trees() -> list[tuple[str, Path]]:
    """The ComfyUI source trees to test against, as (version id, path): COMFYUI_PATHS (several,
    separated by os.pathsep) or COMFYUI_PATH (one). The version id is the tree's comfyui_version."""
    raw = os.environ.get("COMFYUI_PATHS") or os.environ.get("COMFYUI_PATH") or ""
    trees = []
    for part in raw.split(os.pathsep):
        p = Path(part).resolve() if part else None
        if p is not None and (p / "main.py").exists():
            trees.append((tree_version(p), p))
    return trees


def tree_version(p: Path) -> str:
    v = p / "comfyui_version.py"
    if v.exists():
        for line in v.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return p.name


def comfyui_path() -> Path | None:
    """The first tree (single-tree callers)."""
    trees = comfy_trees()
    return trees[0][1] if trees else None


def comfy_python(tree: Path | None = None) -> str:
    """The Python that runs ComfyUI (servers, model makers) for a tree: COMFYUI_PYTHON_<version>
    (dots as underscores, e.g. COMFYUI_PYTHON_0_3_64: a tree whose pinned packages differ), else
    COMFYUI_PYTHON, else this one. It may differ from the one running pytest: ComfyUI needs
    torchvision, the pack's own tests do not."""
    py = None
    if tree is not None:
        py = os.environ.get("COMFYUI_PYTHON_" + tree_version(tree).replace(".", "_"))
    py = py or os.environ.get("COMFYUI_PYTHON")
    return str(Path(py).absolute()) if py else sys.executable


def skip_reason() -> str | None:
    trees = comfy_trees()
    if not trees:
        return "ComfyUI integration: set COMFYUI_PATH (or COMFYUI_PATHS) to ComfyUI source trees (see README, Development)"
    for _, p in trees:
        probe = subprocess.run(
            [comfy_python(p), "-c", "import aiohttp, yaml, torchsde, torchvision, comfy_api"], cwd=p, capture_output=True, text=True
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"ComfyUI integration: {comfy_python(p)} lacks ComfyUI's requirements ({last})"
    return None


# Writes tiny random-weight diffusion models with ComfyUI's own classes, so the standard loaders
# detect them like the real ones.
_MAKE_MODEL = textwrap.dedent(
    """
    import sys, torch
    sys.argv = ["make", "--cpu"]
    import comfy.options; comfy.options.enable_args_parsing()
    import comfy.ops, comfy.utils
    kind, out, dim, layers = sys.argv_real[1], sys.argv_real[2], int(sys.argv_real[3]), int(sys.argv_real[4])
    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init
    if kind in ("wan", "wan22_5b", "wan_i2v"):
        # Wan 2.1 / 2.2 A14B experts: 16 latent channels; Wan 2.2 5B: 48; Wan 2.1 I2V: 16 + 4 mask
        # + 16 image channels in, and a CLIP-vision projection (img_emb)
        from comfy.ldm.wan.model import WanModel
        ch_in, ch_out = {"wan": (16, 16), "wan22_5b": (48, 48), "wan_i2v": (36, 16)}[kind]
        m = WanModel(model_type="i2v" if kind == "wan_i2v" else "t2v", dim=dim, ffn_dim=2 * dim,
                     num_heads=dim // 128, num_layers=layers, text_dim=4096, freq_dim=256,
                     in_dim=ch_in, out_dim=ch_out, operations=ops)
    else:
        import dataclasses
        from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams
        # HunyuanVideo 1.5-era ComfyUI added fields (off for HunyuanVideo T2V)
        later = {"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}
        fields = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
        m = HunyuanVideo(**{k: v for k, v in later.items() if k in fields}, image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                         context_in_dim=4096, hidden_size=dim, mlp_ratio=4.0, num_heads=dim // 128,
                         depth=layers, depth_single_blocks=layers, axes_dim=[16, 56, 56], theta=256,
                         patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, operations=ops)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.01))
    comfy.utils.save_torch_file(m.state_dict(), out)
    """
)


def make_tiny_model(kind: str, out: Path, dim: int = 256, layers: int = 2, tree: Path | None = None) -> Path:
    script = "import sys; sys.argv_real = list(sys.argv)\n" + _MAKE_MODEL
    res = subprocess.run(
        [comfy_python(tree or comfyui_path()), "-c", script, kind, str(out), str(dim), str(layers)],
        cwd=tree or comfyui_path(), capture_output=True, text=True, timeout=300,
    )
    if res.returncode != 0:
        raise RuntimeError(f"making tiny {kind} model failed:\n{res.stderr[-3000:]}")
    return out


def gguf_pack_path() -> Path | None:
    """A ComfyUI-GGUF checkout (city96/ComfyUI-GGUF), from COMFYUI_GGUF_PATH."""
    p = os.environ.get("COMFYUI_GGUF_PATH")
    return Path(p) if p and (Path(p) / "nodes.py").exists() else None


def gguf_skip_reason() -> str | None:
    if gguf_pack_path() is None:
        return "GGUF: set COMFYUI_GGUF_PATH to a ComfyUI-GGUF checkout (city96/ComfyUI-GGUF; see README, Development)"
    for py in {sys.executable, comfy_python()}:
        probe = subprocess.run([py, "-c", "import gguf"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"GGUF: {py} lacks the gguf package (pip install gguf)"
    return None


# Converts a tiny safetensors diffusion model to GGUF the way GGUF Wan files are laid out: 2D
# weights Q8_0 (where rows split into 32-value blocks), 1D tensors F32, the rest F16; tensors of
# more than 4 dims (the patch embedding) flattened, F16, their shape in comfy.gguf.orig_shape.*.
_TO_GGUF = textwrap.dedent(
    """
    import sys, gguf, numpy as np
    from safetensors.numpy import load_file
    src, dst, arch = sys.argv[1:4]
    w = gguf.GGUFWriter(dst, arch=arch)
    Q = gguf.GGMLQuantizationType
    for name, a in load_file(src).items():
        a = a.astype(np.float32)
        qt = Q.F32 if a.ndim == 1 else Q.Q8_0 if a.ndim == 2 and a.shape[-1] % 32 == 0 else Q.F16
        if a.ndim > 4:  # GGUF holds 4 dims: flattened, unquantized (the loader's Conv3d copies it as is)
            w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in a.shape])
            a = a.reshape(a.shape[0], -1)
        w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    """
)


def to_gguf(src: Path, dst: Path, arch: str = "wan") -> Path:
    res = subprocess.run([sys.executable, "-c", _TO_GGUF, str(src), str(dst), arch], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed:\n{res.stderr[-3000:]}")
    return dst


# Test-only nodes: text conditioning without the 5B-parameter text encoders.
TEST_NODES = textwrap.dedent(
    r"""
    import torch

    class VortaTestConditioning:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                                 "pooled": ("BOOLEAN", {"default": False})},
                    "optional": {"clip_vision": ("BOOLEAN", {"default": False})}}
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, seed, tokens, pooled, clip_vision=False):
            import types
            g = torch.Generator().manual_seed(seed)
            extra = {"pooled_output": torch.randn(1, 768, generator=g)} if pooled else {}
            if clip_vision:  # what a CLIP vision encoder hands Wan I2V: 257 tokens x 1280
                extra["clip_vision_output"] = types.SimpleNamespace(
                    penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g) * 0.5)
            return ([[torch.randn(1, tokens, 4096, generator=g) * 0.5, extra]],)

    class VortaTestOverride:
        # sets a logging attention override, as SageAttention-style nodes do (no chaining)
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "counter_file": ("STRING", {"default": ""})},
                    "optional": {"chain": ("BOOLEAN", {"default": False})}}
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, model, counter_file, chain=False):
            m = model.clone()
            prev = m.model_options["transformer_options"].get("optimized_attention_override") if chain else None
            def override(func, *args, **kwargs):
                q, k = args[0], args[1]
                with open(counter_file, "a") as f:
                    f.write(f"{tuple(q.shape)} {tuple(k.shape)} {kwargs.get('skip_reshape', False)}" + chr(10))
                if prev is not None:  # a careful node chains to the override it found
                    return prev(func, *args, **kwargs)
                return func(*args, **kwargs)
            m.model_options["transformer_options"]["optimized_attention_override"] = override
            return (m,)

    class VortaTestReferenceOverride:
        # after VORTA Apply: recomputes every routed self-attention call with vorta_ops' plain
        # references (per head: SDPA, loop core-set, masked-dense sliding tile), from the grid and
        # table VORTA's own hooks put in transformer_options
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, model):
            import sys
            import torch.nn.functional as F
            from vorta_ops.coreset import coreset_reference
            from vorta_ops.sliding_tile import sliding_tile_reference
            # the pack's own token-layout rules (nodes.models of the loaded custom node)
            models = next(mod for name, mod in list(sys.modules.items())
                          if name.endswith("nodes.models") and hasattr(mod, "split_tokens"))
            m = model.clone()
            def override(func, *args, **kwargs):
                to = kwargs["transformer_options"]
                fwd, block = to.get("vorta_forward"), to.pop("vorta_block", None)
                run = to.get("vorta")
                q, k, v = args[:3]
                if fwd is None or block is None or q.shape != k.shape:
                    return func(*args, **kwargs)
                if kwargs.get("skip_reshape", False):
                    qh, kh, vh = q, k, v
                    B, H, L, D = q.shape
                else:
                    B, L, HD = q.shape
                    H = kwargs["heads"]
                    D = HD // H
                    qh, kh, vh = (x.view(B, L, H, D).transpose(1, 2) for x in (q, k, v))
                extra = models.split_tokens(run.spec, fwd.layout, L, fwd.n_grid)
                if extra is None:
                    return func(*args, **kwargs)
                pre, suf = extra
                mask = kwargs.get("mask")
                keep = None
                if mask is not None:  # an additive key-padding mask over the whole sequence
                    keep = (mask.reshape(-1, L) > -1.0).expand(B, L)
                outs = []
                for h, b in enumerate(fwd.table[block].tolist()):
                    s = slice(h, h + 1)
                    if b == 0:
                        am = None if keep is None else keep[:, None, None, :]
                        o = F.scaled_dot_product_attention(qh[:, s], kh[:, s], vh[:, s], attn_mask=am)
                    elif b == 1:
                        o = coreset_reference(qh[:, s], kh[:, s], vh[:, s], fwd.grid, fwd.cfg.coreset, pre, suf, kv_mask=keep).to(q.dtype)
                    else:
                        o = sliding_tile_reference(qh[:, s], kh[:, s], vh[:, s], fwd.grid, fwd.cfg.sliding, pre, suf, kv_mask=keep)
                    outs.append(o)
                out = torch.cat(outs, 1)
                if kwargs.get("skip_output_reshape", False):
                    return out
                return out.transpose(1, 2).reshape(B, L, H * D)
            # marked as VORTA's own override, so VORTA leaves it in place (it re-installs itself
            # over any other override set after Apply)
            override.vorta_state = m.model_options["transformer_options"].get("vorta")
            m.model_options["transformer_options"]["optimized_attention_override"] = override
            return (m,)

    class VortaTestLatent:
        # an empty video latent with any channel count (Wan 2.2 5B uses 48)
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"channels": ("INT", {"default": 16}), "frames": ("INT", {"default": 3}),
                                 "height": ("INT", {"default": 8}), "width": ("INT", {"default": 8})}}
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, channels, frames, height, width):
            return ({"samples": torch.zeros(1, channels, frames, height, width)},)

    NODE_CLASS_MAPPINGS = {"VortaTestConditioning": VortaTestConditioning, "VortaTestOverride": VortaTestOverride,
                           "VortaTestLatent": VortaTestLatent,
                           "VortaTestReferenceOverride": VortaTestReferenceOverride}
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI on 127.0.0.1 with a private base directory."""

    def __init__(self, base: Path, tree: Path | None = None, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.base = base
        self.env = {**os.environ, **(env or {})}
        self.tree = tree or comfyui_path()
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = base / "server.log"

    def prepare(self) -> None:
        cn = self.base / "custom_nodes"
        cn.mkdir(parents=True, exist_ok=True)
        link = cn / "comfyui-vorta"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        (cn / "vorta_test_nodes.py").write_text(TEST_NODES)
        gguf_pack = gguf_pack_path()
        if gguf_pack is not None and not (cn / "ComfyUI-GGUF").exists():
            (cn / "ComfyUI-GGUF").symlink_to(gguf_pack.resolve(), target_is_directory=True)
        for d in ("models/diffusion_models", "models/vorta_routers", "models/loras", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> None:
        self.prepare()
        cmd = [comfy_python(self.tree), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--disable-api-nodes", *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=self.tree, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log.read_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 180) -> dict:
        """Queue a prompt and wait for its history entry; raises with ComfyUI's error if it fails."""
        code, res = self.post("/prompt", {"prompt": prompt, "client_id": "vorta-tests"})
        if code != 200:
            raise PromptRejected(code, res)
        pid = res["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                entry = h[pid]
                if entry["status"].get("status_str") != "success":
                    raise PromptFailed(entry["status"])
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s; log:\n{self.log.read_text()[-3000:]}")


class PromptRejected(Exception):
    def __init__(self, code, body):
        super().__init__(f"/prompt answered {code}: {json.dumps(body)[:2000]}")
        self.code, self.body = code, body


class PromptFailed(Exception):
    def __init__(self, status):
        super().__init__(f"prompt failed: {json.dumps(status)[:3000]}")
        self.status = status


VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a frontend (UI format) workflow into an API prompt, the way the frontend does:
    widget values in schema order (a seed widget carries one extra 'control after generate'
    value), links by input name."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: type {node['type']!r} is not known to this ComfyUI")
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        widgets = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                if name in linked:
                    l = linked[name]
                    inputs[name] = [str(l[1]), l[2]]
                    if kind in WIDGET_TYPES and section == "required":
                        widgets.pop(0)  # a widget converted to an input keeps its slot
                elif kind in WIDGET_TYPES:
                    if not widgets and section == "optional":
                        continue  # a workflow saved before this optional widget existed: its default
                    if not widgets:
                        raise ValueError(f"node {node['id']} ({node['type']}): no widget value left for {name!r}")
                    inputs[name] = widgets.pop(0)
                    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if kind == "INT" and opts.get("control_after_generate"):
                        widgets.pop(0)
        if widgets:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(widgets)} widget values left over: {widgets}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
