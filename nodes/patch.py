"""The VORTA patch of a ComfyUI model: state on a clone, one attention override, three hooks.

Data flow of one model call (see shared design):
  OUTER_SAMPLE wrapper   a fresh VortaRun per sampling run (records, step cache, the noise-level
                         map for dense start/end, the override VORTA hands other calls to);
                         re-installs VORTA's override when a later node replaced it; summary log.
  DIFFUSION_MODEL wrapper  token grid from the latent, step from the sigmas, routing table from
                         the timestep (router evaluated once per step, shared by cond and uncond);
                         stored in transformer_options[FORWARD_KEY] for the blocks below.
  "dit" block patches    set transformer_options[BLOCK_KEY] = VORTA block index (ComfyUI
                         versions without "block_index"); chain to any patch already there.
  attention override     routes video self-attention of the current block (a call made inside one
                         of our block patches); everything else (cross-attention, text refiner,
                         all-full heads) goes to the previous override or ComfyUI's own backend.

ComfyUI clones a MODEL at every patch node after Apply, and a clone copies model_options
(0.3.64 with copy.deepcopy). VortaState and VortaRun therefore copy as themselves: whichever copy
of transformer_options a sampler runs with, it holds the same state the override was made for.

Nothing in this module imports ComfyUI at import time; the hook names are ComfyUI's strings.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from vorta_ops._backends import tensor_version
from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import PRECISIONS, RoutedConfig
from vorta_ops.fp8 import fp8_unsupported_reason
from vorta_ops.layout import auto_tile
from vorta_ops.branches import BRANCH_NAMES, BRANCHES, FULL, relative_work
from vorta_ops.plan import RoutingPlan
from vorta_ops.sliding_tile import ALIGNED_TILE, DEFAULT_WINDOW, SlidingTileConfig

from . import families
from .compiled import STASH_ATTR, register_state, traced_attention
from .models import ModelSpec, call_layout, inspect_model, split_tokens, video_grid
from .providers import SharedOnCopy, StepContext, as_provider

log = logging.getLogger("vorta")

# ComfyUI hook names (comfy.patcher_extension.WrappersMP) and our transformer_options keys
OUTER_SAMPLE = "outer_sample"
DIFFUSION_MODEL = "diffusion_model"
OVERRIDE_KEY = "optimized_attention_override"
STATE_KEY = "vorta"  # VortaState (on the patched clone) / VortaRun (during a run)
FORWARD_KEY = "vorta_forward"  # ForwardInfo of the model call in progress
BLOCK_KEY = "vorta_block"  # VORTA block index, set by our dit patches
WRAPPER_KEY = "vorta"

TILE_PRESETS = ("official", "aligned", "auto")
PERCENT_EPS = 1e-3  # sampling-percent tolerance (ComfyUI's discrete schedules step by 1/999)


def parse_triple(text: str, what: str) -> tuple[int, int, int]:
    parts = [p for p in str(text).replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"{what} must be three positive integers like '3,3,3', got {text!r}")
    return vals  # type: ignore[return-value]


def parse_blocks(text: str, n_blocks: int | None = None) -> frozenset[int]:
    """'0,1,5-7' -> {0, 1, 5, 6, 7}."""
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"dense blocks must be block numbers like '0,1,39' or ranges like '0-3', got {text!r}") from None
    if n_blocks is not None and any(b < 0 or b >= n_blocks for b in out):
        raise ValueError(f"dense blocks {sorted(out)} out of range: the model has blocks 0..{n_blocks - 1}")
    return frozenset(out)


@dataclass(frozen=True)
class VortaOptions:
    tile: str = "official"  # official | aligned | auto | "t,h,w"
    window: tuple[int, int, int] = DEFAULT_WINDOW
    bucket: tuple[int, int, int] = (2, 3, 2)
    keep_ratio: float = 0.5
    similarity: str = "auto"  # auto (per family) | q | qk
    dense_start: float = 0.0  # fraction of the schedule run dense at the start
    dense_end: float = 0.0  # ... and at the end
    dense_blocks: frozenset[int] = frozenset()
    sliding_backend: str = "auto"
    tau_sparse: float = 0.3  # official rule: a head whose top-1 router probability is below it runs full
    precision: str = "bf16"  # bf16 | fp8 (sliding-tile and core-set branches in e4m3; sm_89+ GPUs)

    def __post_init__(self):
        if self.tile not in TILE_PRESETS:
            parse_triple(self.tile, "tile")
        SlidingTileConfig((1, 1, 1), self.window)  # validates the window
        CoresetConfig(self.bucket, self.keep_ratio, "q")
        if self.similarity not in ("auto", "q", "qk"):
            raise ValueError(f"similarity must be auto, q or qk, got {self.similarity!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.tau_sparse <= 1.0:
            raise ValueError(f"tau_sparse must be a probability in [0, 1], got {self.tau_sparse}")
        for name in ("dense_start", "dense_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction of the schedule in [0, 1], got {v}")
        if self.dense_start + self.dense_end > 1.0 + 1e-9:
            raise ValueError(f"dense start + dense end is {(self.dense_start + self.dense_end) * 100:g}% of the schedule, at most 100%")

    def tile_for(self, spec: ModelSpec, grid) -> tuple[int, int, int]:
        if self.tile == "official":
            return spec.official_tile
        if self.tile == "aligned":
            return ALIGNED_TILE
        if self.tile == "auto":
            return auto_tile(grid, spec.official_tile)
        return parse_triple(self.tile, "tile")

    def routed_config(self, spec: ModelSpec, grid) -> RoutedConfig:
        sim = self.similarity if self.similarity != "auto" else families.get(spec.family).similarity
        return RoutedConfig(
            SlidingTileConfig(self.tile_for(spec, grid), self.window),
            CoresetConfig(self.bucket, self.keep_ratio, sim),
            self.sliding_backend,
            precision=self.precision,
        )


def build_options(tile, window, bucket, keep_ratio, similarity, dense_start_percent, dense_end_percent, dense_blocks,
                  tau_sparse=0.3, precision="bf16"):
    return VortaOptions(
        tile=tile.strip(),
        window=parse_triple(window, "window"),
        bucket=parse_triple(bucket, "core-set bucket"),
        keep_ratio=keep_ratio,
        similarity=similarity,
        dense_start=dense_start_percent / 100.0,
        dense_end=dense_end_percent / 100.0,
        dense_blocks=parse_blocks(dense_blocks),
        tau_sparse=tau_sparse,
        precision=precision,
    )


OPTION_INPUTS = ("tile", "window", "bucket", "keep_ratio", "similarity", "dense_start_percent", "dense_end_percent", "dense_blocks")


def tile_error(tile) -> str | None:
    if isinstance(tile, str) and tile.strip() not in TILE_PRESETS:
        try:
            parse_triple(tile, "tile")
        except ValueError as e:
            return f"{e}; or use one of {', '.join(TILE_PRESETS)}"
    return None


def options_error(inputs: dict) -> str | None:
    """What is wrong with a VORTA Apply node's options as posted, in one message; None when they
    are fine or when one comes from a link (then execute checks it)."""
    vals = {n: inputs.get(n) for n in OPTION_INPUTS}
    vals["tau_sparse"] = inputs.get("tau_sparse", 0.3)  # optional input (workflows saved before it)
    if any(v is None or isinstance(v, list) for v in vals.values()):
        return None
    err = tile_error(vals["tile"])
    if err:
        return err
    try:
        total = vals["dense_start_percent"] + vals["dense_end_percent"]
        if total > 100:
            return f"dense_start_percent + dense_end_percent is {total}, at most 100"
        build_options(**vals)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


@dataclass
class ForwardInfo:
    """What the blocks of one model call need: the step's routing plan, this call's token layout."""

    plan: RoutingPlan
    layout: object  # models.CallLayout: where the extra tokens sit in this call's self-attention
    step: int | float | None  # key of the step's StepRecord
    profiler: object = None  # a measuring router's Profiler when this call is to be measured
    route_measured: bool = True  # a measured call routes each block by its own errors (not in a dense step)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.plan.grid

    @property
    def n_grid(self) -> int:
        return self.plan.n_grid

    @property
    def table(self) -> torch.Tensor:  # int8 [blocks, heads] as applied (dense overrides included)
        return self.plan.table

    @property
    def cfg(self) -> RoutedConfig:
        return self.plan.cfg


@dataclass
class StepRecord:
    step: int | None
    sigma: float
    timestep: float
    table: torch.Tensor  # as applied
    head_calls: dict[str, int] = field(default_factory=lambda: {n: 0 for n in BRANCH_NAMES})
    calls: int = 0  # video self-attention calls seen (0: a cache skipped the step's blocks)
    unroutable: int = 0  # video self-attention calls that could not be routed (ran dense)
    fallbacks: int = 0  # routed calls that failed in a kernel and ran dense
    # why the table is what it is, for the gate view: ("probability", [blocks, heads, branches]) from a
    # file router, ("error", same shape) from a measuring router (measured relative error per branch), or None
    scores: tuple | None = None


class VortaState(SharedOnCopy):
    """Held by the patched clone in transformer_options[STATE_KEY]; immutable during sampling."""

    def __init__(self, router, spec: ModelSpec, options: VortaOptions, prev_override=None):
        self.provider = as_provider(router)  # a RouterSet (file router) or any RouterProvider
        self.spec = spec
        self.options = options
        self.prev_override = prev_override
        self.last_run: VortaRun | None = None
        self._configs: dict = {}  # grid -> RoutedConfig
        self.warned_no_run = False
        self.call_options = None  # transformer_options of the model call in progress (compiled.STASH_ATTR)
        self.compile_handle = register_state(self)  # how a compiled graph names this state

    def new_run(self, prev_override=None, percent_of=None) -> "VortaRun":
        return VortaRun(self, prev_override, percent_of)

    def step_context(self, diffusion_model, t: float, dtype, device, sigma=float("nan"), percent=None, grid=None,
                     weights=None, **schedule) -> StepContext:
        """schedule: StepContext's step / schedule / ends_at_zero / sigmas / fingerprint / cfg_scale."""
        cfg = self.routed_config(grid) if grid is not None else None
        return StepContext(diffusion_model, self.spec, t, sigma, percent, dtype, device, grid, cfg, weights, **schedule)

    def table_for(self, diffusion_model, t: float, dtype, device, sigma=float("nan"), percent=None, grid=None) -> torch.Tensor:
        return self.provider.table(self.step_context(diffusion_model, t, dtype, device, sigma, percent, grid))

    def routed_config(self, grid, precision: str | None = None) -> RoutedConfig:
        """The branch configuration for a grid, resolved once per grid ("auto" tile and similarity);
        precision: the options' own, or another (bf16 where fp8 cannot run)."""
        key = (grid, precision)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self.options.routed_config(self.spec, grid)
            if precision is not None and precision != cfg.precision:
                cfg = dataclasses.replace(cfg, precision=precision)
            self._configs[key] = cfg
        return cfg

    def is_dense_step(self, percent: float | None) -> bool:
        """dense_start / dense_end on ComfyUI's sampling percent of the step's noise level (0 at
        the highest noise, 1 at none), so every sampler of a split schedule agrees."""
        o = self.options
        if percent is None:
            return False
        return percent < o.dense_start - PERCENT_EPS or (o.dense_end > 0 and percent >= 1.0 - o.dense_end - PERCENT_EPS)

    def apply_overrides(self, table: torch.Tensor, percent: float | None) -> torch.Tensor:
        table = table.clone()
        if self.is_dense_step(percent):
            table.fill_(FULL)
        for b in self.options.dense_blocks:
            table[b] = FULL
        return table


