"""Router/model fit check at /prompt time, before anything runs.

ComfyUI validates a node's linked inputs only by type: VORTA Apply's own validation never sees
which model or router is connected, so a router made for another model would otherwise fail only
once sampling starts (after the model has been loaded). Here, an on_prompt handler reads the
prompt graph: for each enabled VORTA Apply it follows the router link to a VORTA Router Loader and
the model link (through nodes that take a MODEL and hand it on, e.g. LoRA or sampling patches) to a
diffusion-model or checkpoint loader, reads the sizes from the two files' headers (no weights
loaded) and, when they do not fit, marks the Apply node so its validation rejects the prompt with
the same message Apply would raise. Model files: .safetensors, and .gguf (ComfyUI-GGUF's Unet
Loader) when the gguf package is installed. Whatever cannot be traced for certain (a merge, a file
name from a link, a missing file or one of another format) is left to the check Apply makes when it
runs.

Pure Python over plain dicts: the class lookup and the file resolver are passed in, so tests run
without ComfyUI.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from vorta_ops.router_io import load_router

from .families import from_header
from .models import ModelSpec
from .providers import as_provider

# inputs["tile"] of a VORTA Apply whose router does not fit: MARK + the message. Only this module
# writes it (into the prompt being validated); Apply's validate_inputs turns it into the error.
MARK = "\u0000vorta-fit-error: "

# loader class -> (models folder, input holding the file name)
LOADERS = {
    "UNETLoader": ("diffusion_models", "unet_name"),
    "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
    "CheckpointLoader": ("checkpoints", "ckpt_name"),
    "ImageOnlyCheckpointLoader": ("checkpoints", "ckpt_name"),
    "UnetLoaderGGUF": ("unet_gguf", "unet_name"),  # ComfyUI-GGUF
    "UnetLoaderGGUFAdvanced": ("unet_gguf", "unet_name"),
}
_MAX_HOPS = 64


def _is_link(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], int)


def _cached(fn):
    """Memoise a path -> value reader on (path, size, mtime): re-read only when the file changes."""
    memo: dict = {}

    def wrapper(path: str):
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in memo:
            if len(memo) > 64:
                memo.clear()
            memo[key] = fn(path)
        return memo[key]

    return wrapper


@_cached
def file_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes from a model file's header (the weights are not read): .safetensors, or .gguf
    when the gguf package (ComfyUI-GGUF's dependency) is installed; None for anything else."""
    if path.endswith(".gguf"):
        return _gguf_shapes(path)
    if not path.endswith((".safetensors", ".sft")):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _gguf_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Shapes as ComfyUI-GGUF's loader sees them: GGUF lists dims innermost first (reversed here),
    and tensors stored flattened keep their shape in a comfy.gguf.orig_shape.<name> field."""
    try:
        import gguf
    except ImportError:
        return None
    reader = gguf.GGUFReader(path)
    shapes = {}
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is not None:
            shapes[t.name] = tuple(int(field.parts[i][0]) for i in field.data)
        else:
            shapes[t.name] = tuple(int(d) for d in reversed(t.shape.tolist()))
    return shapes


@_cached
def router_file(path: str):
    return load_router(path)


def spec_from_shapes(shapes: dict[str, tuple[int, ...]]) -> ModelSpec | None:
    """The ModelSpec of a model file from tensor names and shapes alone: each model family's header
    rules (nodes/families: the rules ComfyUI's model detection uses, e.g. heads = width // 128 and the
    variant by its marker keys), next to that family's detection of model objects. None for anything
    else, and for configurations VORTA refuses (e.g. HunyuanImage 2.1 and its refiner), so Apply
    refuses them when it runs."""
    return from_header(shapes)


def _model_file(prompt: dict, link, passes_model: Callable[[str, int], bool], resolve) -> str | None:
    """Follow a MODEL link up to a loader node; its file's path, or None if not traceable for sure."""
    for _ in range(_MAX_HOPS):
        if not _is_link(link) or link[0] not in prompt:
            return None
        node = prompt[link[0]]
        cls, inputs = node.get("class_type"), node.get("inputs", {})
        if cls in LOADERS:
            folder, key = LOADERS[cls]
            name = inputs.get(key)
            return resolve(folder, name) if link[1] == 0 and isinstance(name, str) else None
        if "model" in inputs and passes_model(cls, link[1]):
            link = inputs["model"]
            continue
        return None
    return None


def _router_file(prompt: dict, link, resolve) -> str | None:
    if not _is_link(link) or link[0] not in prompt:
        return None
    node = prompt[link[0]]
    name = node.get("inputs", {}).get("router_name")
    if node.get("class_type") != "VortaRouterLoader" or not isinstance(name, str):
        return None
    return resolve("vorta_routers", name)


def fit_errors(prompt: dict, passes_model: Callable[[str, int], bool], resolve: Callable[[str, str], str | None]) -> dict[str, str]:
    """{VortaApply node id: error} for the enabled Apply nodes whose router certainly does not fit
    the model. passes_model(class_type, output slot): does that output hand on the node's "model"
    input (the same architecture)? resolve(folder, name): a model file's path or None."""
    errors = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != "VortaApply":
            continue
        inputs = node.get("inputs", {})
        if inputs.get("enabled") is False:
            continue
        rpath = _router_file(prompt, inputs.get("router"), resolve)
        mpath = _model_file(prompt, inputs.get("model"), passes_model, resolve)
        if rpath is None or mpath is None:
            continue
        try:
            shapes = file_shapes(mpath)
            spec = spec_from_shapes(shapes) if shapes is not None else None
            if spec is None:
                continue  # unreadable here, or not Wan / HunyuanVideo: Apply checks when it runs
            as_provider(router_file(rpath)).check_fits(spec)  # the provider's own fit rule
        except ValueError as e:  # check_router_fits' message (or an unreadable router: RouterFileError)
            errors[nid] = str(e)
        except Exception:  # unreadable header etc.: leave it to the check at execution
            logging.debug("VORTA: fit check skipped for node %s", nid, exc_info=True)
    return errors


def mark_prompt(json_data: dict, passes_model, resolve, options_error=None) -> dict:
    """on_prompt handler body: mark the enabled Apply nodes of json_data["prompt"] whose options are
    wrong (options_error(inputs) -> message or None) or whose router does not fit: one message per
    node, in the `tile` input that Apply's validation reads."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    marks = {}
    if options_error is not None:
        for nid, node in prompt.items():
            if isinstance(node, dict) and node.get("class_type") == "VortaApply" and node.get("inputs", {}).get("enabled") is not False:
                msg = options_error(node.get("inputs", {}))
                if msg:
                    marks[nid] = msg
    for nid, msg in fit_errors(prompt, passes_model, resolve).items():
        marks.setdefault(nid, msg)
    for nid, msg in marks.items():
        prompt[nid]["inputs"]["tile"] = MARK + msg
    return json_data


def marked_error(tile) -> str | None:
    """The fit error a marked tile input carries, else None."""
    return tile[len(MARK):] if isinstance(tile, str) and tile.startswith(MARK) else None
