"""The training-free router: a RouterProvider that measures each head online instead of reading a
trained router, so any supported model (Wan 2.2, HunyuanVideo 1.5, step-distilled LoRAs) routes
with no router file.

Schedule (on ComfyUI's sampling percent, so split samplers agree):
- warm-up: steps before ``warmup`` (a share of the denoising) run dense, and so does block 0;
- the rest of the sampler's steps is cut into ``bins`` spans of (nearly) equal step counts, at
  quantiles of the actual schedule; at 8 steps or fewer (distilled schedules) every step is its
  own span and the last step of the denoising runs dense;
- the first step of each span is measured: per block and head, each sparse branch's error on
  sampled query rows (vorta_ops.profiling); that step routes each block by its own errors as soon
  as they are measured, and the span's later steps route by them: per head the cheapest branch
  whose error is <= tau, else full, with hysteresis against flicker between spans (a head keeps its
  previous span's sparse branch while that branch's error stays within tau * (1 + hysteresis)).
Errors, not decisions, are kept: in memory per model object, and on disk (models/vorta_routers/
tables/, vorta_ops.measured.ErrorCache) keyed by the weights' fingerprint (LoRAs and strengths
included), grid, sigmas, CFG, branch options and the profiling version, so a rerun with the same
key measures nothing and a new tau needs no new measurement. The measured spans can be saved as a
router file (MeasuredTable) that the Router Loader loads (MeasuredTableProvider).

Without the sampler's schedule (a model called outside ComfyUI's samplers), the spans are equal
shares of the percent after the warm-up.
"""
from __future__ import annotations

import logging
import weakref

import torch

from vorta_ops.branches import FULL, N_BRANCHES
from vorta_ops.measured import ErrorCache, MeasuredTable, span_key
from vorta_ops.profiling import branch_costs, decide_for_budget, decide_from_errors, profile_heads, sample_rows

from .models import ModelSpec, check_router_fits
from .providers import SharedOnCopy, StepContext

PERCENT_EPS = 1e-3  # as nodes.patch.PERCENT_EPS (ComfyUI's discrete schedules step by 1/999)
DISTILLED_STEPS = 8  # schedules this short: every step its own span, the last one dense

__all__ = ["TrainingFreeProvider", "MeasuredTableProvider", "DEFAULT_TAU", "spans_of_schedule"]

log = logging.getLogger("vorta")

# The relative error (on the sampled rows) a head may take on its sparse branch. 0.3 keeps the
# synthetic local heads (error ~0.05) on sliding tile and the redundant ones on core-set while a
# random head (errors 1-2.5) stays full; it is the demo's default too (vorta_ops/demo.py).
DEFAULT_TAU = 0.3
DEFAULT_HYSTERESIS = 0.1


def spans_of_schedule(schedule, ends_at_zero: bool, warmup: float, bins: int,
                      total_steps: int | None = None) -> list[tuple[int, int]]:
    """(first, last) step indices of each span of a sampler's schedule (sampling percent per step).
    Steps in the warm-up belong to none; when the whole schedule (``total_steps``: a split sampler
    runs a part of it; default this schedule's length) has <= DISTILLED_STEPS steps, each routed
    step is its own span and, when the schedule runs to sigma 0, its last step belongs to none."""
    n = len(schedule)
    routed = [i for i, p in enumerate(schedule) if p >= warmup - PERCENT_EPS]
    if max(n, total_steps or 0) <= DISTILLED_STEPS:
        if ends_at_zero and routed and routed[-1] == n - 1:
            routed = routed[:-1]
        return [(i, i) for i in routed]
    k = min(bins, len(routed))
    spans, at = [], 0
    for j in range(k):
        size = len(routed) // k + (1 if j < len(routed) % k else 0)
        spans.append((routed[at], routed[at + size - 1]))
        at += size
    return spans


MODES = ("quality", "speed")


