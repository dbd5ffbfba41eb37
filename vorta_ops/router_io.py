"""Router files: the official VORTA checkpoints (.pt) and this project's safetensors format.

Official: a torch.save'd state dict (load with weights_only=True) with keys
    Wan:          blocks.{i}.router.linear.weight [N*H, E] / .bias [N*H]  (N = 3 branches, branches.py)
    HunyuanVideo: transformer_blocks.{i}.router.linear.*  (dual-stream, first)
                  single_transformer_blocks.{i}.router.linear.*  (single-stream, after)
Own (.safetensors): tensors "weight" [blocks, N*H, E] and "bias" [blocks, N*H], metadata:
    format=vorta-router, format_version, family, blocks, heads, embed_dim, branch_order (the
    branch table's names by id, comma-separated), block_names (JSON list), meta (JSON object of
    strings).
A safetensors file with official keys (no vorta metadata) loads too.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import torch

from .branches import BRANCH_NAMES, N_BRANCHES
from .router import RouterSet

__all__ = ["RouterFileError", "load_router", "save_router", "convert_router", "router_from_state_dict"]

FORMAT = "vorta-router"
FORMAT_VERSION = "1"
BRANCH_ORDER = ",".join(BRANCH_NAMES)  # written to, and checked in, every file this pack saves
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
    if w0.dim() != 2 or w0.shape[0] % N_BRANCHES:
        raise RouterFileError(
            f"{source}: '{names[0]}.router.linear.weight' has shape {tuple(w0.shape)}; expected "
            f"[{N_BRANCHES}*heads, embed_dim] ({N_BRANCHES} branches per head: {', '.join(BRANCH_NAMES)})"
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
    from .measured import is_measured_file, load_measured

    if is_measured_file(meta):  # a training-free router's measured spans, saved to be shared
        return load_measured(path, meta, tensors)
    if meta.get("format") != FORMAT:
        return router_from_state_dict(tensors, str(path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise RouterFileError(
            f"{path}: router format version {meta.get('format_version')!r} is not supported; "
            f"this version of vorta_ops reads version {FORMAT_VERSION}. Update the pack."
        )
    if meta.get("branch_order", BRANCH_ORDER) != BRANCH_ORDER:
        raise RouterFileError(
            f"{path}: branch order {meta.get('branch_order')!r} (one router logit per branch, in this order), "
            f"expected {BRANCH_ORDER!r}, the branches of this version of vorta_ops (vorta_ops/branches.py)"
        )
    if set(tensors) != {"weight", "bias"}:
        raise RouterFileError(f"{path}: expected tensors 'weight' and 'bias', got {sorted(tensors)}")
    w, b = tensors["weight"], tensors["bias"]
    try:
        declared = {k: int(meta[k]) for k in ("blocks", "heads", "embed_dim")}
        names = json.loads(meta.get("block_names", "[]"))
        extra = json.loads(meta.get("meta", "{}"))
    except (KeyError, ValueError) as e:
        raise RouterFileError(f"{path}: router metadata is incomplete or malformed ({e!r})") from e
    got = {"blocks": w.shape[0], "heads": w.shape[1] // N_BRANCHES if w.dim() == 3 else -1, "embed_dim": w.shape[-1]}
    if w.dim() != 3 or got != declared or w.shape[1] % N_BRANCHES:
        raise RouterFileError(f"{path}: weight shape {tuple(w.shape)} does not match its metadata {declared}")
    try:
        return RouterSet(meta.get("family", "generic"), w, b, names, {str(k): str(v) for k, v in extra.items()})
    except ValueError as e:
        raise RouterFileError(f"{path}: {e}") from e


def _torch_load_failure(e: Exception) -> str:
    """A short reason for a failed weights-only torch.load, without torch's own advice (which
    suggests unsafe loading: never pass that on)."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Unpickler" in text:
        return "its contents are not a plain dict of tensors"
    if "zip archive" in text or "central directory" in text:
        return "its zip archive is broken"
    if isinstance(e, EOFError):
        return "it ends too early"
    return type(e).__name__


def _load_torch(path: Path) -> RouterSet:
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsafe globals
        raise RouterFileError(
            f"{path}: not a router checkpoint - not a readable torch checkpoint ({_torch_load_failure(e)}); "
            f"the file is corrupt, truncated, or another kind of file. Re-download the official VORTA "
            f"router.pt, or pass a router .safetensors made by 'python -m vorta_ops convert'"
        ) from None
    return router_from_state_dict(sd, str(path))


def load_router(path: str | os.PathLike):
    """Load a router from .safetensors (own or official keys; or a measured table, returned as a
    vorta_ops.measured.MeasuredTable) or an official .pt/.pth/.bin -> RouterSet."""
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_torch(path)
    raise RouterFileError(f"{path}: unknown router file type {suffix!r}; expected .safetensors or .pt")


def _atomic_write(dst: Path, write) -> None:
    """write(tmp_path) into a temporary file next to ``dst``, then os.replace it onto ``dst``:
    a failure never leaves a half-written ``dst``, and an old ``dst`` survives until the end."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def save_router(router: RouterSet, path: str | os.PathLike) -> None:
    """Write the project's safetensors format (through a temporary file in the same folder)."""
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
    tensors = {"weight": router.weight.contiguous(), "bias": router.bias.contiguous()}
    path = Path(path)
    try:
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except Exception as e:  # OSError, SafetensorError (permissions, disk full, ...)
        msg = " ".join(str(e).split())
        raise RouterFileError(f"cannot write {path}: {msg or type(e).__name__}") from e


