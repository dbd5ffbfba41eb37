"""Backend registries of the branches: a name -> implementation map, which of them write into a
caller's ``out=`` view themselves (the others' results are copied into it), and which of them run
on a head subset of full-H tensors themselves (``heads=``).

Head subsets: routed dispatch runs each branch on the heads routed to it, usually a scattered set.
A backend that ``takes_heads`` gets the full [B, H, L, D] q, k, v and ``heads`` and writes only
those heads of ``out`` (the Triton kernels: a head table, no copies). For the others ``call``
gathers the subset (``index_select``), runs, and scatters the result into ``out``
(``index_copy_``): one copy of the subset each way.

Custom ops: ``call`` (the validating entry point) hands every backend call to the branch's
``torch.library`` custom op (``vorta::sliding_tile_attention``, ``vorta::coreset_attention``), whose
body is ``run``. Under torch.compile the backends are then opaque ops with fake implementations:
no graph breaks inside them, no tracing of their host-side tables. The op writes into ``out`` (a
declared mutation; ``call`` allocates it like q when not given) and takes the head subset as a
tensor (``op_heads`` turns it back into what the backends take).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

__all__ = [
    "tensor_version",
    "BackendRegistry", "HeadTable", "check_heads", "head_index", "kernel_head_table", "op_heads", "require_out",
    "run_on_heads",
]


def tensor_version(t: torch.Tensor) -> int | None:
    """t's in-place version counter, for caches keyed on a tensor object; None for an inference
    tensor (made under torch.inference_mode, as ComfyUI samples), which has no counter. Such a key
    then stands for the object alone: the masks and schedules cached this way are made anew per
    model call or sampling run, not changed in place."""
    try:
        return t._version
    except RuntimeError:
        return None


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


@dataclass(frozen=True, eq=False)
class HeadTable:
    """A head subset already on the device as a 1-D int64 tensor of unique indices in [0, H),
    trusted: never read back to the host (no sync). The custom ops wrap a non-CPU ``heads`` tensor
    in it (the Python entry points validated it when they built it); ``head_index`` and
    ``kernel_head_table`` pass it through."""

    index: torch.Tensor


def head_index(heads, n_heads: int, device, who: str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The validated head subset as a 1-D ``dtype`` tensor on ``device``, built once per
    (heads, device, dtype) and cached (int64: index_select / index_copy_ and the kernels' head
    tables alike). Do not write into it. A HeadTable is returned as it is (in ``dtype``)."""
    if isinstance(heads, HeadTable):
        return heads.index if heads.index.dtype == dtype else heads.index.to(dtype)
    hs = check_heads(heads, n_heads, who)
    if torch.compiler.is_compiling():  # traced: a graph constant (dynamo would only trace the cache through)
        return torch.tensor(hs, dtype=dtype, device=device)
    return _head_tensor(hs, torch.device(device), dtype)


def kernel_head_table(heads, n_heads: int, device, who: str, dummy: torch.Tensor):
    """(program heads, head table) for a Triton launch: (n_heads, dummy) without a subset (the
    kernel's HAS_HEADS is then False and never reads the table), else the subset's size and its
    cached int64 device table (the kernels read int32 or int64 tables)."""
    if heads is None:
        return n_heads, dummy
    tab = head_index(heads, n_heads, device, who)
    return tab.numel(), tab


def op_heads(heads: torch.Tensor | None, q: torch.Tensor, who: str):
    """A custom op's ``heads`` argument -> what the backends take: None; for a CPU tensor the
    validated tuple (reading it back costs nothing); otherwise a HeadTable, checked by its metadata
    only (its values are not read back: the entry point that built it validated them)."""
    if heads is None:
        return None
    n_heads = q.shape[1]
    if heads.dim() != 1 or heads.dtype not in (torch.int32, torch.int64) or not 1 <= heads.numel() <= n_heads:
        raise ValueError(f"{who}: expected heads as a 1-D int32 / int64 tensor of 1 to {n_heads} head indices, got "
                         f"{heads.dtype} {list(heads.shape)}")
    if heads.device.type == "cpu":
        return check_heads(heads, n_heads, who)
    if heads.device != q.device:
        raise ValueError(f"{who}: expected heads on {q.device} (or the CPU), got {heads.device}")
    return HeadTable(heads if heads.dtype == torch.int64 else heads.long())


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
    """name -> implementation of one branch. ``op``: the branch's custom-op caller,
    ``op(name, q, k, v, *args, out=, heads=, **kwargs)``, which runs ``run`` inside the op; without
    one (a registry made for a test) ``call`` runs ``run`` directly."""

    def __init__(self, branch: str, op=None, **backends):
        self.branch = branch
        self.op = op
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

    def _check_name(self, name: str, requested: str) -> None:
        if name not in self.fns:
            raise ValueError(f"unknown {self.branch} backend {requested!r}; available: {sorted(self.fns)} or 'auto'")

    def call(self, name: str, requested: str, q, k, v, *args, out=None, heads=None, **kwargs):
        """Validate, then run backend ``name`` through the custom op. Returns ``out`` (allocated
        like q when not given; a head subset needs the caller's full-H out)."""
        self._check_name(name, requested)
        if heads is not None:
            who = f"{self.branch} attention"
            require_out(out, q, who)
            heads = head_index(heads, q.shape[1], q.device, who)
        if out is None:
            out = torch.empty_like(q)  # keeps q's memory layout (ComfyUI's [B, L, H, D] underneath)
        (self.op or self.run)(name, q, k, v, *args, out=out, heads=heads, **kwargs)
        return out

    def run(self, name: str, q, k, v, *args, out, heads=None, **kwargs) -> None:
        """The custom op's body: backend ``name`` on q, k, v, written into ``out``. ``heads``: None,
        a list / tuple / tensor (validated again) or a HeadTable (trusted)."""
        self._check_name(name, name)
        fn = self.fns[name]
        if heads is not None:
            if name in self.takes_heads:
                fn(q, k, v, *args, out=out, heads=heads, **kwargs)
            else:
                run_on_heads(fn, q, k, v, *args, heads=heads, out=out, who=f"{self.branch} attention", **kwargs)
        elif name in self.writes_out:
            fn(q, k, v, *args, out=out, **kwargs)
        else:
            out.copy_(fn(q, k, v, *args, **kwargs))
