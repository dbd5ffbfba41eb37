"""Routed dispatch for one attention layer: each branch runs once, on the heads routed to it.

q, k, v: [B, H, L, D] in the original t-major order (any strides; ComfyUI's [B, L, H*D] tensors
viewed as [B, L, H, D].transpose(1, 2) work without a copy). branches: H branch ids (router.py).

A branch that gets every head runs on q, k, v as they are; a branch that gets a contiguous run of
heads gets views (and writes into a view of the layer output). A scattered head subset (the usual
case with trained routers) of the sliding-tile or core-set branch is passed as ``heads=`` with the
full q, k, v and the layer output: the Triton backends read and write those heads in place through
a head table (no copies); the other backends (reference, flex, torch) get a copy of the subset
and their result is copied back (``_backends.run_on_heads``). The full branch copies a scattered
subset (dense SDPA / the host's full_fn want their heads in one tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._backends import run_on_heads
from .coreset import CoresetConfig, coreset_branch
from .fp8 import PRECISIONS
from .full import full_attention
from .router import CORESET, FULL, SLIDING
from .sliding_tile import SlidingTileConfig, sliding_tile_attention

__all__ = ["RoutedConfig", "PRECISIONS", "routed_attention", "head_groups", "run_groups"]


@dataclass(frozen=True)
class RoutedConfig:
    sliding: SlidingTileConfig = field(default_factory=SlidingTileConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    sliding_backend: str = "auto"
    coreset_backend: str = "auto"
    # CUDA: run the branches of one layer on their own streams, so one branch's tail and the
    # core-set's memory-bound passes may overlap the other's compute. Off by default: on the H100
    # it measured mixed (Wan 720p official tiles 41.4 -> 44.9 ms, HunyuanVideo 55.0 -> 52.9 ms).
    concurrent: bool = False
    # "bf16": every branch in the inputs' dtype. "fp8": the sliding-tile and core-set branches in e4m3
    # (vorta_ops/fp8.py's numerics, Triton kernels, sm_89+); full heads stay on the dense backend.
    # Left out of repr: measured routers and the training-free disk cache describe their branch settings
    # by repr, and which kernels run a branch does not change what the branch computes.
    precision: str = field(default="bf16", repr=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"RoutedConfig: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp8":
            for what, name in (("sliding_backend", self.sliding_backend), ("coreset_backend", self.coreset_backend)):
                if name not in ("auto", "triton", "triton-fp8"):
                    raise ValueError(f"RoutedConfig: precision fp8 runs on the Triton kernels; {what} {name!r} has no "
                                     "fp8 path (use auto or triton)")

    def backend(self, branch: int) -> str:
        """The backend name a sparse branch runs on (precision fp8: the kernels' "triton-fp8")."""
        name = self.sliding_backend if branch == SLIDING else self.coreset_backend
        return "triton-fp8" if self.precision == "fp8" else name



def head_groups(branches) -> dict[int, list[int]]:
    """{branch id: [head indices]} for the branches that have heads, in branch order."""
    ids = branches.tolist() if isinstance(branches, torch.Tensor) else list(branches)
    groups: dict[int, list[int]] = {}
    for h, b in enumerate(ids):
        if b not in (FULL, CORESET, SLIDING):
            raise ValueError(f"head {h}: branch id {b} is not one of 0 (full), 1 (core-set), 2 (sliding tile)")
        groups.setdefault(int(b), []).append(h)
    return dict(sorted(groups.items()))


def _run_branch(
    branch, q, k, v, grid, cfg: RoutedConfig, n_prefix, n_suffix, kv_mask, scale, full_fn, out=None, heads=None
):
    """One branch; writes into ``out`` (the layer output, or a view of it) when given. ``heads``:
    only those heads of q, k, v, written into those heads of ``out``."""
    if branch == FULL:
        def dense(q, k, v):
            return full_fn(q, k, v) if full_fn is not None else full_attention(q, k, v, kv_mask=kv_mask, scale=scale)

        if heads is not None:
            return run_on_heads(dense, q, k, v, heads=heads, out=out, who="full attention")
        res = dense(q, k, v)
        return res if out is None else out.copy_(res)
    if branch == CORESET:
        return coreset_branch(
            q, k, v, grid, cfg.coreset, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, backend=cfg.backend(CORESET),
            out=out, heads=heads,
        )
    return sliding_tile_attention(
        q, k, v, grid, cfg.sliding, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, backend=cfg.backend(SLIDING),
        out=out, heads=heads,
    )


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    branches,
    grid,
    cfg: RoutedConfig = RoutedConfig(),
    n_prefix: int = 0,
    n_suffix: int = 0,
    *,
    kv_mask: torch.Tensor | None = None,
    scale: float | None = None,
    full_fn=None,
) -> torch.Tensor:
    """Attention with each head routed to its branch. Returns [B, H, L, D].

    full_fn: optional callable (q, k, v) -> out on [B, h, L, D] head subsets that serves the full
    branch instead of full_attention (the host's own dense backend, e.g. ComfyUI's SageAttention);
    it must apply kv_mask itself.
    """
    H = q.shape[1]
    n_branches = branches.numel() if isinstance(branches, torch.Tensor) else len(branches)
    if n_branches != H:
        raise ValueError(f"got {n_branches} branch ids for {H} heads; expected one per head")
    return run_groups(q, k, v, head_groups(branches), grid, cfg, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, full_fn=full_fn)


def run_groups(q, k, v, groups: dict[int, list[int]], grid, cfg: RoutedConfig, n_prefix=0, n_suffix=0, *,
               kv_mask=None, scale=None, full_fn=None, head_tables=None) -> torch.Tensor:
    """routed_attention with the head groups already made ({branch: sorted heads}, as
    head_groups returns them): what a RoutingPlan calls with the groups it built once per step.
    head_tables: optional {branch: HeadTable} of the scattered groups, already on q's device
    (validated when they were made; passed to the backends instead of the lists)."""
    if len(groups) == 1:
        (branch,) = groups
        return _run_branch(branch, q, k, v, grid, cfg, n_prefix, n_suffix, kv_mask, scale, full_fn)
    out = torch.empty_like(q)  # keeps q's memory layout: ComfyUI's [B, L, H*D] reshape stays a view

    def run_group(branch, idx):
        if idx == list(range(idx[0], idx[-1] + 1)):  # a run of heads: views
            s = slice(idx[0], idx[-1] + 1)
            _run_branch(branch, q[:, s], k[:, s], v[:, s], grid, cfg, n_prefix, n_suffix, kv_mask, scale, full_fn, out[:, s])
        else:  # scattered: the full tensors and the head list (or its device table)
            heads = head_tables.get(branch, idx) if head_tables is not None else idx
            _run_branch(branch, q, k, v, grid, cfg, n_prefix, n_suffix, kv_mask, scale, full_fn, out, heads)

    if not (cfg.concurrent and q.is_cuda):
        for branch, idx in groups.items():
            run_group(branch, idx)
        return out
    main = torch.cuda.current_stream(q.device)
    for (branch, idx), side in zip(groups.items(), _side_streams(q.device, len(groups))):
        side.wait_stream(main)  # inputs and `out` are ready
        with torch.cuda.stream(side):
            run_group(branch, idx)
        main.wait_stream(side)  # the caller sees the finished output on its own stream
    return out


_STREAMS: dict = {}


def _side_streams(device, n: int):
    """n CUDA streams per device, made once (streams are cheap but not free to create)."""
    key = torch.device(device)
    streams = _STREAMS.setdefault(key, [])
    while len(streams) < n:
        streams.append(torch.cuda.Stream(device=key))
    return streams[:n]
