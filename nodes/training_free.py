"""The training-free router: a RouterProvider that measures each head online instead of reading a
trained router, so any supported model (Wan 2.2, HunyuanVideo 1.5, step-distilled LoRAs) routes
with no router file.

Schedule (on ComfyUI's sampling percent, so split samplers agree):
- warm-up: steps before ``warmup`` (a share of the denoising) run dense, and so does block 0;
- the rest is cut into ``bins`` equal spans of the percent; the first model call of each bin is
  profiled (it runs dense while the profiler measures, per block and head, each sparse branch's
  error on sampled query rows: vorta_ops.profiling), and the bin's later steps route by those
  errors: per head the cheapest branch whose error is <= tau, else full.
Errors, not decisions, are kept (in memory, per grid and bin), so a rerun on the same grid
profiles nothing and a new tau needs no new profile.
"""
from __future__ import annotations

import logging
import weakref

import torch

from vorta_ops.branches import FULL, N_BRANCHES
from vorta_ops.profiling import branch_costs, decide_from_errors, profile_heads, sample_rows

from .models import ModelSpec
from .providers import SharedOnCopy, StepContext

PERCENT_EPS = 1e-3  # as nodes.patch.PERCENT_EPS (ComfyUI's discrete schedules step by 1/999)

__all__ = ["TrainingFreeProvider", "DEFAULT_TAU"]

log = logging.getLogger("vorta")

# The relative error (on the sampled rows) a head may take on its sparse branch. 0.3 keeps the
# synthetic local heads (error ~0.05) on sliding tile and the redundant ones on core-set while a
# random head (errors 1-2.5) stays full; it is the demo's default too (vorta_ops/demo.py).
DEFAULT_TAU = 0.3


class TrainingFreeProvider(SharedOnCopy):
    kind = "training-free"

    def __init__(self, tau: float = DEFAULT_TAU, warmup: float = 0.1, bins: int = 4, rows: int = 256, seed: int = 0,
                 dense_block0: bool = True):
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be a share of the denoising in [0, 1), got {warmup}")
        if bins < 1 or rows < 1:
            raise ValueError(f"bins and rows must be at least 1, got {bins} and {rows}")
        self.tau, self.warmup, self.bins, self.rows, self.seed = float(tau), float(warmup), int(bins), int(rows), int(seed)
        self.dense_block0 = dense_block0
        self.spec: ModelSpec | None = None
        # per diffusion model (one node may feed both Wan 2.2 experts; an entry goes with its model, so a
        # new model at a reused address never sees another's measurements): (grid, bin) -> [blocks, heads, N_BRANCHES]
        self.errors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.profiled_calls = 0  # attention calls profiled so far (tests: a rerun adds none)

    # no fixed size: it measures whichever model it is applied to (every shape comes from the step's spec)
    blocks = 0
    heads = 0

    def describe(self) -> str:
        return (f"training-free router: tau {self.tau:g}, warm-up {self.warmup:.0%}, {self.bins} bins, "
                f"{self.rows} sampled rows")

    def check_fits(self, spec: ModelSpec) -> None:
        """Any supported model fits: the router measures the model it is applied to (nothing is kept)."""

    def bin_of(self, percent: float | None) -> int | None:
        """The step's bin, or None in the warm-up (dense)."""
        if percent is None or percent < self.warmup - PERCENT_EPS:
            return None
        span = (1.0 - self.warmup) / self.bins
        # the same tolerance as dense start/end: a discrete schedule's step at 0.4995 is the 50% step
        return min(max(int((percent - self.warmup + PERCENT_EPS) / span), 0), self.bins - 1)

    @staticmethod
    def _dense(spec: ModelSpec) -> torch.Tensor:
        return torch.full((spec.blocks, spec.heads), FULL, dtype=torch.int8)

    def _measured(self, ctx: StepContext) -> dict:
        return self.errors.setdefault(ctx.diffusion_model, {})

    @staticmethod
    def _key(ctx: StepContext, b: int):
        # measured errors hold for these weights (a LoRA clone shares the diffusion model object), this
        # grid, these branch settings and this span
        return (ctx.weights, ctx.grid, ctx.cfg, b)

    def table(self, ctx: StepContext) -> torch.Tensor:
        b = self.bin_of(ctx.percent)
        errors = self._measured(ctx).get(self._key(ctx, b)) if b is not None else None
        if errors is None:
            return self._dense(ctx.spec)  # warm-up, or this call is being profiled
        table = decide_from_errors(errors, self.tau, branch_costs(ctx.cfg, ctx.grid))
        if self.dense_block0:
            table[0] = FULL
        return table

    def probabilities(self, ctx: StepContext):
        return None

    def measured_errors(self, ctx: StepContext) -> torch.Tensor | None:
        """[blocks, heads, N_BRANCHES] errors behind this step's table (the gate view's "why")."""
        b = self.bin_of(ctx.percent)
        return self._measured(ctx).get(self._key(ctx, b)) if b is not None else None

    def profile_request(self, ctx: StepContext) -> "Profiler | None":
        """A profiler for this model call when it starts a bin not measured yet, else None."""
        b = self.bin_of(ctx.percent)
        if b is None or ctx.grid is None or self._key(ctx, b) in self._measured(ctx):
            return None
        return Profiler(self, self._measured(ctx), self._key(ctx, b), ctx.spec)


class Profiler:
    """Collects one model call's per-block errors; stores them in the provider when it ends."""

    def __init__(self, provider: TrainingFreeProvider, store: dict, key, spec: ModelSpec):
        self.provider, self.store, self.key = provider, store, key
        self.errors = torch.full((spec.blocks, spec.heads, N_BRANCHES), float("nan"))

    def observe(self, block: int, q, k, v, grid, cfg, n_prefix=0, n_suffix=0, kv_mask=None) -> None:
        p = self.provider
        rows = sample_rows(grid, p.rows, n_prefix, p.seed)
        e = profile_heads(q, k, v, grid, cfg, rows.to(q.device), n_prefix, n_suffix, kv_mask)
        # several model calls of one step (cond, uncond): the worst error of each head over them
        self.errors[block] = torch.fmax(self.errors[block], e.float().cpu())
        self.errors[block, :, FULL] = 0.0
        p.profiled_calls += 1

    def finish(self) -> None:
        """Called when the measured step is over (the next step starts, or the run ended normally).
        Kept only when every block was measured: a step cut short (or one whose blocks a cache
        skipped) leaves the span to be measured again."""
        measured = ~torch.isnan(self.errors[..., 1:]).all(-1).all(-1)
        if bool(measured.all()):
            self.store[self.key] = self.errors
            log.info("VORTA: training-free router measured %d blocks for denoising span %d of %d (grid %s)",
                     len(measured), self.key[3] + 1, self.provider.bins, self.key[1])