def _decide(errors, tau, costs, prev, margin, dense_block0: bool, mode: str = "quality", target: float = 1.0) -> torch.Tensor:
    """quality: per head the cheapest branch within tau (hysteresis from prev); speed: the least
    squared error that brings the step's attention work to ``target`` of dense (block 0 counted full
    when it stays dense), no head above tau * 10 (a floor against a random head on a sparse branch;
    tau 0 keeps every head full)."""
    if mode == "speed":
        fixed = None
        if dense_block0:
            fixed = torch.zeros(errors.shape[:-1], dtype=torch.bool)
            fixed[0] = True
        return decide_for_budget(errors, target, costs, max_error=10.0 * tau, fixed=fixed)
    table = decide_from_errors(errors, tau, costs, prev=prev, margin=margin)
    if dense_block0:
        table[0] = FULL
    return table


def decide_chain(cache: dict, chain: list, decide) -> torch.Tensor:
    """The table of the last of ``chain`` (cache keys of consecutive spans, in schedule order), each
    span decided with the previous span's table as its hysteresis reference (the first with none):
    ``decide(key, prev) -> table``. Tables are cached under their keys; returns a copy."""
    prev = None
    for key in chain:
        table = cache.get(key)
        if table is None:
            table = cache[key] = decide(key, prev)
        prev = table
    return prev.clone()


