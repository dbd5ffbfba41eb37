"""Router nodes: VORTA Router Loader (a file from models/vorta_routers -> VORTA_ROUTER) and the
VORTA Training-Free Router (no file: it measures the model's heads while it samples)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from vorta_ops.router_io import RouterFileError, load_router

from .training_free import DEFAULT_TAU, TrainingFreeProvider

FOLDER = "vorta_routers"
EXTENSIONS = {".safetensors", ".pt", ".pth"}
Router = io.Custom("VORTA_ROUTER")


def register_folder() -> None:
    """models/vorta_routers with a file filter; keeps paths added by extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    os.makedirs(default, exist_ok=True)


class VortaRouterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaRouterLoader",
            display_name="VORTA Router Loader",
            category="model_patches/vorta",
            description=(
                "Loads VORTA router weights from models/vorta_routers: the official checkpoints "
                "(router.pt from Wenhao-Sun/VORTA, wan-14B/ or hunyuan/) or this pack's .safetensors."
            ),
            inputs=[
                io.Combo.Input("router_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A router file in models/vorta_routers (.safetensors, .pt)."),
            ],
            outputs=[Router.Output(display_name="router")],
        )

    @classmethod
    def execute(cls, router_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, router_name)
        if path is None:
            raise RouterFileError(
                f"router file {router_name!r} is not in models/{FOLDER} (or the extra paths); "
                f"put it there and refresh the page"
            )
        return io.NodeOutput(load_router(path))


class VortaTrainingFreeRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaTrainingFreeRouter",
            display_name="VORTA Training-Free Router",
            category="model_patches/vorta",
            description=(
                "A router that needs no file: at the start of each span of the denoising it measures, per block "
                "and head, how far each sparse branch lands from full attention on sampled query rows, then routes "
                "each head to the cheapest branch within tau (else full). Works for any model VORTA Apply supports."
            ),
            inputs=[
                io.Float.Input("tau", default=DEFAULT_TAU, min=0.0, max=10.0, step=0.05,
                               tooltip="Largest relative error (on the sampled rows) a head may take on a sparse branch; "
                                       "0 = dense everywhere, higher = faster and further from dense."),
                io.Float.Input("warmup_percent", default=10.0, min=0.0, max=99.0, step=1.0,
                               tooltip="The first share of the denoising runs dense (and block 0 always)."),
                io.Int.Input("bins", default=4, min=1, max=50,
                             tooltip="Spans of the rest of the denoising; the first step of each is measured."),
                io.Int.Input("rows", default=256, min=16, max=4096, tooltip="Query rows sampled per head when measuring."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the row sampling (no global RNG)."),
            ],
            outputs=[Router.Output(display_name="router")],
        )

    @classmethod
    def execute(cls, tau, warmup_percent, bins, rows, seed) -> io.NodeOutput:
        return io.NodeOutput(TrainingFreeProvider(tau, warmup_percent / 100.0, bins, rows, seed))
