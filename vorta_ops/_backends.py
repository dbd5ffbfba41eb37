"""Backend registries of the branches: a name -> implementation map, which of them write into a
caller's ``out=`` view themselves (the others' results are copied into it), and which of them run
on a head subset of full-H tensors themselves (``heads=``).

Head subsets: routed dispatch runs each branch on the heads routed to it, usually a scattered set.
A backend that ``takes_heads`` gets the full [B, H, L, D] q, k, v and ``heads`` and writes only
those heads of ``out`` (the Triton kernels: a head table, no copies). For the others ``call``
gathers the subset (``index_select``), runs, and scatters the result into ``out``
(``index_copy_``): one copy of the subset each way.
"""
from __future__ import annotations

import functools
import operator

import torch

__all__ = ["BackendRegistry", "check_heads", "head_index", "kernel_head_table", "require_out", "run_on_heads"]


def _head_int(h) -> int:
    if isinstance(h, bool):  # a bool is an int to Python, never a head index here
        raise TypeError
    return operator.index(h)


def check_heads(heads, n_heads: int, who: str) -> tuple[int, ...]:
    """Validate a head subset (list / tuple of ints or 1-D integer tensor) of ``n_heads`` heads ->
    tuple of ints. A tensor is read back to the host (a sync for a CUDA tensor): pass lists on hot
    paths."""
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    try:
        hs = tuple(map(_head_int, heads))
    except TypeError:
        raise ValueError(f"{who}: expected heads as a list of ints or a 1-D integer tensor, got {heads!r}") from None
    if not hs:
        raise ValueError(f"{who}: expected a non-empty list of head indices, got {list(hs)}")
    bad = [h for h in hs if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"{who}: expected head indices in [0, {n_heads}), got {bad} in {list(hs)}")
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise ValueError(f"{who}: expected unique head indices, got {dup} more than once in {list(hs)}")
    return hs


# A table is a few hundred bytes; 1024 hold every scattered subset of a step with room to spare
# (Wan-14B: 40 blocks x at most 3 branch groups; HunyuanVideo: 60 blocks), so a step whose routing
# repeats an earlier one's builds nothing (each build is a host-to-device copy that waits for the
# stream). Sized to a step, not to a group: LRU under a cyclic access pattern keeps nothing.
@functools.lru_cache(maxsize=1024)
def _head_tensor(heads: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(heads, dtype=dtype, device=device)


def head_index(heads, n_heads: int, device, who: str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The validated head subset as a 1-D ``dtype`` tensor on ``device``, built once per
    (heads, device, dtype) and cached (int64 for index_select / index_copy_, int32 for the
    kernels' head tables). Do not write into it."""
    return _head_tensor(check_heads(heads, n_heads, who), torch.device(device), dtype)


def kernel_head_table(heads, n_heads: int, device, who: str, dummy: torch.Tensor):
    """(program heads, int32 head table) for a Triton launch: (n_heads, dummy) without a subset
    (the kernel's HAS_HEADS is then False and never reads the table), else the subset's size and
    its cached device table."""
    if heads is None:
        return n_heads, dummy
    tab = head_index(heads, n_heads, device, who, torch.int32)
    return tab.numel(), tab


def require_out(out, q, who: str) -> None:
    """A head subset is written into the caller's full-H ``out``: there is no result to return
    otherwise."""
    if out is None:
        raise ValueError(f"{who}: a head subset (heads=) is written into out=: expected out, a full "
                         f"{list(q.shape)} tensor whose other heads are left untouched, got None")


def run_on_heads(fn, q, k, v, *args, heads, out, who: str, **kwargs):
    """``fn(q, k, v, *args, **kwargs)`` on a copy of the head subset ``heads``, its result copied
    into those heads of ``out`` (the fallback for implementations without ``heads=``). Returns out."""
    require_out(out, q, who)
    idx = head_index(heads, q.shape[1], q.device, who)
    res = fn(q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx), *args, **kwargs)
    return out.index_copy_(1, idx, res.to(out.dtype))


class BackendRegistry:
    def __init__(self, branch: str, **backends):
        self.branch = branch
        self.fns = dict(backends)
        self.writes_out: set[str] = set()
        self.takes_heads: set[str] = set()

    def register(self, name: str, fn, writes_out: bool = False, takes_heads: bool = False) -> None:
        if takes_heads and not writes_out:
            raise ValueError(f"{self.branch} backend {name!r}: takes_heads=True needs writes_out=True "
                             f"(a head subset is written into the caller's out=)")
        self.fns[name] = fn
        self.writes_out.discard(name)
        self.takes_heads.discard(name)
        if writes_out:
            self.writes_out.add(name)
        if takes_heads:
            self.takes_heads.add(name)

    def call(self, name: str, requested: str, q, k, v, *args, out=None, heads=None, **kwargs):
        if name not in self.fns:
            raise ValueError(f"unknown {self.branch} backend {requested!r}; available: {sorted(self.fns)} or 'auto'")
        fn = self.fns[name]
        if heads is not None:
            if out is not None and name in self.takes_heads:
                return fn(q, k, v, *args, out=out, heads=heads, **kwargs)
            return run_on_heads(fn, q, k, v, *args, heads=heads, out=out, who=f"{self.branch} attention", **kwargs)
        if out is not None and name in self.writes_out:
            return fn(q, k, v, *args, out=out, **kwargs)
        res = fn(q, k, v, *args, **kwargs)
        return res if out is None else out.copy_(res)
