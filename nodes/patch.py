"""The VORTA patch of a ComfyUI model: state on a clone, one attention override, three hooks.

Data flow of one model call (see shared design):
  OUTER_SAMPLE wrapper   a fresh VortaRun per sampling run (records, step cache); summary log.
  DIFFUSION_MODEL wrapper  token grid from the latent, step from the sigmas, routing table from
                         the timestep (router evaluated once per step, shared by cond and uncond);
                         stored in transformer_options[FORWARD_KEY] for the blocks below.
  "dit" block patches    set transformer_options[BLOCK_KEY] = VORTA block index (ComfyUI
                         versions without "block_index"); chain to any patch already there.
  attention override     routes video self-attention of the current block; everything else
                         (cross-attention, text refiner, all-full heads) goes to the previous
                         override or ComfyUI's own backend, unchanged.

Nothing in this module imports ComfyUI at import time; the hook names are ComfyUI's strings.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field

import torch

from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.layout import auto_tile
from vorta_ops.router import BRANCH_NAMES, CORESET, FULL, SLIDING, RouterSet
from vorta_ops.sliding_tile import ALIGNED_TILE, DEFAULT_WINDOW, SlidingTileConfig

from .models import ModelSpec, check_router_fits, inspect_model, prefix_tokens, router_embedding, token_grid

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

    def __post_init__(self):
        if self.tile not in TILE_PRESETS:
            parse_triple(self.tile, "tile")
        SlidingTileConfig((1, 1, 1), self.window)  # validates the window
        CoresetConfig(self.bucket, self.keep_ratio, "q")
        if self.similarity not in ("auto", "q", "qk"):
            raise ValueError(f"similarity must be auto, q or qk, got {self.similarity!r}")
        for name in ("dense_start", "dense_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction of the schedule in [0, 1], got {v}")

    def tile_for(self, spec: ModelSpec, grid) -> tuple[int, int, int]:
        if self.tile == "official":
            return spec.official_tile
        if self.tile == "aligned":
            return ALIGNED_TILE
        if self.tile == "auto":
            return auto_tile(grid, spec.official_tile)
        return parse_triple(self.tile, "tile")

    def routed_config(self, spec: ModelSpec, grid) -> RoutedConfig:
        sim = self.similarity if self.similarity != "auto" else ("qk" if spec.family == "hunyuan" else "q")
        return RoutedConfig(
            SlidingTileConfig(self.tile_for(spec, grid), self.window),
            CoresetConfig(self.bucket, self.keep_ratio, sim),
            self.sliding_backend,
        )


@dataclass
class ForwardInfo:
    grid: tuple[int, int, int]
    n_grid: int
    n_prefix: int
    table: torch.Tensor  # int8 [blocks, heads] as applied (dense overrides included)
    cfg: RoutedConfig
    step: int | None


@dataclass
class StepRecord:
    step: int | None
    sigma: float
    timestep: float
    table: torch.Tensor  # as applied
    routed_calls: dict[str, int] = field(default_factory=lambda: {n: 0 for n in BRANCH_NAMES})
    dense_calls: int = 0  # calls that went to the dense backend in full (all-full heads or not routable)
    fallbacks: int = 0


class VortaState:
    """Held by the patched clone in transformer_options[STATE_KEY]; immutable during sampling."""

    def __init__(self, router: RouterSet, spec: ModelSpec, options: VortaOptions, prev_override=None):
        self.router = router.to("cpu", torch.float32)
        self.spec = spec
        self.options = options
        self.prev_override = prev_override
        self.last_run: VortaRun | None = None

    def new_run(self) -> "VortaRun":
        return VortaRun(self)

    def table_for(self, diffusion_model, t: float, dtype, device) -> torch.Tensor:
        return self.router.decide(router_embedding(diffusion_model, self.spec, t, dtype, device))

    def apply_overrides(self, table: torch.Tensor, step: int | None, n_steps: int | None) -> torch.Tensor:
        table = table.clone()
        o = self.options
        if step is not None and n_steps:
            pct = step / n_steps
            if pct < o.dense_start or (o.dense_end > 0 and pct >= 1.0 - o.dense_end):
                table.fill_(FULL)
        for b in o.dense_blocks:
            table[b] = FULL
        return table


class VortaRun:
    """Per-sampling-run state: routing tables by timestep, and what was executed."""

    def __init__(self, state: VortaState):
        self.state = state
        self.tables: dict[float, torch.Tensor] = {}
        self.steps: dict[int | float, StepRecord] = {}
        self.warned: set[str] = set()
        self.sliding_share = 1.0  # share of keys a sliding-tile query visits (last grid seen)

    @property
    def spec(self) -> ModelSpec:
        return self.state.spec

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("VORTA: %s", msg)

    def summary(self) -> str:
        n = len(self.steps)
        calls = {name: sum(r.routed_calls[name] for r in self.steps.values()) for name in BRANCH_NAMES}
        total = sum(calls.values())
        dense = sum(r.dense_calls for r in self.steps.values())
        fb = sum(r.fallbacks for r in self.steps.values())
        if total == 0:
            s = f"VORTA - {n} steps, no routed attention calls ({dense} dense calls)"
        else:
            shares = ", ".join(f"{k} {v / total * 100:.1f}%" for k, v in calls.items())
            work = _relative_work(self, calls)
            s = f"VORTA - {n} steps, head-calls routed: {shares}; attention work ~{work:.2f}x of dense"
        if fb:
            s += f"; {fb} calls fell back to dense after a kernel error"
        return s


def _relative_work(run: VortaRun, calls: dict[str, int]) -> float:
    """Estimated attention FLOPs vs dense: core-set keep^2, sliding tile its visited-key share."""
    keep = run.state.options.keep_ratio
    work = calls["full"] + calls["coreset"] * keep * keep + calls["sliding_tile"] * run.sliding_share
    return work / max(sum(calls.values()), 1)


def sliding_share(cfg: RoutedConfig, grid) -> float:
    """Share of the grid's key tiles inside one query's window."""
    n = [math.ceil(g / t) for g, t in zip(grid, cfg.sliding.tile)]
    return math.prod(min(w, k) / k for w, k in zip(cfg.sliding.window, n))


# ---- hooks -----------------------------------------------------------------------------------


def _options_of(args, kwargs) -> dict | None:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict) and ("patches" in a or STATE_KEY in a or "sigmas" in a or OVERRIDE_KEY in a):
            return a
    return None


def _named_args(fn, args, kwargs) -> dict:
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop("kwargs", {}) or {})
        return named
    except (TypeError, ValueError):
        return dict(kwargs)


def _step_of(to: dict):
    sigmas, sample = to.get("sigmas"), to.get("sample_sigmas")
    if sigmas is None or sample is None or len(sample) < 2:
        return None, None, float(sigmas[0]) if sigmas is not None else float("nan")
    s = float(sigmas.reshape(-1)[0])
    ss = sample.reshape(-1).float().cpu()
    step = int((ss - s).abs().argmin())
    return min(step, len(ss) - 2), len(ss) - 1, s


def diffusion_model_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: per model call, the grid, the step and the routing table."""
    to = _options_of(args, kwargs)
    run = to.get(STATE_KEY) if to is not None else None
    if not isinstance(run, VortaRun):
        return executor(*args, **kwargs)
    try:
        to[FORWARD_KEY] = _forward_info(run, executor.class_obj, to, args, kwargs)
    except Exception as e:  # a routing set-up failure must not fail the sampling: run dense, say so
        run.warn_once("setup", f"could not set up routing for this model call ({type(e).__name__}: {e}); using dense attention")
        log.debug("VORTA set-up error", exc_info=True)
        return executor(*args, **kwargs)
    try:
        return executor(*args, **kwargs)
    finally:
        to.pop(FORWARD_KEY, None)


