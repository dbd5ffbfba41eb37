"""The pack's ComfyExtension: every node of the pack, registered through the V3 API."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import VortaApply
from .gate_view import VortaGateVisualizer
from .router_loader import VortaRouterLoader, register_folder


class VortaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [VortaRouterLoader, VortaApply, VortaGateVisualizer]


def comfy_entrypoint() -> VortaExtension:
    register_folder()
    return VortaExtension()
