"""VORTA Apply: MODEL + VORTA_ROUTER -> patched MODEL (a clone; the input is never changed)."""
from __future__ import annotations

from comfy_api.latest import io

from .models import inspect_model
from .prompt_check import marked_error
from .patch import TILE_PRESETS, VortaOptions, apply_vorta, parse_blocks, parse_triple
from .router_loader import Router


def build_options(tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent, dense_blocks):
    return VortaOptions(
        tile=tile.strip(),
        window=parse_triple(window, "window"),
        bucket=parse_triple(bucket, "core-set bucket"),
        keep_ratio=keep_ratio,
        similarity=similarity,
        dense_start=dense_start_percent / 100.0,
        dense_end=dense_end_percent / 100.0,
        dense_blocks=parse_blocks(dense_blocks),
    )


class VortaApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaApply",
            display_name="VORTA Apply",
            category="model_patches/vorta",
            description=(
                "Routes each attention head of Wan 2.1/2.2 or HunyuanVideo, per step, to full, sliding-tile "
                "or core-set attention with a VORTA router. Patches a copy of the model; chains to any "
                "attention override already set (e.g. SageAttention serves the full branch)."
            ),
            inputs=[
                io.Model.Input("model"),
                Router.Input("router"),
                io.Boolean.Input("enabled", default=True, tooltip="Off: the model passes through unchanged."),
                io.String.Input("tile", default="official",
                                tooltip="Sliding tile in latent tokens (t,h,w): 'official' (Wan 5,9,8; Hunyuan 6,9,8, as "
                                        "routers were trained), 'aligned' (4,8,8: whole 128-token kernel blocks, fastest), "
                                        "'auto' (near official, least padding for this resolution), or e.g. '4,8,8'."),
                io.String.Input("window", default="3,3,3", tooltip="Sliding window in tiles (t,h,w), odd numbers."),
                io.String.Input("bucket", default="2,3,2", tooltip="Core-set bucket in tokens (t,h,w)."),
                io.Float.Input("keep_ratio", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Share of tokens each core-set bucket keeps (official 0.5)."),
                io.Combo.Input("similarity", options=["auto", "q", "qk"], default="auto",
                               tooltip="Core-set selection source: q (Wan), qk = q and k separately (HunyuanVideo); auto picks per model."),
                io.Float.Input("dense_start_percent", default=0.0, min=0.0, max=100.0, step=1.0,
                               tooltip="Run this share of the schedule's first steps with full attention."),
                io.Float.Input("dense_end_percent", default=0.0, min=0.0, max=100.0, step=1.0,
                               tooltip="Run this share of the schedule's last steps with full attention."),
                io.String.Input("dense_blocks", default="", tooltip="Blocks that always use full attention, e.g. '0,1' or '0-3'."),
            ],
            outputs=[io.Model.Output(tooltip="The model with VORTA routed attention.")],
        )

    @classmethod
    def validate_inputs(cls, tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent, dense_blocks, **_):
        fit = marked_error(tile)  # set at /prompt by prompt_check when the router does not fit
        if fit is not None:
            return fit
        if isinstance(tile, str) and tile.strip() not in TILE_PRESETS:
            try:
                parse_triple(tile, "tile")
            except ValueError as e:
                return f"{e}; or use one of {', '.join(TILE_PRESETS)}"
        try:
            build_options(tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent, dense_blocks)
        except ValueError as e:
            return str(e)
        if dense_start_percent + dense_end_percent > 100:
            return f"dense_start_percent + dense_end_percent is {dense_start_percent + dense_end_percent}, at most 100"
        return True

    @classmethod
    def execute(cls, model, router, enabled, tile, window, bucket, keep_ratio, similarity,
                dense_start_percent, dense_end_percent, dense_blocks) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model)
        options = build_options(tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent, dense_blocks)
        inspect_model(model.model.diffusion_model)  # an unsupported model fails here, with the list
        patched, _ = apply_vorta(model, router, options)
        return io.NodeOutput(patched)
