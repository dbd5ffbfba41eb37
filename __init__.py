"""ComfyUI entry point of the VORTA node pack.

ComfyUI imports this file from custom_nodes/. The attention code lives in vorta_ops/ (no ComfyUI
import); the node glue in nodes/ registers through the V3 API once present.
"""
WEB_DIRECTORY = "./web"