class VortaRun(SharedOnCopy):
    """Per-sampling-run state: routing tables by timestep, and what was executed."""

    def __init__(self, state: VortaState, prev_override=None, percent_of=None):
        self.state = state
        # the override every call VORTA does not route goes to (the one set before Apply, or one a
        # node after Apply put in place, found when the run starts)
        self.prev_override = prev_override if prev_override is not None else state.prev_override
        self.percent_of = percent_of  # sigma -> ComfyUI sampling percent, or None (then step / steps)
        self.tables: dict[float, torch.Tensor] = {}
        self.steps: dict[int | float, StepRecord] = {}
        self.warned: set[str] = set()
        self.plans: dict = {}  # RoutingPlan cache: one plan per distinct (table, grid, config)
        self.last_plan: RoutingPlan | None = None
        self.delegating = False  # inside a call handed to prev_override (which may chain back to us)
        self.setup_failures = 0  # model calls that ran dense because routing could not be set up
        self.weights = None  # the sampled ModelPatcher's patches_uuid (which LoRAs / weight patches)
        self.fingerprint = None  # nodes.fingerprint of the sampled weights (for routers that cache on disk)
        self.cfg_scale = None  # the guider's CFG scale
        self.schedules: dict = {}  # sample sigmas -> (sampling percent per step, ends at zero)
        self.last_context: StepContext | None = None  # the latest step's context (what a saved table describes)
        self.measured_calls = 0  # steps a measuring router measured (each routes by its own measurement)
        # (timestep key, Profiler) of the step being measured: every model call of that step (cond and
        # uncond may come as separate calls) adds to it; it is kept when the next step starts or the run ends
        self.open_profile = None

    def close_profile(self) -> None:
        if self.open_profile is not None:
            key, profiler = self.open_profile
            profiler.finish()
            for rec in self.steps.values():  # the measured step's own "why", known only now
                if rec.scores is None and round(rec.timestep, 4) == key:
                    rec.scores = ("error", profiler.errors.clone())
            self.open_profile = None

    @property
    def spec(self) -> ModelSpec:
        return self.state.spec

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("VORTA: %s", msg)

    def head_calls(self) -> dict[str, int]:
        """Head-calls of video self-attention per branch, over the run (full includes all-full
        blocks, dense steps and dense blocks: every video self-attention call counts)."""
        return {name: sum(r.head_calls[name] for r in self.steps.values()) for name in BRANCH_NAMES}

    def summary(self) -> str:
        n = len(self.steps)
        calls = self.head_calls()
        total = sum(calls.values())
        fb = sum(r.fallbacks for r in self.steps.values())
        unroutable = sum(r.unroutable for r in self.steps.values())
        if total == 0:
            s = f"VORTA - {n} model steps, no video self-attention calls reached VORTA"
        else:
            shares = ", ".join(f"{k} {v / total * 100:.1f}%" for k, v in calls.items())
            work = _relative_work(self, calls)
            s = f"VORTA - {n} steps, video self-attention head-calls: {shares}; attention work ~{work:.2f}x of dense"
        skipped = sum(1 for r in self.steps.values() if r.calls == 0)
        if skipped and total:
            s += f"; {skipped} steps ran no attention (reused from a cache)"
        if fb:
            s += f"; {fb} calls fell back to dense after a kernel error"
        if unroutable:
            s += f"; {unroutable} calls could not be routed and ran dense"
        if self.setup_failures:
            s += f"; {self.setup_failures} model calls ran dense because routing could not be set up"
        return s

    def check_routed(self) -> None:
        """After the run: a run whose router chose sparse branches but where nothing was routed
        says so, once, as a warning (never a silent dense run)."""
        planned = self.setup_failures > 0 or any(bool((r.table != FULL).any()) for r in self.steps.values())
        calls = self.head_calls()
        routed = sum(calls[b.name] for b in BRANCHES if b.id != FULL)
        if self.measured_calls and routed == 0 and not planned:
            log.warning("VORTA: the training-free router measured %d steps and routed none: no head's sparse branch came "
                        "within tau of full attention (or every routed step was a measured one that ran into the "
                        "warm-up / dense settings); raise tau or lower the warm-up", self.measured_calls)
            return
        if planned and routed == 0:
            if sum(calls.values()) == 0:
                why = ("no self-attention call of the model's transformer blocks reached VORTA's attention override "
                       "(a node after VORTA Apply may have removed it, or this model variant calls attention another way)")
            else:
                why = "every video self-attention call had to run dense (see the warnings above)"
            log.warning("VORTA: this sampling run should have routed attention but ran dense: %s", why)


