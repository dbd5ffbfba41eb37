"""Router nodes: VORTA Router Loader (a file from models/vorta_routers -> VORTA_ROUTER), the VORTA
Training-Free Router (no file: it measures the model's heads while it samples, and keeps the
measurements in models/vorta_routers/tables) and VORTA Save Measured Router (the measurements of
a sampled run as a router file the loader loads and others can use)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from vorta_ops.measured import save_measured
from vorta_ops.router_io import RouterFileError, load_router

from .training_free import DEFAULT_TAU, MODES, TrainingFreeProvider

FOLDER = "vorta_routers"
TABLES = "tables"  # subfolder of the first vorta_routers path: the training-free router's measurements
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


def router_files() -> list[str]:
    """Router files in models/vorta_routers, without the training-free router's measurement cache."""
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.replace("\\", "/").split("/")[0] != TABLES]


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
                io.Combo.Input("router_name", options=router_files(),
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
                io.Combo.Input("mode", options=list(MODES), default="quality", optional=True,
                               tooltip="quality: every head within tau of full attention (tau sets the quality). speed: "
                                       "the least error that brings attention down to target_attention_percent of dense "
                                       "(tau * 10 still caps a head's error)."),
                io.Float.Input("target_attention_percent", default=40.0, min=5.0, max=100.0, step=1.0, optional=True,
                               tooltip="speed mode: the attention work to reach, in percent of dense attention."),
                io.Boolean.Input("keep_on_disk", default=True, optional=True,
                                 tooltip=f"Keep the measurements in models/{FOLDER}/{TABLES}, keyed by the model's weights "
                                         "(LoRAs and strengths included), grid, sigmas, CFG and branch settings: a rerun "
                                         "with the same key measures nothing, across restarts too."),
            ],
            outputs=[Router.Output(display_name="router")],
        )

    @classmethod
    def execute(cls, tau, warmup_percent, bins, rows, seed, mode="quality", target_attention_percent=40.0,
                keep_on_disk=True) -> io.NodeOutput:
        cache = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], TABLES) if keep_on_disk else None
        return io.NodeOutput(TrainingFreeProvider(tau, warmup_percent / 100.0, bins, rows, seed, cache_dir=cache, mode=mode,
                                                  target=target_attention_percent / 100.0))


class VortaSaveMeasuredRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaSaveMeasuredRouter",
            display_name="VORTA Save Measured Router",
            category="model_patches/vorta",
            description=(
                "Saves what the training-free router measured in the model's last sampling run (errors per block, "
                f"head and branch for each span of the denoising, and tau) as a router file in models/{FOLDER}: "
                "the Router Loader loads it like a trained router, for this model and grid, with no measuring."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of VORTA Apply fed by the training-free router."),
                io.String.Input("filename", default="measured_router",
                                tooltip=f"File name in models/{FOLDER} (.safetensors is added); an existing file is never "
                                        "replaced: the next free name_00001_ is used instead."),
                io.Latent.Input("latent", optional=True, tooltip="Connect the sampler's output so this runs after it."),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def fingerprint_inputs(cls, **_):
        return float("nan")  # what it saves changes with every sampling run

    @classmethod
    def execute(cls, model, filename, latent=None) -> io.NodeOutput:
        from .patch import STATE_KEY, VortaState

        state = model.model_options.get("transformer_options", {}).get(STATE_KEY)
        if not isinstance(state, VortaState) or not isinstance(state.provider, TrainingFreeProvider):
            raise ValueError("VORTA Save Measured Router needs the MODEL output of a VORTA Apply whose router is the "
                             "VORTA Training-Free Router")
        run = state.last_run
        if run is None or run.last_context is None:
            raise ValueError("this model has not sampled yet: connect the sampler's LATENT to this node's latent input "
                             "so it runs after sampling")
        name = str(filename).strip()
        if not name or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"filename must be a plain file name like 'wan22_5b_720p', got {filename!r}")
        if name.lower().endswith(".safetensors"):
            name = name[: -len(".safetensors")]
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        path = os.path.join(folder, name + ".safetensors")
        n = 0
        while os.path.exists(path):  # never replace a file: a re-queued graph saves name_00001_ and so on
            n += 1
            path = os.path.join(folder, f"{name}_{n:05d}_.safetensors")
        saved = save_measured(state.provider.export(run.last_context), path)
        return io.NodeOutput(str(saved), ui={"text": (f"saved {saved}",)})