class TrainingFreeProvider(SharedOnCopy):
    kind = "training-free"
    wants_fingerprint = True  # the OUTER_SAMPLE wrapper computes the weights' fingerprint for the disk cache

    def __init__(self, tau: float = DEFAULT_TAU, warmup: float = 0.1, bins: int = 4, rows: int = 256, seed: int = 0,
                 dense_block0: bool = True, cache_dir=None, hysteresis: float = DEFAULT_HYSTERESIS, mode: str = "quality",
                 target: float = 0.4):
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be a share of the denoising in [0, 1), got {warmup}")
        if bins < 1 or rows < 1:
            raise ValueError(f"bins and rows must be at least 1, got {bins} and {rows}")
        if not hysteresis >= 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be a share of dense attention work in (0, 1], got {target}")
        self.mode, self.target = mode, float(target)
        self.tau, self.warmup, self.bins, self.rows, self.seed = float(tau), float(warmup), int(bins), int(rows), int(seed)
        self.dense_block0 = dense_block0
        self.hysteresis = float(hysteresis)
        self.cache = ErrorCache(cache_dir) if cache_dir is not None else None
        # per diffusion model (one node may feed both Wan 2.2 experts; an entry goes with its model, so a
        # new model at a reused address never sees another's measurements):
        # (weights, grid, cfg, span) -> [blocks, heads, N_BRANCHES]
        self.errors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._decisions: dict = {}  # (id(store), key, tau) -> table (decisions are cheap but asked every step)
        self.profiled_calls = 0  # attention calls profiled so far (tests: a rerun adds none)
        self.loaded_spans = 0  # spans found in the disk cache (tests)

    # no fixed size: it measures whichever model it is applied to (every shape comes from the step's spec)
    blocks = 0
    heads = 0

    def describe(self) -> str:
        rule = f"tau {self.tau:g}" if self.mode == "quality" else f"speed: {self.target:.0%} of dense attention work"
        return f"training-free router: {rule}, warm-up {self.warmup:.0%}, {self.bins} bins, {self.rows} sampled rows"

    def check_fits(self, spec: ModelSpec) -> None:
        """Any supported model fits: the router measures the model it is applied to (nothing is kept)."""

    # ---- spans -------------------------------------------------------------------------------
    def bin_of(self, percent: float | None) -> int | None:
        """Without a schedule: the equal-percent span of a step, or None in the warm-up (dense)."""
        if percent is None or percent < self.warmup - PERCENT_EPS:
            return None
        span = (1.0 - self.warmup) / self.bins
        # the same tolerance as dense start/end: a discrete schedule's step at 0.4995 is the 50% step
        return min(max(int((percent - self.warmup + PERCENT_EPS) / span), 0), self.bins - 1)

    def spans(self, ctx: StepContext) -> list[tuple[float, float]] | None:
        """Span keys of the context's schedule, in schedule order (None without a schedule)."""
        if ctx.schedule is None:
            return None
        return [span_key(ctx.schedule[a], ctx.schedule[b])
                for a, b in spans_of_schedule(ctx.schedule, ctx.ends_at_zero, self.warmup, self.bins, ctx.total_steps)]

    def span_of(self, ctx: StepContext):
        """The step's span key, or None where it runs dense (warm-up, a distilled schedule's last step)."""
        if ctx.schedule is None or ctx.step is None:
            b = self.bin_of(ctx.percent)
            return None if b is None else ("percent", b)
        for a, b in spans_of_schedule(ctx.schedule, ctx.ends_at_zero, self.warmup, self.bins, ctx.total_steps):
            if a <= ctx.step <= b:
                return span_key(ctx.schedule[a], ctx.schedule[b])
        return None

    # ---- measurements ------------------------------------------------------------------------
    def _measured(self, ctx: StepContext) -> dict:
        return self.errors.setdefault(ctx.diffusion_model, {})

    @staticmethod
    def _key(ctx: StepContext, span):
        # measured errors hold for these weights (a LoRA clone shares the diffusion model object), this
        # grid, these branch settings, this schedule's noise levels, this CFG and this span: the same
        # fields as the disk key, so a session never reuses what a restart would measure afresh
        return (ctx.weights, ctx.fingerprint, ctx.grid, ctx.cfg, ctx.sigmas, ctx.cfg_scale, span)

    def disk_key(self, ctx: StepContext) -> str | None:
        """The on-disk key of the context's measurements, or None when they are not to be cached
        (no cache folder, no fingerprint, no schedule)."""
        if self.cache is None or ctx.fingerprint is None or ctx.sigmas is None or ctx.grid is None:
            return None
        return ErrorCache.key_text({
            "fingerprint": ctx.fingerprint, "family": ctx.spec.family, "grid": list(ctx.grid),
            "sigmas": list(ctx.sigmas), "cfg_scale": ctx.cfg_scale, "branches": repr(ctx.cfg),
            "rows": self.rows, "seed": self.seed,
        })

    def _errors(self, ctx: StepContext, span) -> torch.Tensor | None:
        store = self._measured(ctx)
        key = self._key(ctx, span)
        found = store.get(key)
        if found is None and not isinstance(span[0], str):
            dk = self.disk_key(ctx)
            if dk is not None:
                loaded = self.cache.load(dk)
                for s, e in loaded.items():
                    if e.shape[:2] == (ctx.spec.blocks, ctx.spec.heads):
                        store.setdefault(self._key(ctx, s), e)
                        self.loaded_spans += 1
                found = store.get(key)
        return found

    def _previous_span(self, ctx: StepContext, span):
        spans = self.spans(ctx)
        if spans is None or span not in spans:
            return None
        i = spans.index(span)
        return spans[i - 1] if i > 0 else None

    def decision(self, ctx: StepContext, span) -> torch.Tensor | None:
        """The span's table at this tau (hysteresis from the previous span's table), or None if the
        span is not measured."""
        if self._errors(ctx, span) is None:
            return None
        spans = [span]  # back to the first measured span of the chain (quality mode keeps hysteresis)
        while self.mode == "quality":
            prev_span = self._previous_span(ctx, spans[-1])
            if prev_span is None or self._errors(ctx, prev_span) is None:
                break
            spans.append(prev_span)
        store = self._measured(ctx)
        keys = {(id(store), self._key(ctx, sp), self.tau, self.hysteresis, self.mode, self.target): sp for sp in spans[::-1]}
        costs = branch_costs(ctx.cfg, ctx.grid)
        return decide_chain(self._decisions, list(keys), lambda ck, prev: _decide(
            self._errors(ctx, keys[ck]), self.tau, costs, prev, self.hysteresis, self.dense_block0, self.mode, self.target))

    def table(self, ctx: StepContext) -> torch.Tensor:
        span = self.span_of(ctx)
        table = self.decision(ctx, span) if span is not None else None
        return table if table is not None else self._dense(ctx.spec)  # warm-up, or this step is being measured

    @staticmethod
    def _dense(spec: ModelSpec) -> torch.Tensor:
        return torch.full((spec.blocks, spec.heads), FULL, dtype=torch.int8)

    def probabilities(self, ctx: StepContext):
        return None

    def measured_errors(self, ctx: StepContext) -> torch.Tensor | None:
        """[blocks, heads, N_BRANCHES] errors behind this step's table (the gate view's "why")."""
        span = self.span_of(ctx)
        return self._errors(ctx, span) if span is not None else None

    def profile_request(self, ctx: StepContext) -> "Profiler | None":
        """A profiler for this model call when it starts a span not measured yet, else None."""
        span = self.span_of(ctx)
        if span is None or ctx.grid is None or self._errors(ctx, span) is not None:
            return None
        return Profiler(self, self._measured(ctx), self._key(ctx, span), ctx)

    def export(self, ctx: StepContext) -> MeasuredTable:
        """The measured spans of the context's schedule as a shareable router (vorta_ops.measured)."""
        spans = self.spans(ctx)
        if not spans:
            raise ValueError("the last run has no schedule with measured spans (was the model sampled by a ComfyUI "
                             "sampler with the training-free router, past its warm-up?)")
        found = [(s, self._errors(ctx, s)) for s in spans]
        found = [(s, e) for s, e in found if e is not None]
        if not found:
            raise ValueError("nothing was measured in the last run (fewer steps than the warm-up, or it was cancelled); "
                             "sample once with the training-free router, then save")
        distilled = max(len(ctx.schedule), ctx.total_steps or 0) <= DISTILLED_STEPS and ctx.ends_at_zero
        meta = {"grid": ",".join(map(str, ctx.grid)), "branches": repr(ctx.cfg), "rows": self.rows, "seed": self.seed,
                "cfg_scale": ctx.cfg_scale, "fingerprint": ctx.fingerprint, "last_dense": "1" if distilled else "0",
                "steps": len(ctx.schedule), "mode": self.mode, "target": self.target}
        return MeasuredTable(ctx.spec.family, [s for s, _ in found], torch.stack([e for _, e in found]).float(),
                             self.tau, self.warmup, self.dense_block0, meta)