def _relative_work(run: VortaRun, calls: dict[str, int]) -> float:
    """Estimated attention FLOPs vs dense over the run's head-calls (branch costs of the last plan)."""
    plan = run.last_plan
    if plan is None:
        return 1.0
    return relative_work(calls, plan.cfg, plan.grid)


# ---- hooks -----------------------------------------------------------------------------------


def _options_of(args, kwargs) -> dict | None:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict) and ("patches" in a or STATE_KEY in a or "sigmas" in a or OVERRIDE_KEY in a):
            return a
    return None


@functools.lru_cache(maxsize=64)
def _signature(fn):
    return inspect.signature(fn)


def _named_args(fn, args, kwargs) -> dict:
    """The forward's arguments by name. The signature is read once per function (a bound method
    is a new object on every attribute access: its function is the cache key, self bound first)."""
    if hasattr(fn, "__func__"):
        fn, args = fn.__func__, (fn.__self__, *args)
    try:
        bound = _signature(fn).bind_partial(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop("kwargs", {}) or {})
        return named
    except (TypeError, ValueError):
        return dict(kwargs)


_HOST_SIGMAS = WeakIdKeyDictionary()  # sample_sigmas tensor -> (its version, its values as host floats)


def _host_sigmas(sample: torch.Tensor) -> tuple[float, ...]:
    """sample_sigmas as host floats, read back once per tensor (and version), not once per model call."""
    if torch.compiler.is_compiling():
        return tuple(sample.reshape(-1).float().cpu().tolist())
    found = _HOST_SIGMAS.get(sample)
    version = tensor_version(sample)
    if found is None or found[0] != version:
        found = _HOST_SIGMAS[sample] = (version, tuple(sample.reshape(-1).float().cpu().tolist()))
    return found[1]


