"""The branch table: every attention branch a VORTA router can pick for a head, in one place.

A router's logits for one head are ordered by branch id (the official order: 0 full attention,
1 core-set, 2 sliding tile). Everything that needs to know the branches (the router and its
files, dispatch, the picture, the web widget's payload, the work estimate) reads them from
``BRANCHES`` rather than spelling out "3", the names or the colours itself.

Each ``Branch`` holds:
    id              its position in the router's logits (``BRANCHES[i].id == i``)
    name            the machine name (router files' ``branch_order``, head-call counters, JSON)
    label           the name a person reads (legends)
    colour          (r, g, b) of its cells in the picture and the widget; ``hex`` is "#rrggbb"
    config_type     its settings dataclass (SlidingTileConfig / CoresetConfig), None for full
    config_key      the attribute of dispatch.RoutedConfig holding that config (and, with
                    "_backend" appended, its backend choice); None for full
    reference       the plain torch reference, one signature for all:
                    ``reference(q, k, v, grid, cfg, n_prefix=0, n_suffix=0, *, kv_mask=None,
                    scale=None) -> [B, H, L, D]`` (full ignores grid and cfg); tiny sizes only
    backends        names of the implementations registered now (read when asked: the Triton
                    kernels register at import time, only where they can run); "auto" is not one
    relative_cost   ``(config, grid) -> share of dense attention FLOPs`` of one head call
    differentiable  whether its torch path has autograd w.r.t. q, k, v in eager mode (the Triton
                    kernels and the torch.library custom ops used under torch.compile are
                    forward-only; the core-set selection itself is discrete, the gradient flows
                    through the kept tokens)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import coreset as _coreset
from . import sliding_tile as _sliding
from .coreset import CoresetConfig, coreset_reference
from .full import FLASH_ATTN_AVAILABLE
from .layout import check_grid
from .sliding_tile import SlidingTileConfig, sliding_tile_reference

__all__ = [
    "Branch",
    "BRANCHES",
    "BRANCH_NAMES",
    "BRANCH_LABELS",
    "BRANCH_COLOURS",
    "N_BRANCHES",
    "FULL",
    "CORESET",
    "SLIDING",
    "branch",
    "branch_config",
    "full_reference",
    "relative_work",
]

RGB = tuple[int, int, int]


def full_reference(q, k, v, grid=None, cfg=None, n_prefix: int = 0, n_suffix: int = 0, *, kv_mask=None, scale=None):
    """Dense attention written out (float64 softmax of q k^T * scale, then @ v), in q's dtype.
    grid, cfg, n_prefix and n_suffix are accepted for the common reference signature and unused:
    every token attends to every key (but the masked ones)."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q.double() @ k.double().transpose(-1, -2)) * s
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def _full_cost(cfg, grid) -> float:
    return 1.0


def _coreset_cost(cfg: CoresetConfig, grid) -> float:
    """keep_ratio of the queries against keep_ratio of the keys."""
    return float(cfg.keep_ratio) ** 2


def _sliding_cost(cfg: SlidingTileConfig, grid) -> float:
    """Share of the grid's key tiles inside one query's window (per axis: the window's tiles, at
    most all of them, over the tiles of that axis)."""
    n = [math.ceil(g / t) for g, t in zip(check_grid(grid), cfg.tile)]
    return math.prod(min(w, k) / k for w, k in zip(cfg.window, n))


def _full_backends() -> tuple[str, ...]:
    return ("sdpa",) + (("flash_attn",) if FLASH_ATTN_AVAILABLE else ())


def _registry_names(module) -> Callable[[], tuple[str, ...]]:
    """The names in a branch module's backend registry, looked up when called (so backends
    registered later, and a registry that moves, are seen)."""

    def names() -> tuple[str, ...]:
        return tuple(sorted(module._BACKENDS.fns))

    return names


