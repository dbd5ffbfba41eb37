"""Router providers: where a step's (blocks x heads) branch table comes from.

A provider is asked once per denoising step (cond and uncond share it) with a StepContext, and
answers with an int8 table of branch ids; where it has them, it also gives per-head branch
probabilities (or, for a measuring router, errors) for the gate view. The patch, the /prompt fit
check and the gate view only talk to this interface, so a router of another kind (training-free,
trained in the pack) plugs in by implementing it; nothing else needs to know where a table came
from.

FileRouterProvider serves router files (official VORTA .pt, the pack's safetensors): one linear
layer per block on the timestep embedding, argmax over branches, and the official ``tau_sparse``
rule (a head whose top-1 probability is below tau runs full attention; the official default 0.3
never triggers with three branches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from vorta_ops.router import FULL, RouterSet

from .models import ModelSpec, check_router_fits, router_embedding

__all__ = ["SharedOnCopy", "StepContext", "RouterProvider", "FileRouterProvider", "as_provider", "OFFICIAL_TAU_SPARSE"]

OFFICIAL_TAU_SPARSE = 0.3


class SharedOnCopy:
    """ComfyUI copies a MODEL's model_options at every patch node (0.3.64 with copy.deepcopy). An
    object VORTA keeps there (the patch state, a run, a router) must stay the one object: the hooks
    were made for it, and a router's measurements are what it is for. Copies return self."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class StepContext:
    """What a provider may read about the step being routed."""

    diffusion_model: object
    spec: ModelSpec
    timestep: float  # the model's timestep input (0..1000)
    sigma: float = float("nan")
    percent: float | None = None  # ComfyUI's sampling percent of the step (0 = start)
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    grid: tuple[int, int, int] | None = None  # the call's latent token grid (a measuring router keys on it)
    cfg: object = None  # the RoutedConfig the table will run with
    weights: object = None  # identity of the model's weight patches (ModelPatcher.patches_uuid: LoRAs)
    # the sampler's schedule, for routers that plan over it (all None outside a ComfyUI sampling run)
    step: int | None = None  # index of this step in the sampler's schedule
    schedule: tuple[float, ...] | None = None  # sampling percent of each step of that schedule
    ends_at_zero: bool = False  # the schedule runs to sigma 0 (its last step is the last of the denoising)
    sigmas: tuple[float, ...] | None = None  # the sampler's sigmas, rounded (a measurement cache key)
    fingerprint: str | None = None  # the weights with their LoRAs and strengths (nodes.fingerprint)
    cfg_scale: float | None = None  # the guider's CFG scale
    total_steps: int | None = None  # steps of the whole schedule this sampler runs a part of (estimated)


@runtime_checkable
class RouterProvider(Protocol):
    kind: str
    blocks: int
    heads: int

    def describe(self) -> str: ...

    def check_fits(self, spec: ModelSpec) -> None:
        """Raise ValueError naming both sides when this router cannot route that model."""

    def table(self, ctx: StepContext) -> torch.Tensor:
        """int8 [blocks, heads] branch ids for the step (before the Apply node's dense overrides)."""

    def probabilities(self, ctx: StepContext) -> torch.Tensor | None:
        """[blocks, heads, branches] per-head scores behind the table, or None."""


class FileRouterProvider(SharedOnCopy):
    kind = "file"

    def __init__(self, router: RouterSet, tau_sparse: float = OFFICIAL_TAU_SPARSE):
        if not 0.0 <= tau_sparse <= 1.0:
            raise ValueError(f"tau_sparse must be a probability in [0, 1], got {tau_sparse}")
        self.router = router.to("cpu", torch.float32)
        self.tau_sparse = float(tau_sparse)

    @property
    def blocks(self) -> int:
        return self.router.blocks

    @property
    def heads(self) -> int:
        return self.router.heads

    def describe(self) -> str:
        return self.router.describe() + (f", tau_sparse {self.tau_sparse:g}" if self.tau_sparse != OFFICIAL_TAU_SPARSE else "")

    def check_fits(self, spec: ModelSpec) -> None:
        check_router_fits(self.router, spec)

    def probabilities(self, ctx: StepContext) -> torch.Tensor:
        temb = router_embedding(ctx.diffusion_model, ctx.spec, ctx.timestep, ctx.dtype, ctx.device)
        return self.router.probs(temb)

    def table(self, ctx: StepContext) -> torch.Tensor:
        return decide(self.probabilities(ctx), self.tau_sparse)


def decide(probs: torch.Tensor, tau_sparse: float) -> torch.Tensor:
    """argmax branch per head; full where the top-1 probability is below tau_sparse (official rule)."""
    top, table = probs.max(-1)
    table = table.to(torch.int8)
    table[top < tau_sparse] = FULL
    return table


def as_provider(router, tau_sparse: float = OFFICIAL_TAU_SPARSE) -> RouterProvider:
    """A provider for what a VORTA_ROUTER socket carries (a RouterSet or a measured table from the
    loader, or a provider)."""
    if isinstance(router, RouterSet):
        return FileRouterProvider(router, tau_sparse)
    from vorta_ops.measured import MeasuredTable

    if isinstance(router, MeasuredTable):
        from .training_free import MeasuredTableProvider

        return MeasuredTableProvider(router)
    if isinstance(router, RouterProvider):
        return router
    raise TypeError(f"expected a VORTA router, got {type(router).__name__}")
