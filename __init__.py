"""ComfyUI entry point of the VORTA node pack (V3 node API: comfy_entrypoint, no NODE_CLASS_MAPPINGS).

The attention code lives in vorta_ops/ (no ComfyUI import); the node glue in nodes/.
"""
import os
import sys

WEB_DIRECTORY = "./web"

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # so `vorta_ops` imports as a top-level package (nodes/ stays ours:
    # ComfyUI has a top-level `nodes` module of its own, so nodes/ is only imported relatively)
    sys.path.insert(0, _here)

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes.extension import comfy_entrypoint  # noqa: F401