def _step_of(to: dict):
    """(step index within this sampler's schedule, its number of steps, sigma)."""
    sigmas, sample = to.get("sigmas"), to.get("sample_sigmas")
    if sigmas is None or sample is None or len(sample) < 2:
        return None, None, float(sigmas.reshape(-1)[0]) if sigmas is not None else float("nan")
    s = float(sigmas.reshape(-1)[0])
    ss = _host_sigmas(sample)
    step = min(range(len(ss)), key=lambda i: abs(ss[i] - s))  # the nearest (first on a tie, as argmin)
    return min(step, len(ss) - 2), len(ss) - 1, s


def sampling_percent(model_sampling, sigma: float) -> float | None:
    """ComfyUI's sampling percent (0 = start of denoising, 1 = end) of a noise level: the inverse
    of model_sampling.percent_to_sigma (monotone), by bisection. None if it cannot be had."""
    p2s = getattr(model_sampling, "percent_to_sigma", None)
    if p2s is None or not math.isfinite(sigma):
        return None
    try:
        if sigma >= float(p2s(1e-9)):
            return 0.0
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if float(p2s(mid)) > sigma:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2
    except Exception:
        log.debug("VORTA: sampling percent unavailable", exc_info=True)
        return None


def _schedule_of(run: VortaRun, to: dict):
    """(sampling percent of each step of this sampler's schedule, whether it runs to sigma 0, its
    sigmas rounded, the step count of the whole schedule it is part of), once per run and schedule;
    (None, False, None, None) without sample_sigmas."""
    sample = to.get("sample_sigmas")
    if sample is None or len(sample) < 2:
        return None, False, None, None
    sigmas = tuple(round(x, 5) for x in _host_sigmas(sample))
    found = run.schedules.get(sigmas)
    if found is None:
        n = len(sigmas) - 1
        percents = tuple(_step_percent(run, s, i, n) for i, s in enumerate(sigmas[:-1]))
        end = 1.0 if sigmas[-1] == 0.0 else _step_percent(run, sigmas[-1], n, n)
        total = None  # the whole schedule's steps, when this sampler runs only a part of it (split samplers)
        if None not in percents and end is not None and end - percents[0] > 1e-6:
            total = max(n, round(n / (end - percents[0])))
        found = run.schedules[sigmas] = (None if None in percents else percents, sigmas[-1] == 0.0, total)
    return found[0], found[1], sigmas, found[2]