@dataclass(frozen=True)
class Branch:
    id: int
    name: str
    label: str
    colour: RGB
    config_type: type | None
    config_key: str | None
    reference: Callable[..., torch.Tensor] = field(repr=False)
    relative_cost: Callable[[Any, Any], float] = field(repr=False)
    differentiable: bool
    _backend_names: Callable[[], tuple[str, ...]] = field(repr=False, compare=False)

    @property
    def backends(self) -> tuple[str, ...]:
        """Names of the implementations available now (sorted; without "auto")."""
        return self._backend_names()

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colour)

    def default_config(self):
        """A config of the default settings (None for full)."""
        return self.config_type() if self.config_type is not None else None


BRANCHES: tuple[Branch, ...] = (
    Branch(
        0, "full", "full", (213, 94, 0), None, None, full_reference, _full_cost, True, _full_backends,
    ),
    Branch(
        1, "coreset", "core-set", (0, 114, 178), CoresetConfig, "coreset", coreset_reference, _coreset_cost, True,
        _registry_names(_coreset),
    ),
    Branch(
        2, "sliding_tile", "sliding tile", (0, 158, 115), SlidingTileConfig, "sliding", sliding_tile_reference,
        _sliding_cost, True, _registry_names(_sliding),
    ),
)
N_BRANCHES = len(BRANCHES)
BRANCH_NAMES: tuple[str, ...] = tuple(b.name for b in BRANCHES)
BRANCH_LABELS: tuple[str, ...] = tuple(b.label for b in BRANCHES)
BRANCH_COLOURS: tuple[RGB, ...] = tuple(b.colour for b in BRANCHES)

_BY_NAME = {b.name: b for b in BRANCHES}


def branch(id_or_name) -> Branch:
    """The branch with this id (int, or a 0-d integer tensor) or name ("full", "coreset",
    "sliding_tile"; the labels "core-set", "sliding tile" are accepted too)."""
    if isinstance(id_or_name, str):
        b = _BY_NAME.get(id_or_name) or next((x for x in BRANCHES if x.label == id_or_name), None)
        if b is None:
            raise ValueError(f"unknown branch {id_or_name!r}; expected one of {list(BRANCH_NAMES)}")
        return b
    if isinstance(id_or_name, torch.Tensor) and id_or_name.numel() == 1:
        id_or_name = id_or_name.item()
    if isinstance(id_or_name, bool) or not isinstance(id_or_name, int) or not 0 <= id_or_name < N_BRANCHES:
        raise ValueError(
            f"unknown branch id {id_or_name!r}; expected one of "
            + ", ".join(f"{b.id} ({b.name})" for b in BRANCHES)
        )
    return BRANCHES[id_or_name]


FULL, CORESET, SLIDING = (branch(n).id for n in ("full", "coreset", "sliding_tile"))


def branch_config(b: Branch, configs=None):
    """The config of branch ``b`` among ``configs``: a dispatch.RoutedConfig (or anything with
    the branches' ``config_key`` attributes), a mapping by branch name or id, a single config
    of the branch's type, or None (the defaults). None for full."""
    if b.config_type is None:
        return None
    cfg = None
    if isinstance(configs, b.config_type):
        cfg = configs
    elif isinstance(configs, Mapping):
        cfg = configs.get(b.name, configs.get(b.id))
    elif configs is not None:
        cfg = getattr(configs, b.config_key, None)
    if cfg is None:
        return b.default_config()
    if not isinstance(cfg, b.config_type):
        raise TypeError(f"{b.label} config must be a {b.config_type.__name__}, got {type(cfg).__name__}")
    return cfg


def relative_work(head_calls: Mapping, configs, grid) -> float:
    """Estimated attention FLOPs of these head calls as a share of running them all dense.

    head_calls: {branch name (or id): number of head calls}; missing branches count 0.
    configs: as ``branch_config`` takes them (e.g. the layer's RoutedConfig). grid: the token grid
    the calls ran on (the sliding tile's share depends on it). 0 head calls -> 0.0.
    """
    work, total = 0.0, 0
    for key, n in head_calls.items():
        n = int(n)
        if n == 0:
            continue
        b = branch(key)
        work += n * b.relative_cost(branch_config(b, configs), grid)
        total += n
    return work / max(total, 1)
