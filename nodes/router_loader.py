"""VORTA Router Loader: a file from models/vorta_routers -> VORTA_ROUTER."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from vorta_ops.router_io import RouterFileError, load_router

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
