"""VORTA Apply: MODEL + VORTA_ROUTER -> patched MODEL (a clone; the input is never changed)."""
from __future__ import annotations

from comfy_api.latest import io

from vorta_ops.dispatch import PRECISIONS

from .models import inspect_model
from .prompt_check import marked_error
from .patch import apply_vorta, build_options, tile_error
from .router_loader import Router


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
                               tooltip="Full attention for the first share of the denoising (ComfyUI sampling percent of each step's noise level, as core's start_percent; split samplers agree)."),
                io.Float.Input("dense_end_percent", default=0.0, min=0.0, max=100.0, step=1.0,
                               tooltip="Full attention for the last share of the denoising (sampling percent of the noise level)."),
                io.String.Input("dense_blocks", default="", tooltip="Blocks that always use full attention, e.g. '0,1' or '0-3'."),
                io.Float.Input("tau_sparse", default=0.3, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Official VORTA rule: a head whose top router probability is below this runs full "
                                       "attention (0.3, the official default, never triggers with three branches)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16", optional=True,
                               tooltip="bf16: every branch in the model's dtype. fp8: the sliding-tile and core-set "
                                       "branches in FP8 (e4m3) Triton kernels, full heads unchanged; needs an sm_89+ "
                                       "GPU (RTX 40xx, L40, H100/H200, RTX 50xx, B200), else it says so once and runs "
                                       "bf16. Check the cost on your prompt with VORTA Fidelity Check."),
            ],
            outputs=[io.Model.Output(tooltip="The model with VORTA routed attention.")],
        )

    @classmethod
    def validate_inputs(cls, tile):
        # Only `tile` is taken on purpose: ComfyUI repeats a validation message once per input the
        # function takes. The other options and the router fit are checked when the prompt is
        # posted (prompt_check's on_prompt handler, which sees the whole node) and handed over in
        # `tile` as one message; execute checks them again for prompts that bypass that handler.
        marked = marked_error(tile)
        if marked is not None:
            return marked
        return tile_error(tile) or True

    @classmethod
    def execute(cls, model, router, enabled, tile, window, bucket, keep_ratio, similarity,
                dense_start_percent, dense_end_percent, dense_blocks, tau_sparse=0.3, precision="bf16") -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model)
        options = build_options(tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent,
                                dense_blocks, tau_sparse, precision)
        inspect_model(model.model.diffusion_model)  # an unsupported model fails here, with the list
        patched, _ = apply_vorta(model, router, options)
        return io.NodeOutput(patched)
