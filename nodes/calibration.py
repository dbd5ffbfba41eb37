"""VORTA Calibration Report: the training-free router's executed tables against an official router's
on the same steps, written as a small JSON for a bug report (the computation: calibration_data)."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform

import folder_paths
import torch
from comfy_api.latest import io

from .calibration_data import FORMAT, build_report, collect_steps, router_setting, summary_text
from .router_loader import Router

log = logging.getLogger("vorta")


def _versions() -> dict:
    import vorta_ops

    out = {"comfyui-vorta": vorta_ops.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import comfyui_version

        out["comfyui"] = comfyui_version.__version__
    except Exception:  # older trees have no comfyui_version module
        out["comfyui"] = None
    return out


def _options(options) -> dict:
    return {
        "tile": options.tile, "window": list(options.window), "bucket": list(options.bucket),
        "keep_ratio": options.keep_ratio, "similarity": options.similarity, "dense_start": options.dense_start,
        "dense_end": options.dense_end, "dense_blocks": sorted(options.dense_blocks), "tau_sparse": options.tau_sparse,
    }


def _training_free(provider) -> dict:
    out = {"describe": provider.describe(), "kind": getattr(provider, "kind", type(provider).__name__)}
    for k in ("tau", "warmup", "bins", "rows", "seed", "dense_block0", "hysteresis"):
        v = router_setting(provider, k)
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


def _finite(x):
    """JSON-safe: a non-finite float becomes null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def calibration_report(model, official_router) -> dict:
    """The whole report (plain JSON data) for a patched model after its sampling run."""
    steps, costs, ctx = collect_steps(model, official_router)
    state, provider, official = ctx["state"], ctx["provider"], ctx["official"]
    report = {"format": FORMAT, "kind": "vorta-calibration",
              "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "versions": _versions()}
    spec = state.spec
    report["model"] = {"describe": spec.describe(), "family": spec.family, "variant": spec.variant,
                       "class": spec.class_name, "blocks": spec.blocks, "heads": spec.heads}
    r = official.router
    report["official_router"] = {"describe": r.describe(), "family": r.family, "blocks": r.blocks, "heads": r.heads,
                                 "tau_sparse": official.tau_sparse, "meta": dict(r.meta)}
    report["training_free"] = _training_free(provider)
    cfg = ctx["cfg"]
    report["grid"] = list(ctx["grid"])
    report["routed_config"] = {"tile": list(cfg.sliding.tile), "window": list(cfg.sliding.window),
                               "bucket": list(cfg.coreset.bucket), "keep_ratio": cfg.coreset.keep_ratio,
                               "similarity": cfg.coreset.similarity}
    report["branch_costs"] = [float(c) for c in costs]
    report["options"] = _options(state.options)
    report["sigmas"] = [s.sigma for s in steps]
    report.update(build_report(steps, costs, ctx["tau"], margin=ctx["hysteresis"]))
    return report


def reserve_file(filename_prefix: str) -> tuple[str, str, str]:
    """Create an empty <prefix>_<counter>_.json in ComfyUI's output directory, never over an existing
    file (the counter as SaveImage counts it, then the next free one). -> (path, filename, subfolder)."""
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    os.makedirs(folder, exist_ok=True)
    while True:
        filename = f"{name}_{counter:05}_.json"
        path = os.path.join(folder, filename)
        try:
            with open(path, "x", encoding="utf-8"):
                pass
            return path, filename, subfolder
        except FileExistsError:
            counter += 1


class VortaCalibrationReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaCalibrationReport",
            display_name="VORTA Calibration Report",
            category="model_patches/vorta",
            description=(
                "For a model patched with the VORTA Training-Free Router, after it sampled: compares its executed "
                "tables with an official router's on the same steps (3x3 confusion, agreement per step, branch "
                "mixes) and finds the tau whose mix matches the official one; writes a small JSON to attach to a "
                "bug report."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="VORTA Apply's MODEL output, patched with the VORTA Training-Free Router."),
                Router.Input("official_router", tooltip="The official router from VORTA Router Loader."),
                io.String.Input("filename_prefix", default="vorta_calibration",
                                tooltip="JSON file name in the output folder (a counter is added; nothing is overwritten)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Connect the sampler's LATENT so this node runs after the sampling it reports on."),
            ],
            outputs=[io.String.Output(display_name="summary"), io.String.Output(display_name="json")],
        )

    @classmethod
    def fingerprint_inputs(cls, **_):
        return float("nan")  # the last run changes with every sampling

    @classmethod
    def execute(cls, model, official_router, filename_prefix, latent=None) -> io.NodeOutput:
        report = calibration_report(model, official_router)
        path, filename, subfolder = reserve_file(filename_prefix or "vorta_calibration")
        report["file"] = os.path.join(subfolder, filename) if subfolder else filename
        text = json.dumps(_finite(report), indent=1, allow_nan=False)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        summary = summary_text(report)
        log.info("VORTA: calibration report written to %s", path)
        ui_out = {"text": (summary,), "vorta_calibration": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(summary, text, ui=ui_out)
