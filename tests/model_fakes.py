"""Small stand-ins named like ComfyUI's diffusion-model classes (detection keys on class names and
attributes), shared by the model and family tests; no ComfyUI needed."""
from __future__ import annotations

import torch


class WanModel(torch.nn.Module):
    def __init__(self, dim=256, heads=2, blocks=2, freq_dim=32, ref_conv=False):
        super().__init__()
        self.dim, self.num_heads, self.freq_dim, self.patch_size = dim, heads, freq_dim, (1, 2, 2)
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))
        self.time_embedding = torch.nn.Linear(freq_dim, dim)
        self.ref_conv = torch.nn.Conv2d(16, dim, 2, 2) if ref_conv else None


class VaceWanModel(WanModel):
    pass


class CameraWanModel(WanModel):
    pass


class HumoWanModel(WanModel):
    pass


class AnimateWanModel(WanModel):
    pass


class SCAILWanModel(WanModel):
    pass


class WanModel_S2V(WanModel):  # noqa: N801 - ComfyUI's name
    def forward_orig(self, x, transformer_options={}):  # as ComfyUI 0.19.3: the block patch gets the options
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        return blocks_replace[("double_block", 0)]({"img": x, "transformer_options": transformer_options}, {})


class Block(torch.nn.Module):
    def __init__(self, flipped=None):
        super().__init__()
        if flipped is not None:
            self.flipped_img_txt = flipped


class HunyuanVideo(torch.nn.Module):
    def __init__(self, hidden=256, heads=2, double=2, single=3, patch=(1, 2, 2), vector=True, vision=False, flipped=None):
        super().__init__()
        self.hidden_size, self.num_heads, self.patch_size = hidden, heads, list(patch)
        self.double_blocks = torch.nn.ModuleList(Block(flipped) for _ in range(double))
        self.single_blocks = torch.nn.ModuleList(Block() for _ in range(single))
        self.time_in = torch.nn.Linear(256, hidden)
        self.vector_in = torch.nn.Linear(768, hidden) if vector else None
        self.vision_in = torch.nn.Linear(1152, hidden) if vision else None
