"""The pack's ComfyExtension: every node of the pack, registered through the V3 API, and the
/prompt-time router fit check (prompt_check)."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .apply import VortaApply
from .calibration import VortaCalibrationReport
from .fidelity import VortaFidelityCheck
from .patch import options_error
from .gate_view import VortaGateVisualizer
from .prompt_check import mark_prompt
from .router_loader import VortaRouterLoader, VortaSaveMeasuredRouter, VortaTrainingFreeRouter, register_folder


class VortaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [VortaRouterLoader, VortaTrainingFreeRouter, VortaSaveMeasuredRouter, VortaApply, VortaGateVisualizer, VortaCalibrationReport, VortaFidelityCheck]


def _passes_model(class_type: str, slot: int) -> bool:
    """Does output `slot` of a node class hand on its MODEL input "model" (LoRA, sampling patches,
    other attention patches)? Read from the class's own input/return types."""
    import nodes as comfy_nodes  # ComfyUI's top-level module (this package's nodes/ is imported relatively)

    cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(class_type)
    try:
        returns = tuple(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES().get("required", {}).get("model")
    except Exception:
        return False
    return slot < len(returns) and returns[slot] == "MODEL" and bool(spec) and spec[0] == "MODEL"


def _on_prompt(json_data):
    import folder_paths

    def resolve(folder, name):
        try:
            return folder_paths.get_full_path(folder, name)
        except Exception:
            return None

    return mark_prompt(json_data, _passes_model, resolve, options_error)


def _register_prompt_check() -> None:
    try:
        from server import PromptServer

        PromptServer.instance.add_on_prompt_handler(_on_prompt)
    except Exception:  # no server (e.g. a script importing ComfyUI): Apply still checks when it runs
        logging.info("VORTA: no PromptServer; the router fit is checked when VORTA Apply runs")


def comfy_entrypoint() -> VortaExtension:
    register_folder()
    _register_prompt_check()
    return VortaExtension()
