"""Router files: the official VORTA checkpoints (.pt) and this project's safetensors format.

Official: a torch.save'd state dict (load with weights_only=True) with keys
    Wan:          blocks.{i}.router.linear.weight [3*H, E] / .bias [3*H]
    HunyuanVideo: transformer_blocks.{i}.router.linear.*  (dual-stream, first)
                  single_transformer_blocks.{i}.router.linear.*  (single-stream, after)
Own (.safetensors): tensors "weight" [blocks, 3*H, E] and "bias" [blocks, 3*H], metadata:
    format=vorta-router, format_version, family, blocks, heads, embed_dim, branch_order,
    block_names (JSON list), meta (JSON object of strings).
A safetensors file with official keys (no vorta metadata) loads too.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .router import BRANCH_NAMES, RouterSet

__all__ = ["RouterFileError", "load_router", "save_router", "convert_router", "router_from_state_dict"]

FORMAT = "vorta-router"
FORMAT_VERSION = "1"
BRANCH_ORDER = ",".join(BRANCH_NAMES)
_KEY = re.compile(r"(?:^|\.)(single_transformer_blocks|transformer_blocks|blocks)\.(\d+)\.router\.linear\.(weight|bias)$")
# HunyuanVideo order: dual-stream blocks, then single-stream blocks
_GROUP_ORDER = {"blocks": 0, "transformer_blocks": 0, "single_transformer_blocks": 1}
_FAMILY = {"blocks": "wan", "transformer_blocks": "hunyuan", "single_transformer_blocks": "hunyuan"}


class RouterFileError(ValueError):
    """A router file that cannot be used; the message names what was expected and what was found."""


def router_from_state_dict(sd: dict, source: str = "state dict", meta: dict | None = None) -> RouterSet:
    """Build a RouterSet from official-format keys. Every key must be a router key."""
    if not isinstance(sd, dict) or not sd:
        raise RouterFileError(f"{source}: expected a non-empty dict of router tensors, got {type(sd).__name__}")
    entries: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, val in sd.items():
        m = _KEY.search(str(key))
        if m is None or not isinstance(val, torch.Tensor):
            unknown.append(str(key))
            continue
        group, idx, kind = m.group(1), int(m.group(2)), m.group(3)
        entries.setdefault((group, idx), {})[kind] = val
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise RouterFileError(
            f"{source}: {len(unknown)} key(s) are not router keys ({shown}); expected only "
            f"'blocks.{{i}}.router.linear.weight|bias' (Wan) or 'transformer_blocks.{{i}}…' / "
            f"'single_transformer_blocks.{{i}}…' (HunyuanVideo). Is this a VORTA router checkpoint?"
        )
    families = {_FAMILY[g] for g, _ in entries}
    if len(families) > 1:
        raise RouterFileError(f"{source}: mixes Wan ('blocks.*') and HunyuanVideo block keys")
    family = families.pop()
    groups = sorted({g for g, _ in entries}, key=_GROUP_ORDER.get)
    weights, biases, names = [], [], []
    for g in groups:
        idxs = sorted(i for gg, i in entries if gg == g)
        missing = sorted(set(range(idxs[-1] + 1)) - set(idxs))
        if missing:
            raise RouterFileError(f"{source}: {g} indices {missing[:10]} are missing (found 0..{idxs[-1]} with gaps)")
        for i in idxs:
            e = entries[(g, i)]
            for kind in ("weight", "bias"):
                if kind not in e:
                    raise RouterFileError(f"{source}: '{g}.{i}.router.linear.{kind}' is missing")
            weights.append(e["weight"])
            biases.append(e["bias"])
            names.append(f"{g}.{i}")
    w0 = weights[0]
    if w0.dim() != 2 or w0.shape[0] % 3:
        raise RouterFileError(
            f"{source}: '{names[0]}.router.linear.weight' has shape {tuple(w0.shape)}; expected "
            f"[3*heads, embed_dim] (3 branches per head)"
        )
    for name, w, b in zip(names, weights, biases):
        if w.shape != w0.shape:
            raise RouterFileError(
                f"{source}: '{name}.router.linear.weight' has shape {tuple(w.shape)}, expected {tuple(w0.shape)} like block {names[0]}"
            )
        if b.shape != (w0.shape[0],):
            raise RouterFileError(
                f"{source}: '{name}.router.linear.bias' has shape {tuple(b.shape)}, expected ({w0.shape[0]},)"
            )
    return RouterSet(family, torch.stack(weights), torch.stack(biases), names, dict(meta or {}))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise RouterFileError(f"router file not found: {path}")
    if path.is_dir():
        raise RouterFileError(f"{path} is a folder; expected a router file (.safetensors or .pt)")
    if path.stat().st_size == 0:
        raise RouterFileError(f"{path} is empty (0 bytes); re-download or re-convert it")


def _load_safetensors(path: Path) -> RouterSet:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError: corrupt or truncated
        raise RouterFileError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        return router_from_state_dict(tensors, str(path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise RouterFileError(
            f"{path}: router format version {meta.get('format_version')!r} is not supported; "
            f"this version of vorta_ops reads version {FORMAT_VERSION}. Update the pack."
        )
    if meta.get("branch_order", BRANCH_ORDER) != BRANCH_ORDER:
        raise RouterFileError(f"{path}: branch order {meta.get('branch_order')!r}, expected {BRANCH_ORDER!r}")
    if set(tensors) != {"weight", "bias"}:
        raise RouterFileError(f"{path}: expected tensors 'weight' and 'bias', got {sorted(tensors)}")
    w, b = tensors["weight"], tensors["bias"]
    try:
        declared = {k: int(meta[k]) for k in ("blocks", "heads", "embed_dim")}
        names = json.loads(meta.get("block_names", "[]"))
        extra = json.loads(meta.get("meta", "{}"))
    except (KeyError, ValueError) as e:
        raise RouterFileError(f"{path}: router metadata is incomplete or malformed ({e!r})") from e
    got = {"blocks": w.shape[0], "heads": w.shape[1] // 3 if w.dim() == 3 else -1, "embed_dim": w.shape[-1]}
    if w.dim() != 3 or got != declared or w.shape[1] % 3:
        raise RouterFileError(f"{path}: weight shape {tuple(w.shape)} does not match its metadata {declared}")
    try:
        return RouterSet(meta.get("family", "generic"), w, b, names, {str(k): str(v) for k, v in extra.items()})
    except ValueError as e:
        raise RouterFileError(f"{path}: {e}") from e


def _load_torch(path: Path) -> RouterSet:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsafe globals
        raise RouterFileError(
            f"{path}: not a readable torch checkpoint (corrupt, truncated, or not a plain state dict): {e}"
        ) from e
    return router_from_state_dict(sd, str(path))


def load_router(path: str | os.PathLike) -> RouterSet:
    """Load a router from .safetensors (own or official keys) or an official .pt/.pth/.bin."""
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_torch(path)
    raise RouterFileError(f"{path}: unknown router file type {suffix!r}; expected .safetensors or .pt")


def save_router(router: RouterSet, path: str | os.PathLike) -> None:
    """Write the project's safetensors format."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": router.family,
        "blocks": str(router.blocks),
        "heads": str(router.heads),
        "embed_dim": str(router.embed_dim),
        "branch_order": BRANCH_ORDER,
        "block_names": json.dumps(router.block_names),
        "meta": json.dumps(router.meta),
    }
    save_file({"weight": router.weight.contiguous(), "bias": router.bias.contiguous()}, str(path), metadata=meta)


def convert_router(src: str | os.PathLike, dst: str | os.PathLike, config: str | os.PathLike | None = None) -> RouterSet:
    """Official checkpoint -> own safetensors. ``config``: the official train config.json, whose
    self-attention settings are kept in the metadata."""
    router = load_router(src)
    router.meta.setdefault("source", Path(src).name)
    if config is not None:
        try:
            cfg = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise RouterFileError(f"{config}: not a readable JSON config: {e}") from e
        attn = cfg.get("self_attention_kwargs", cfg) if isinstance(cfg, dict) else cfg
        router.meta["official_config"] = json.dumps(attn)
    save_router(router, dst)
    return router