def _step_percent(run: VortaRun, sigma: float, step, n_steps) -> float | None:
    if run.percent_of is not None:
        p = run.percent_of(sigma)
        if p is not None:
            return p
    return step / n_steps if step is not None and n_steps else None


@torch.compiler.disable
def _setup_call(run: VortaRun, dm, to: dict, args, kwargs):
    """Grid, step and routing table of one model call, stored in transformer_options[FORWARD_KEY]
    (eager under torch.compile: it reads the step from transformer_options, which compiled graphs
    must not bake in; compiled attention calls find the options through the state). None on failure."""
    setattr(run.state, STASH_ATTR, to)
    try:
        info = to[FORWARD_KEY] = _forward_info(run, dm, to, args, kwargs)
        return info
    except Exception as e:  # a routing set-up failure must not fail the sampling: run dense, say so
        if _is_interrupt(e):
            raise
        run.setup_failures += 1
        run.warn_once("setup", f"could not set up routing for this model call ({type(e).__name__}: {e}); using dense attention")
        log.debug("VORTA set-up error", exc_info=True)
        return None


def diffusion_model_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: per model call, the grid, the step and the routing table."""
    to = _options_of(args, kwargs)
    run = to.get(STATE_KEY) if to is not None else None
    if not isinstance(run, VortaRun):
        if isinstance(run, VortaState) and not run.warned_no_run:  # sampled without ComfyUI's sampler entry point
            run.warned_no_run = True
            log.warning("VORTA: this model was called outside a ComfyUI sampling run (no OUTER_SAMPLE), so it runs "
                        "dense; sample it with a KSampler / SamplerCustom node to route")
        return executor(*args, **kwargs)
    if _setup_call(run, executor.class_obj, to, args, kwargs) is None:
        return executor(*args, **kwargs)
    try:
        return executor(*args, **kwargs)
    finally:
        to.pop(FORWARD_KEY, None)


def _forward_info(run: VortaRun, dm, to: dict, args, kwargs) -> ForwardInfo:
    """Grid, step and routing table of one model call; records the step."""
    named = _named_args(dm._forward if hasattr(dm, "_forward") else dm.forward, args, kwargs)
    x, timestep = named.get("x", args[0]), named.get("timestep", args[1])
    grid = video_grid(run.spec, to, named, x.shape)
    step, n_steps, sigma = _step_of(to)
    t = float(timestep.reshape(timestep.shape[0], -1)[0].max()) if torch.is_tensor(timestep) else float(timestep)
    key = round(t, 4)
    percent = _step_percent(run, sigma, step, n_steps)
    schedule, ends_at_zero, sigmas, total_steps = _schedule_of(run, to)
    ctx = run.last_context = run.state.step_context(
        dm, t, x.dtype, x.device, sigma, percent, grid, run.weights, step=step, schedule=schedule,
        ends_at_zero=ends_at_zero, sigmas=sigmas, fingerprint=run.fingerprint, cfg_scale=run.cfg_scale,
        total_steps=total_steps)
    if run.open_profile is not None and run.open_profile[0] != key:
        run.close_profile()  # the measured step is over: its errors decide the steps from here on
    if key not in run.tables:
        run.tables[key] = run.state.provider.table(ctx)
    profiler = None
    if run.open_profile is not None:  # another model call of the step being measured (e.g. uncond)
        profiler = run.open_profile[1]
    else:
        request = getattr(run.state.provider, "profile_request", None)
        profiler = request(ctx) if request is not None else None
        if profiler is not None:
            run.open_profile = (key, profiler)
            run.measured_calls += 1
    table = run.state.apply_overrides(run.tables[key], percent)
    cfg = run.state.routed_config(grid)
    if cfg.precision == "fp8":
        why = fp8_unsupported_reason(x.device)
        if why is not None:
            run.warn_once("precision", f"precision fp8: {why}; the sparse branches run in bf16 instead")
            cfg = run.state.routed_config(grid, precision="bf16")
    plan = run.last_plan = RoutingPlan.for_step(run.plans, table, grid, cfg)
    rec_key = step if step is not None else key
    if rec_key not in run.steps:
        run.steps[rec_key] = StepRecord(step, sigma, t, table, scores=step_scores(run.state.provider, ctx))
    layout = call_layout(run.spec, named, grid)
    if not getattr(layout, "routable", True):
        run.warn_once("layout", f"this model call cannot be routed ({layout.why})")
    return ForwardInfo(plan, layout, rec_key, profiler, route_measured=not run.state.is_dense_step(percent))


def step_scores(provider, ctx: StepContext) -> tuple | None:
    """What a provider can say about why it chose its table for this step (see StepRecord.scores)."""
    try:
        probs = provider.probabilities(ctx)
        if probs is not None:
            return ("probability", probs.detach().to("cpu", torch.float32))
        errors = getattr(provider, "measured_errors", None)
        errs = errors(ctx) if errors is not None else None
        return ("error", errs.detach().to("cpu", torch.float32)) if errs is not None else None
    except Exception:  # the gate view's detail must never stop a routed step
        log.debug("VORTA: no scores for the gate view", exc_info=True)
        return None


def make_block_patch(index: int, previous=None):
    """A "dit" block replace patch that tags the block index, then runs the block (or the patch
    another node put there before us). Only attention called inside it is video self-attention
    VORTA may route: that is how a call is recognised, by where it comes from."""

    def block_patch(args, extra):
        to = args.get("transformer_options")
        if isinstance(to, dict):  # (a block called without options cannot route: it runs as it is)
            to[BLOCK_KEY] = index
        try:
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
        finally:
            if isinstance(to, dict):
                to.pop(BLOCK_KEY, None)

    block_patch.vorta_index = index
    return block_patch


_KEY_MASKS = WeakIdKeyDictionary()  # ComfyUI mask -> ((version, B, L), key mask)


def _key_mask(mask, B: int, L: int):
    """ComfyUI attention mask -> bool [B, L] key mask, or "unsupported". The same mask object (a
    model call passes one to every block) gives the same key-mask object, made once while the mask
    is unchanged, so the kernels' tables made from it are made once too."""
    if mask is None:
        return None
    found = _KEY_MASKS.get(mask)
    key = (tensor_version(mask), B, L)
    if found is not None and found[0] == key:
        return found[1]
    keep = _derive_key_mask(mask, B, L)
    _KEY_MASKS[mask] = (key, keep)
    return keep