class MeasuredTableProvider(SharedOnCopy):
    """A saved measured router (the Router Loader's MeasuredTable): routes a step by the errors of
    the saved span it falls in; dense in the warm-up and where the saved schedule ran dense."""

    kind = "measured"

    def __init__(self, table: MeasuredTable, hysteresis: float = DEFAULT_HYSTERESIS):
        self.measured = table
        self.hysteresis = hysteresis
        self._decisions: dict = {}
        self._checked: set = set()

    @property
    def blocks(self) -> int:
        return self.measured.blocks

    @property
    def heads(self) -> int:
        return self.measured.heads

    def describe(self) -> str:
        return self.measured.describe()

    def check_fits(self, spec: ModelSpec) -> None:
        check_router_fits(self.measured, spec, "measured VORTA router",
                          "Measure this model with the VORTA Training-Free Router and save that instead")

    def _span(self, ctx: StepContext) -> int | None:
        return self.measured.span_index(ctx.percent)

    def decision(self, i: int, ctx: StepContext) -> torch.Tensor:
        meta = self.measured.meta
        mode = meta.get("mode", "quality")
        costs = branch_costs(ctx.cfg, ctx.grid)
        first = 0 if mode == "quality" else i  # speed mode has no hysteresis: no chain to walk
        return decide_chain(self._decisions, [(j, ctx.grid, ctx.cfg) for j in range(first, i + 1)], lambda ck, prev: _decide(
            self.measured.errors[ck[0]], self.measured.tau, costs, prev, self.hysteresis, self.measured.dense_block0, mode,
            float(meta.get("target", 1.0))))

    def _check_context(self, ctx: StepContext) -> None:
        """Warn once per (grid, branch settings) the file was not measured at: its errors are a
        window's and a bucket's at one size, and may not hold at another."""
        key = (ctx.grid, ctx.cfg)
        if key in self._checked:
            return
        self._checked.add(key)
        meta, diffs = self.measured.meta, []
        got = ",".join(map(str, ctx.grid)) if ctx.grid is not None else None
        if meta.get("grid") and got and meta["grid"] != got:
            diffs.append(f"latent grid {got} (it was measured at {meta['grid']})")
        if meta.get("branches") and ctx.cfg is not None and repr(ctx.cfg) != meta["branches"]:
            diffs.append("other branch settings (tile, window, bucket, keep ratio or similarity) than it was measured with")
        if diffs:
            log.warning("VORTA: this measured router routes a run with %s: its decisions may not hold here; measure "
                        "this setting with the VORTA Training-Free Router", "; ".join(diffs))

    def table(self, ctx: StepContext) -> torch.Tensor:
        self._check_context(ctx)
        i = self._span(ctx)
        if i is None:
            return torch.full((self.blocks, self.heads), FULL, dtype=torch.int8)
        return self.decision(i, ctx)

    def probabilities(self, ctx: StepContext):
        return None

    def measured_errors(self, ctx: StepContext) -> torch.Tensor | None:
        i = self._span(ctx)
        return self.measured.errors[i] if i is not None else None