def _forward_info(run: VortaRun, dm, to: dict, args, kwargs) -> ForwardInfo:
    """Grid, step and routing table of one model call; records the step."""
    named = _named_args(dm._forward if hasattr(dm, "_forward") else dm.forward, args, kwargs)
    x, timestep = named.get("x", args[0]), named.get("timestep", args[1])
    extra_frames = 0
    tdc = named.get("time_dim_concat")
    if tdc is not None and hasattr(tdc, "shape"):
        extra_frames = tdc.shape[2]
    grid = tuple(int(g) for g in to["grid_sizes"]) if to.get("grid_sizes") is not None else token_grid(run.spec, x.shape, extra_frames)
    step, n_steps, sigma = _step_of(to)
    t = float(timestep.reshape(timestep.shape[0], -1)[0].max()) if torch.is_tensor(timestep) else float(timestep)
    key = round(t, 4)
    if key not in run.tables:
        run.tables[key] = run.state.table_for(dm, t, x.dtype, x.device)
    table = run.state.apply_overrides(run.tables[key], step, n_steps)
    cfg = run.state.options.routed_config(run.spec, grid)
    run.sliding_share = sliding_share(cfg, grid)
    rec_key = step if step is not None else key
    if rec_key not in run.steps:
        run.steps[rec_key] = StepRecord(step, sigma, t, table)
    return ForwardInfo(grid, math.prod(grid), prefix_tokens(run.spec, named), table, cfg, rec_key)


def make_block_patch(index: int, previous=None):
    """A "dit" block replace patch that tags the block index, then runs the block (or the patch
    another node put there before us)."""

    def block_patch(args, extra):
        args["transformer_options"][BLOCK_KEY] = index
        try:
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
        finally:
            args["transformer_options"].pop(BLOCK_KEY, None)

    block_patch.vorta_index = index
    return block_patch


def _block_index(to: dict, spec: ModelSpec) -> int | None:
    if to.get(BLOCK_KEY) is not None:
        return int(to[BLOCK_KEY])
    if to.get("block_index") is not None:  # newer ComfyUI
        idx = int(to["block_index"])
        if spec.family == "hunyuan" and to.get("block_type") == "single":
            idx += sum(1 for k, _ in spec.block_keys if k == "double_block")
        return idx
    return None