def _derive_key_mask(mask, B: int, L: int):
    if mask.shape[-2:] != (1, L) and mask.shape[-1] != L:
        return "unsupported"
    m = mask.reshape(-1, L) if mask.numel() in (L, B * L) else None
    if m is None:
        return "unsupported"
    keep = m if m.dtype == torch.bool else m > -1.0  # additive masks: 0 keep, -large drop
    return keep.expand(B, L) if keep.shape[0] == 1 else keep


def _delegate(run, prev, func, args, kwargs):
    """Hand a call to the previous override (or ComfyUI's backend). While inside it, a call that
    comes back to VORTA (an override that chains to the one it found, i.e. to us) goes straight to
    the backend instead of looping."""
    if prev is None:
        return func(*args, **kwargs)
    if run is None:
        return prev(func, *args, **kwargs)
    was, run.delegating = run.delegating, True
    try:
        return prev(func, *args, **kwargs)
    finally:
        run.delegating = was


def _count(rec, counts, H: int) -> None:
    """Record one video self-attention call: counts = the plan's heads per branch name for the
    block, or None for a call that ran dense on every head."""
    if rec is None:
        return
    rec.calls += 1
    if counts is None:
        rec.head_calls[BRANCHES[FULL].name] += H
        return
    for name, n in counts.items():
        rec.head_calls[name] += n


