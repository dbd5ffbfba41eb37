"""RoutingPlan: what one denoising step routes, built once and run for every attention call of it.

A plan fixes, for one (branch table, token grid, branch configuration): the resolved configs, the
per-block head groups ({branch: heads}, made once instead of on every call), which blocks run all
full (handed to the dense backend untouched), and the step's expected attention work. It is data,
like FlexAttention's BlockMask: ``sparsity()``, ``relative_work()``, ``to_dense(block, head)``
and ``describe()`` are what the summary log, the gate view, the tests and the benches read.

Plans are cached by content (``RoutingPlan.for_step``): a step whose table, grid and configs equal
an earlier step's reuses that plan, so a run with one routing table builds one plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ._backends import HeadTable, head_index
from .dispatch import RoutedConfig, head_groups, run_groups
from .full import full_attention
from .branches import BRANCH_NAMES, CORESET, FULL, N_BRANCHES, SLIDING, branch, branch_config
from .sliding_tile import sliding_tile_mask

__all__ = ["RoutingPlan", "branch_cost", "sliding_key_share", "reference_layer"]


def branch_cost(branch_id: int, cfg: RoutedConfig, grid) -> float:
    """Attention work of one head on a branch, as a share of dense (the branch table's cost)."""
    b = branch(branch_id)
    return b.relative_cost(branch_config(b, cfg), grid)


def sliding_key_share(cfg: RoutedConfig, grid) -> float:
    """Share of the grid's keys inside one query's sliding window."""
    return branch_cost(SLIDING, cfg, grid)


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    table: torch.Tensor  # int8 [blocks, heads] on the CPU, as routed this step
    grid: tuple[int, int, int]
    cfg: RoutedConfig

    @staticmethod
    def key(table: torch.Tensor, grid, cfg: RoutedConfig):
        return (tuple(table.shape), table.numpy().tobytes(), tuple(grid), cfg)

    @classmethod
    def for_step(cls, cache: dict, table: torch.Tensor, grid, cfg: RoutedConfig) -> "RoutingPlan":
        """The plan for this (table, grid, cfg) from ``cache``, built on first use."""
        table = table.to("cpu", torch.int8)
        k = cls.key(table, grid, cfg)
        plan = cache.get(k)
        if plan is None:
            plan = cache[k] = cls(table, tuple(int(g) for g in grid), cfg)
        return plan

    # ---- built once ---------------------------------------------------------------------------
    @cached_property
    def groups(self) -> tuple[dict[int, list[int]], ...]:
        """Per block: {branch id: sorted head indices}, validated once."""
        return tuple(head_groups(row) for row in self.table)

    def head_tables(self, device) -> tuple[dict[int, HeadTable], ...]:
        """Per block: {branch: HeadTable} of its scattered head groups on ``device``, made once per
        device (what the kernels read instead of validating and looking up a list on every call)."""
        key = torch.device(device)
        tables = self._device_tables.get(key)
        if tables is None:
            tables = self._device_tables[key] = tuple(
                {b: HeadTable(head_index(h, self.heads, key, "routing plan")) for b, h in g.items()
                 if h != list(range(h[0], h[-1] + 1))}
                for g in self.groups)
        return tables

    @cached_property
    def _device_tables(self) -> dict:
        return {}

    @cached_property
    def head_counts(self) -> tuple[dict[str, int], ...]:
        """Per block: {branch name: heads on it} (the summary's counters, without a tensor op per call)."""
        return tuple({BRANCH_NAMES[b]: len(h) for b, h in g.items()} for g in self.groups)

    @cached_property
    def all_full(self) -> tuple[bool, ...]:
        return tuple(set(g) == {FULL} for g in self.groups)

    @property
    def blocks(self) -> int:
        return self.table.shape[0]

    @property
    def heads(self) -> int:
        return self.table.shape[1]

    @property
    def n_grid(self) -> int:
        return math.prod(self.grid)

    # ---- running ------------------------------------------------------------------------------
    def run(self, block: int, q, k, v, n_prefix: int = 0, n_suffix: int = 0, *, kv_mask=None, scale=None, full_fn=None):
        """Routed attention of one block's heads: q, k, v [B, H, L, D] -> [B, H, L, D]."""
        if q.shape[1] != self.heads:
            raise ValueError(f"plan has {self.heads} heads per block, the call has {q.shape[1]}")
        return run_groups(q, k, v, self.groups[block], self.grid, self.cfg, n_prefix, n_suffix,
                          kv_mask=kv_mask, scale=scale, full_fn=full_fn, head_tables=self.head_tables(q.device)[block])

    # ---- data ---------------------------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Share of the step's heads (over all blocks) on each branch."""
        n = self.table.numel()
        return {name: float((self.table == i).sum()) / n for i, name in enumerate(BRANCH_NAMES)}

    def relative_work(self) -> float:
        """The step's attention work as a share of dense (all heads, all blocks)."""
        costs = torch.tensor([branch_cost(i, self.cfg, self.grid) for i in range(N_BRANCHES)], dtype=torch.float64)
        return float(costs[self.table.long()].mean())

    def to_dense(self, block: int, head: int, n_prefix: int = 0, n_suffix: int = 0, q=None, k=None) -> torch.Tensor:
        """bool [L, L]: which keys each query attends in this head (for tests and pictures). The
        core-set is data-dependent: pass that head's q ([L, D]) and, for similarity "qk", k; a
        query outside the core set takes its bucket centre's output, so its row is the centre's."""
        b = int(self.table[block, head])
        L = n_prefix + self.n_grid + n_suffix
        if b == FULL:
            return torch.ones(L, L, dtype=torch.bool)
        if b == SLIDING:
            return sliding_tile_mask(self.grid, self.cfg.sliding, n_prefix, n_suffix)
        if q is None:
            raise ValueError("the core-set branch picks its tokens from q (and k): pass q=[L, D] to to_dense")
        from .coreset import _loop_select

        cs = self.cfg.coreset
        qkeep, centre_of = _loop_select(q, self.grid, cs, n_prefix, n_suffix)
        kkeep = qkeep if cs.similarity == "q" or k is None else _loop_select(k, self.grid, cs, n_prefix, n_suffix)[0]
        mask = torch.zeros(L, L, dtype=torch.bool)
        mask[torch.tensor(qkeep)[:, None], torch.tensor(kkeep)[None, :]] = True  # kept rows: the kept keys
        for p, c in centre_of.items():  # a dropped row takes its bucket centre's output
            mask[p] = mask[c]
        return mask

    def describe(self) -> str:
        sp = self.sparsity()
        s, c = self.cfg.sliding, self.cfg.coreset
        shares = ", ".join(f"{name} {sp[name] * 100:.1f}%" for name in BRANCH_NAMES)
        return (f"routing plan: grid {self.grid} ({self.n_grid} tokens), {self.blocks} blocks x {self.heads} heads "
                f"({shares}); sliding tile {s.tile} window {s.window}; core-set bucket {c.bucket} keep {c.keep_ratio} "
                f"({c.similarity}); attention work ~{self.relative_work():.2f}x of dense")


def reference_layer(plan: RoutingPlan, block: int, q, k, v, n_prefix=0, n_suffix=0):
    """The plan's block computed head by head from to_dense masks (full and sliding tile) or the
    loop reference (core-set): a plain torch reference of RoutingPlan.run for tests."""
    from .coreset import coreset_reference

    outs = []
    for h in range(plan.heads):
        s = slice(h, h + 1)
        b = int(plan.table[block, h])
        if b == CORESET:
            outs.append(coreset_reference(q[:, s], k[:, s], v[:, s], plan.grid, plan.cfg.coreset, n_prefix, n_suffix).to(q.dtype))
        else:
            mask = plan.to_dense(block, h, n_prefix, n_suffix).to(q.device)
            outs.append(full_attention(q[:, s], k[:, s], v[:, s]) if b == FULL else
                        torch.nn.functional.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s], attn_mask=mask))
    return torch.cat(outs, 1)