class Profiler:
    """Collects one measured step's per-block errors (over its model calls: cond and uncond may come
    separately); stores them in the provider (memory and disk cache) when the step is over."""

    def __init__(self, provider: TrainingFreeProvider, store: dict, key, ctx: StepContext):
        self.provider, self.store, self.key, self.ctx = provider, store, key, ctx
        self.errors = torch.full((ctx.spec.blocks, ctx.spec.heads, N_BRANCHES), float("nan"))
        self.costs = branch_costs(ctx.cfg, ctx.grid)

    def observe(self, block: int, q, k, v, grid, cfg, n_prefix=0, n_suffix=0, kv_mask=None) -> None:
        p = self.provider
        rows = sample_rows(grid, p.rows, n_prefix, p.seed)
        e = profile_heads(q, k, v, grid, cfg, rows.to(q.device), n_prefix, n_suffix, kv_mask)
        # several model calls of one step (cond, uncond): the worst error of each head over them
        self.errors[block] = torch.fmax(self.errors[block], e.float().cpu())
        self.errors[block, :, FULL] = 0.0
        p.profiled_calls += 1

    def decide(self, block: int) -> torch.Tensor:
        """The block's branches by the errors measured so far in this step (the measured step routes
        too, by its own measurement): int8 [heads]."""
        p = self.provider
        if p.mode == "speed":  # the block's own share of the target (the step's later spans balance it over blocks)
            row = decide_for_budget(self.errors[block], p.target, self.costs, max_error=10.0 * p.tau)
        else:
            row = decide_from_errors(self.errors[block], p.tau, self.costs)
        if p.dense_block0 and block == 0:
            row.fill_(FULL)
        return row

    def finish(self) -> None:
        """Called when the measured step is over (the next step starts, or the run ended normally).
        Kept only when every block was measured: a step cut short (or one whose blocks a cache
        skipped) leaves the span to be measured again."""
        measured = ~torch.isnan(self.errors[..., 1:]).all(-1).all(-1)
        if not bool(measured.all()):
            return
        self.store[self.key] = self.errors
        span = self.key[-1]
        log.info("VORTA: training-free router measured %d blocks for denoising span %s (grid %s)",
                 len(measured), span, self.ctx.grid)
        dk = self.provider.disk_key(self.ctx)
        if dk is not None and not isinstance(span[0], str):
            try:
                self.provider.cache.store(dk, span, self.errors)
            except Exception as e:  # a full disk or a read-only folder must not stop sampling
                log.warning("VORTA: could not keep the measurements on disk (%s: %s); they hold for this session",
                            type(e).__name__, e)