def _key_mask(mask, B: int, L: int):
    """ComfyUI attention mask -> bool [B, L] key mask, or "unsupported"."""
    if mask is None:
        return None
    if mask.shape[-2:] != (1, L) and mask.shape[-1] != L:
        return "unsupported"
    m = mask.reshape(-1, L) if mask.numel() in (L, B * L) else None
    if m is None:
        return "unsupported"
    keep = m if m.dtype == torch.bool else m > -1.0  # additive masks: 0 keep, -large drop
    return keep.expand(B, L) if keep.shape[0] == 1 else keep


def vorta_attention_override(state: VortaState, func, *args, **kwargs):
    """ComfyUI optimized_attention_override: route video self-attention, pass the rest on."""
    to = kwargs.get("transformer_options") or {}
    run = to.get(STATE_KEY)
    prev = state.prev_override

    def dense():
        return prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)

    fwd = to.get(FORWARD_KEY)
    if not isinstance(run, VortaRun) or run.state is not state or fwd is None:
        return dense()
    q, k, v = args[:3]
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    skip_reshape = kwargs.get("skip_reshape", False)
    rec = run.steps.get(fwd.step)
    if q.shape != k.shape or q.shape != v.shape:
        return dense()  # cross-attention
    if skip_reshape:
        B, H, L, D = q.shape
        qh, kh, vh = q, k, v
    else:
        B, L, HD = q.shape
        H = int(heads)
        D = HD // H
        qh, kh, vh = (x.view(B, L, H, D).transpose(1, 2) for x in (q, k, v))
    n_extra = L - fwd.n_grid
    if n_extra < 0:
        return dense()  # not the video sequence (e.g. HunyuanVideo's text refiner)
    block = _block_index(to, run.spec)
    if block is None or block >= fwd.table.shape[0] or H != fwd.table.shape[1]:
        run.warn_once("block", f"cannot tell which block is running (block={block}, heads={H}); using dense attention")
        return dense()
    branches = fwd.table[block]
    if bool((branches == FULL).all()):
        if rec is not None:
            rec.dense_calls += 1
        return dense()
    kv_mask = _key_mask(kwargs.get("mask"), B, L)
    if isinstance(kv_mask, str):
        run.warn_once("mask", "an attention mask that is not a key-padding mask; using dense attention for it")
        return dense()
    n_prefix = n_extra if run.spec.family == "wan" else fwd.n_prefix
    n_suffix = n_extra - n_prefix
    dense_kwargs = {kk: vv for kk, vv in kwargs.items() if kk not in ("heads", "skip_reshape", "skip_output_reshape", "_inside_attn_wrapper")}

    def full_fn(qs, ks, vs):
        kw = dict(dense_kwargs, heads=qs.shape[1], skip_reshape=True, skip_output_reshape=True)
        return prev(func, qs, ks, vs, **kw) if prev is not None else func(qs, ks, vs, **kw)

    try:
        out = routed_attention(qh, kh, vh, branches, fwd.grid, fwd.cfg, n_prefix, n_suffix, kv_mask=kv_mask, full_fn=full_fn)
    except Exception as e:  # never a crash of the whole queue, never silent
        run.warn_once("kernel", f"routed attention failed ({type(e).__name__}: {e}); using dense attention for such calls")
        log.debug("VORTA routed attention error", exc_info=True)
        if rec is not None:
            rec.fallbacks += 1
        return dense()
    if rec is not None:
        for b, name in ((FULL, "full"), (CORESET, "coreset"), (SLIDING, "sliding_tile")):
            rec.routed_calls[name] += int((branches == b).sum())
    if kwargs.get("skip_output_reshape", False):
        return out
    return out.transpose(1, 2).reshape(B, L, H * D)


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh VortaRun per sampling run; log a summary at the end."""
    guider = executor.class_obj
    orig = guider.model_options
    state = orig.get("transformer_options", {}).get(STATE_KEY)
    if not isinstance(state, VortaState):
        return executor(*args, **kwargs)
    import comfy.model_patcher

    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    run = state.new_run()
    guider.model_options["transformer_options"][STATE_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        state.last_run = run
        try:
            log.info(run.summary())
        except Exception:  # a summary must never crash a finished run
            log.debug("VORTA summary failed", exc_info=True)


def apply_vorta(model, router: RouterSet, options: VortaOptions):
    """Return a patched clone of a ComfyUI ModelPatcher; the input model is left untouched.

    Everything that can be wrong (model type, router size, options) is checked here, before any
    change, so a failed Apply leaves nothing behind.
    """
    dm = model.model.diffusion_model
    spec = inspect_model(dm)
    check_router_fits(router, spec)
    if options.dense_blocks:
        parse_blocks(",".join(map(str, options.dense_blocks)), spec.blocks)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(OVERRIDE_KEY)
    if getattr(prev, "vorta_state", None) is not None:  # re-applying VORTA: chain to what it chained to
        prev = prev.vorta_state.prev_override
    state = VortaState(router, spec, options, prev)
    to[STATE_KEY] = state
    override = _bound_override(state)
    to[OVERRIDE_KEY] = override
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
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
        return vorta_attention_override(state, func, *args, **kwargs)

    override.vorta_state = state
    return override
