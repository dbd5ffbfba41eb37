"""The VORTA router: one per transformer block, on the timestep embedding only.

Per block i: logits = Linear_i(SiLU(temb)) with weight [N*H, E], N the number of branches
(branches.BRANCHES: 3); row h*N + e is head h, branch e; probabilities = softmax over the N
branches per head. Inference takes the argmax per head. Branch order (the official one, the
table's ids): 0 = full, 1 = core-set, 2 = sliding tile.

Because the router sees only the timestep embedding, a step's decisions are the same for every
token and prompt: ``decide`` returns one (blocks x heads) table per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .branches import BRANCH_NAMES, BRANCHES, CORESET, FULL, N_BRANCHES, SLIDING

__all__ = ["sinusoidal_embedding", "FULL", "CORESET", "SLIDING", "BRANCH_NAMES", "RouterSet", "decision_shares"]

# FULL, CORESET, SLIDING and BRANCH_NAMES are the branch table's (branches.py), importable here too
FAMILIES = ("wan", "hunyuan", "generic")


@dataclass
class RouterSet:
    """All routers of one model. weight: [blocks, N*heads, embed_dim]; bias: [blocks, N*heads], N the
    number of branches (len(BRANCHES)).

    block_names: the checkpoint key prefix of each block (e.g. "blocks.0"), in block order.
    For HunyuanVideo the 20 dual-stream blocks come first, then the 40 single-stream blocks.
    meta: free-form extra settings (tiles, window, bucket, training notes), strings only.
    """

    family: str
    weight: torch.Tensor
    bias: torch.Tensor
    block_names: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"router family must be one of {FAMILIES}, got {self.family!r}")
        if self.weight.dim() != 3 or self.weight.shape[1] % N_BRANCHES:
            raise ValueError(
                f"router weight must be [blocks, {N_BRANCHES}*heads, embed_dim] ({N_BRANCHES} branches per head), "
                f"got {tuple(self.weight.shape)}"
            )
        if tuple(self.bias.shape) != tuple(self.weight.shape[:2]):
            raise ValueError(
                f"router bias must be [blocks, {N_BRANCHES}*heads] = {tuple(self.weight.shape[:2])}, got {tuple(self.bias.shape)}"
            )
        if not self.block_names:
            self.block_names = [f"blocks.{i}" for i in range(self.blocks)]
        if len(self.block_names) != self.blocks:
            raise ValueError(f"{len(self.block_names)} block names for {self.blocks} blocks")

    @property
    def blocks(self) -> int:
        return self.weight.shape[0]

    @property
    def heads(self) -> int:
        return self.weight.shape[1] // N_BRANCHES

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[2]

    def describe(self) -> str:
        return f"{self.family} router: {self.blocks} blocks x {self.heads} heads, embed dim {self.embed_dim}"

    def probs(self, temb: torch.Tensor) -> torch.Tensor:
        """temb: [E] or [B, E] (sample 0 is used: the timestep is shared by the batch).
        Returns float32 [blocks, heads, N] branch probabilities (N = len(BRANCHES), by branch id)."""
        if temb.dim() == 2:
            temb = temb[0]
        if temb.dim() != 1 or temb.shape[0] != self.embed_dim:
            raise ValueError(
                f"router expects a timestep embedding of size {self.embed_dim}, got shape {tuple(temb.shape)}"
            )
        x = F.silu(temb.float().to(self.weight.device))
        logits = torch.einsum("e,boe->bo", x, self.weight.float()) + self.bias.float()
        return logits.view(self.blocks, self.heads, N_BRANCHES).softmax(-1)

    def decide(self, temb: torch.Tensor) -> torch.Tensor:
        """Hard routing: int8 [blocks, heads] table of branch ids (argmax over the branches)."""
        return self.probs(temb).argmax(-1).to(torch.int8)

    def to(self, device=None, dtype=None) -> "RouterSet":
        return RouterSet(
            self.family, self.weight.to(device, dtype), self.bias.to(device, dtype), list(self.block_names), dict(self.meta)
        )


def sinusoidal_embedding(t, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding [N, dim] (cos half first, then sin; max period 10000), as
    Wan's and HunyuanVideo's time embedders take it. t: scalar or [N] timesteps in 0..1000."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t[:, None] * freqs[None]
    emb = torch.cat((ang.cos(), ang.sin()), dim=-1)
    if dim % 2:
        emb = torch.cat((emb, emb.new_zeros(emb.shape[0], 1)), dim=-1)
    return emb


def decision_shares(table: torch.Tensor) -> dict[str, float]:
    """Share of (block, head) pairs routed to each branch in a decision table, by branch name in
    branch order."""
    n = max(table.numel(), 1)
    return {b.name: float((table == b.id).sum()) / n for b in BRANCHES}
