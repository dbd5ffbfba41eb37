"""ComfyUI glue of the VORTA pack (V3 node API). Imports ComfyUI; vorta_ops does not."""