@torch.compiler.disable
def vorta_attention_override(state: VortaState, func, *args, **kwargs):
    """ComfyUI optimized_attention_override: route video self-attention, pass the rest on."""
    to = kwargs.get("transformer_options") or {}
    run = to.get(STATE_KEY)
    if not isinstance(run, VortaRun) or run.state is not state:
        prev = state.prev_override
        return prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
    if run.delegating:  # came back through an override that chains to VORTA: it wants the backend
        return func(*args, **kwargs)
    prev = run.prev_override

    def dense():
        return _delegate(run, prev, func, args, kwargs)

    fwd, block = to.get(FORWARD_KEY), to.pop(BLOCK_KEY, None)
    if fwd is None or block is None:
        # not the first attention call inside one of our block patches: a text refiner, a VACE
        # block, the cross-attention or audio attention after a block's self-attention (which,
        # in every supported block, is its first attention call)
        return dense()
    q, k, v = args[:3]
    if q.shape != k.shape or q.shape != v.shape:
        return dense()  # cross-attention
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    skip_reshape = kwargs.get("skip_reshape", False)
    rec = run.steps.get(fwd.step)
    if skip_reshape:
        B, H, L, D = q.shape
        qh, kh, vh = q, k, v
    else:
        B, L, HD = q.shape
        H = int(heads)
        D = HD // H
        qh, kh, vh = (x.view(B, L, H, D).transpose(1, 2) for x in (q, k, v))
    block = int(block)

    def unroutable(key: str, msg: str):
        run.warn_once(key, msg + "; using dense attention for such calls")
        if rec is not None:
            _count(rec, None, H)
            rec.unroutable += 1
        return dense()

    extra = split_tokens(run.spec, fwd.layout, L, fwd.n_grid)
    if extra is None:
        return unroutable("length", f"a self-attention call in block {block} has {L} tokens, which is not the layout "
                                    f"expected around the {fwd.n_grid}-token video grid {fwd.grid} of {run.spec.describe()}")
    n_prefix, n_suffix = extra
    if block >= fwd.table.shape[0] or H != fwd.table.shape[1]:
        return unroutable("block", f"block {block} with {H} heads is outside the router's {fwd.table.shape[0]} blocks x {fwd.table.shape[1]} heads")
    plan, pb = fwd.plan, block  # the plan and its row this call runs
    kv_mask = _key_mask(kwargs.get("mask"), B, L)  # a bool [B, L] key mask, None, or "unsupported"
    if fwd.profiler is not None:  # a measuring router's span start: measure this block's heads, then route by them
        try:
            fwd.profiler.observe(block, qh, kh, vh, fwd.grid, fwd.cfg, n_prefix, n_suffix,
                                 kv_mask if isinstance(kv_mask, torch.Tensor) else None)
            if fwd.route_measured and block not in run.state.options.dense_blocks:
                row = fwd.profiler.decide(block)
                plan, pb = RoutingPlan.for_step(run.plans, row[None], fwd.grid, fwd.cfg), 0
                if rec is not None:
                    if rec.table is fwd.plan.table:  # the record's own copy (the plan's table is a cache key)
                        rec.table = rec.table.clone()
                    rec.table[block] = row
        except Exception as e:
            if _is_interrupt(e):
                raise
            run.warn_once("profile", f"measuring the heads failed ({type(e).__name__}: {e}); those blocks run full")
    if plan.all_full[pb]:
        _count(rec, plan.head_counts[pb], H)
        return dense()
    if isinstance(kv_mask, str):
        return unroutable("mask", "an attention mask that is not a key-padding mask")
    dense_kwargs = {kk: vv for kk, vv in kwargs.items() if kk not in ("heads", "skip_reshape", "skip_output_reshape", "_inside_attn_wrapper")}

    def full_fn(qs, ks, vs):
        kw = dict(dense_kwargs, heads=qs.shape[1], skip_reshape=True, skip_output_reshape=True)
        return _delegate(run, prev, func, (qs, ks, vs), kw)

    try:
        out = plan.run(pb, qh, kh, vh, n_prefix, n_suffix, kv_mask=kv_mask, full_fn=full_fn)
    except Exception as e:  # never a crash of the whole queue, never silent
        if _is_interrupt(e):
            raise
        run.warn_once("kernel", f"routed attention failed ({type(e).__name__}: {e}); using dense attention for such calls")
        log.debug("VORTA routed attention error", exc_info=True)
        if rec is not None:
            _count(rec, None, H)
            rec.fallbacks += 1
        return dense()
    _count(rec, plan.head_counts[pb], H)
    if kwargs.get("skip_output_reshape", False):
        return out
    return out.transpose(1, 2).reshape(B, L, H * D)