_FAMILY_LABEL = {"wan": "Wan", "hunyuan": "HunyuanVideo", "generic": "generic"}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_destination(src: Path, dst: Path, overwrite: bool, others: tuple[Path, ...] = ()) -> None:
    if _same_file(src, dst):
        raise RouterFileError(
            f"{dst} is the source file {src}; write the converted router to a new .safetensors file"
        )
    for other in others:
        if _same_file(other, dst):
            raise RouterFileError(f"{dst} is the config file {other}; write the converted router to a new .safetensors file")
    if dst.is_dir():
        raise RouterFileError(f"{dst} is a folder; give a file name inside it, e.g. {dst / 'router.safetensors'}")
    if dst.suffix.lower() != ".safetensors":
        raise RouterFileError(
            f"{dst}: convert writes safetensors (a .pt name would hold bytes that nothing reads as .pt); "
            f"use a .safetensors name for the destination, e.g. {dst.with_suffix('.safetensors').name}"
        )
    folder = dst.parent
    if not folder.exists():
        raise RouterFileError(f"destination folder {folder} does not exist; create it first or choose another path")
    if not folder.is_dir():
        raise RouterFileError(f"{folder} is not a folder, so {dst} cannot be written there; choose another path")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise RouterFileError(f"{dst} already exists; pass --force to overwrite it, or choose another name")


_WAN_CLASS = re.compile(r"^Wan[A-Z0-9_]")  # WanTransformer3DModel, ...
_WAN_PATH = re.compile(r"(?:^|[^a-z])wan(?![a-z])", re.I)  # Wan2.1-T2V-14B-Diffusers, wan_14b; not "wang"


def config_family(cfg: dict) -> tuple[str | None, str]:
    """The model family an official train config.json (or a diffusers transformer config) names,
    and the evidence: the transformer class ("name"; diffusers' "_class_name"), else the last
    part of "pretrained_model_path". (None, "") when it names none."""
    for key in ("name", "_class_name"):
        val = cfg.get(key)
        if isinstance(val, str):
            if "hunyuan" in val.lower():
                return "hunyuan", f"{key} {val!r}"
            if _WAN_CLASS.search(val):
                return "wan", f"{key} {val!r}"
    val = cfg.get("pretrained_model_path")
    if isinstance(val, str) and val.strip("/\\"):
        last = re.split(r"[/\\]", val.strip("/\\"))[-1]
        if "hunyuan" in last.lower():
            return "hunyuan", f"pretrained_model_path {val!r}"
        if _WAN_PATH.search(last):
            return "wan", f"pretrained_model_path {val!r}"
    return None, ""


def _check_config_fits(cfg: dict, router: RouterSet, config: Path, src: Path) -> None:
    family, why = config_family(cfg)
    if family is not None and router.family in ("wan", "hunyuan") and family != router.family:
        raise RouterFileError(
            f"{config} is a {_FAMILY_LABEL[family]} config ({why}) but {src} is a "
            f"{_FAMILY_LABEL[router.family]} router (keys '{router.block_names[0]}.router.linear.*'); "
            f"pass the config.json saved with this router"
        )
    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and not isinstance(heads, bool) and heads != router.heads:
        raise RouterFileError(
            f"{config} names {heads} attention heads but {src} routes {router.heads} heads per block; "
            f"pass the config.json saved with this router"
        )
    layers = cfg.get("num_layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        single = cfg.get("num_single_layers", 0)
        blocks = layers + (single if isinstance(single, int) else 0)
        if blocks != router.blocks:
            raise RouterFileError(
                f"{config} names {blocks} transformer blocks but {src} has routers for {router.blocks} blocks; "
                f"pass the config.json saved with this router"
            )


def convert_router(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> RouterSet:
    """Official checkpoint -> own safetensors. ``config``: the official train config.json, whose
    self-attention settings are kept in the metadata; a config that names another model family
    (or other head / block counts) than the router's is refused. ``dst`` must end in .safetensors,
    must not be ``src``, and must not exist unless ``overwrite``; it is written through a
    temporary file, so a failure leaves no partial file (and an old ``dst`` intact)."""
    src, dst = Path(src), Path(dst)
    cfg_path = Path(config) if config is not None else None
    _check_destination(src, dst, overwrite, (cfg_path,) if cfg_path is not None else ())
    router = load_router(src)
    router.meta.setdefault("source", src.name)
    if cfg_path is not None:
        if cfg_path.is_dir():
            raise RouterFileError(f"{cfg_path} is a folder; pass the config.json file inside it")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise RouterFileError(f"{cfg_path}: not a readable JSON config: {' '.join(str(e).split())}") from e
        if not isinstance(cfg, dict):
            raise RouterFileError(
                f"{cfg_path}: expected a JSON object (the official train config.json), got a {type(cfg).__name__}"
            )
        _check_config_fits(cfg, router, cfg_path, src)
        router.meta["official_config"] = json.dumps(cfg.get("self_attention_kwargs", cfg))
    save_router(router, dst)
    return router