def _is_interrupt(e: BaseException) -> bool:
    """ComfyUI's cancel (comfy.model_management.InterruptProcessingException) must reach the
    executor: it is a user's stop, not a routing failure to run dense through."""
    return type(e).__name__ == "InterruptProcessingException"


def _is_ours(override, state: VortaState) -> bool:
    return getattr(override, "vorta_state", None) is state


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh VortaRun per sampling run; log a summary at the end."""
    guider = executor.class_obj
    orig = guider.model_options
    to = orig.get("transformer_options", {})
    state = to.get(STATE_KEY)
    if not isinstance(state, VortaState):
        return executor(*args, **kwargs)
    import comfy.model_patcher

    override = to.get(OVERRIDE_KEY)
    if _is_ours(override, state):
        prev = state.prev_override
    else:
        # a node after VORTA Apply set its own attention override (replacing ours): VORTA still
        # routes video self-attention and hands it everything else, as if it had come first
        prev = override
        if override is not None:
            log.info("VORTA: a node after VORTA Apply set another attention override; VORTA routes video "
                     "self-attention and hands every other call to it")
    model_sampling = None
    try:
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
    except Exception:
        log.debug("VORTA: no model_sampling; dense start/end fall back to step counts", exc_info=True)
    memo: dict[float, float | None] = {}

    def percent_of(sigma: float):
        if sigma not in memo:
            memo[sigma] = sampling_percent(model_sampling, sigma)
        return memo[sigma]

    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    run = state.new_run(prev, percent_of if model_sampling is not None else None)
    run_to = guider.model_options.setdefault("transformer_options", {})
    run_to[STATE_KEY] = run
    run_to[OVERRIDE_KEY] = override if _is_ours(override, state) else _bound_override(state)
    patcher = getattr(guider, "model_patcher", None)
    run.weights = getattr(patcher, "patches_uuid", None)
    cfg_scale = getattr(guider, "cfg", None)
    run.cfg_scale = float(cfg_scale) if isinstance(cfg_scale, (int, float)) else None
    if getattr(state.provider, "wants_fingerprint", False) and patcher is not None:
        from .fingerprint import model_fingerprint

        run.fingerprint = model_fingerprint(patcher)
    finished = False
    try:
        out = executor(*args, **kwargs)
        finished = True
        run.close_profile()  # a run that ran to the end has measured every block of its last measured step
        return out
    finally:
        guider.model_options = orig
        state.last_run = run
        setattr(state, STASH_ATTR, None)
        try:
            log.info(run.summary())
            if finished:  # a cancelled or failed run is no evidence of a hook that never fired
                run.check_routed()
        except Exception:  # a summary must never crash a finished run
            log.debug("VORTA summary failed", exc_info=True)


def apply_vorta(model, router, options: VortaOptions):
    """Return a patched clone of a ComfyUI ModelPatcher; the input model is left untouched.

    Everything that can be wrong (model type, router size, options) is checked here, before any
    change, so a failed Apply leaves nothing behind.
    """
    dm = model.model.diffusion_model
    spec = inspect_model(dm)
    provider = as_provider(router, options.tau_sparse)
    provider.check_fits(spec)
    if options.dense_blocks:
        parse_blocks(",".join(map(str, options.dense_blocks)), spec.blocks)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(OVERRIDE_KEY)
    if getattr(prev, "vorta_state", None) is not None:  # re-applying VORTA: chain to what it chained to
        prev = prev.vorta_state.prev_override
    state = VortaState(provider, spec, options, prev)
    to[STATE_KEY] = state
    override = _bound_override(state)
    to[OVERRIDE_KEY] = override
    for kind, fn in ((OUTER_SAMPLE, outer_sample_wrapper), (DIFFUSION_MODEL, diffusion_model_wrapper)):
        if hasattr(m, "remove_wrappers_with_key"):  # Apply after Apply: the second replaces the first
            m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    replace = to.get("patches_replace", {}).get("dit", {})
    for i, (kind, n) in enumerate(spec.block_keys):
        previous = replace.get((kind, n))
        if getattr(previous, "vorta_index", None) is not None:
            previous = getattr(previous, "vorta_previous", None)
        patch = make_block_patch(i, previous)
        patch.vorta_previous = previous
        m.set_model_patch_replace(patch, "dit", kind, n)
    return m, state


def _bound_override(state: VortaState):
    def override(func, *args, **kwargs):
        if torch.compiler.is_compiling():  # one opaque op per call (compiled.py), not a graph break
            out = traced_attention(state, func, args, kwargs)
            if out is not None:
                return out
        return vorta_attention_override(state, func, *args, **kwargs)

    override.vorta_state = state
    return override
