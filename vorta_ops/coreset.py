"""Bucketed core-set (BCS) attention branch.

The grid is cut into non-overlapping buckets of (bt, bh, bw) tokens (default (2, 3, 2) = 12). In
each bucket the centre token (local index (bt//2, bh//2, bw//2)) is always kept, plus the margin
tokens least cosine-similar to it, until ``int(bucket_size * keep_ratio)`` tokens are kept (the
official rule: 12 * 0.5 = 6, i.e. the centre and 5 others). Attention runs on the kept tokens only;
every dropped token receives its bucket centre's output. Grid tokens outside whole buckets (grids
not divisible by the bucket) and extra (non-grid) tokens are always kept.

Similarity source (``similarity``):
    "q"   Q's selection is used for Q, K and V (official Wan).
    "qk"  Q selects the query core-set; K selects the key core-set, which V follows (official
          HunyuanVideo).

q, k, v: [B, H, L, D], original t-major order (layout.py); kv_mask: optional bool [B, L].
Selection is per (batch, head). Ties in similarity keep the lower margin index (stable sort).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ._backends import BackendRegistry, op_heads
from .full import full_attention
from .layout import Grid, _triple, check_grid

__all__ = [
    "CoresetConfig",
    "DEFAULT_BUCKET",
    "bucket_index",
    "coreset_select",
    "coreset_attention",
    "coreset_reference",
    "coreset_branch",
    "register_backend",
    "coreset_op",
]

DEFAULT_BUCKET: Grid = (2, 3, 2)
SIMILARITY_MODES = ("q", "qk")


@dataclass(frozen=True)
class CoresetConfig:
    bucket: Grid = DEFAULT_BUCKET
    keep_ratio: float = 0.5
    similarity: str = "q"

    def __post_init__(self):
        object.__setattr__(self, "bucket", _triple("bucket", self.bucket))
        if not (0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.similarity not in SIMILARITY_MODES:
            raise ValueError(f"similarity must be one of {SIMILARITY_MODES}, got {self.similarity!r}")

    @property
    def bucket_size(self) -> int:
        return math.prod(self.bucket)

    @property
    def n_keep(self) -> int:
        """Tokens kept per bucket, centre included (at least the centre)."""
        return max(1, int(self.bucket_size * self.keep_ratio))


@dataclass(frozen=True)
class BucketIndex:
    """Original-order positions: centre (nb,), margin (nb, G-1), rest (n_rest,) = grid tokens
    outside whole buckets followed by the extra tokens, all always kept."""

    centre: torch.Tensor
    margin: torch.Tensor
    rest: torch.Tensor


@functools.lru_cache(maxsize=32)
def bucket_index(grid: Grid, bucket: Grid, n_prefix: int = 0, n_suffix: int = 0, device=None) -> BucketIndex:
    grid = check_grid(grid)
    T, Hg, Wg = grid
    bt, bh, bw = bucket
    nt, nh, nw = T // bt, Hg // bh, Wg // bw
    pos = n_prefix + torch.arange(T * Hg * Wg).view(T, Hg, Wg)
    inner = pos[: nt * bt, : nh * bh, : nw * bw]
    groups = rearrange(inner, "(nt bt) (nh bh) (nw bw) -> (nt nh nw) (bt bh bw)", bt=bt, bh=bh, bw=bw)
    c = (bt // 2) * bh * bw + (bh // 2) * bw + bw // 2
    centre = groups[:, c]
    margin = torch.cat((groups[:, :c], groups[:, c + 1 :]), dim=1)
    in_bucket = torch.zeros(T, Hg, Wg, dtype=torch.bool)
    in_bucket[: nt * bt, : nh * bh, : nw * bw] = True
    rest = torch.cat(
        (
            pos[~in_bucket],
            torch.arange(n_prefix),
            torch.arange(n_prefix + T * Hg * Wg, n_prefix + T * Hg * Wg + n_suffix),
        )
    )
    dev = torch.device(device or "cpu")
    return BucketIndex(centre.to(dev), margin.to(dev), rest.to(dev))


def coreset_select(x: torch.Tensor, bi: BucketIndex, n_keep: int):
    """Select the core-set of x [B, H, L, D].

    Returns (gather, back): gather [B, H, Lc] original positions forming the core-set (centres,
    kept margins, rest); back [B, H, L] for every original position the core-set slot whose
    output it receives (its own, or its bucket centre's when dropped).
    """
    B, H, L, D = x.shape
    nb, m = bi.margin.shape
    n_margin_keep = n_keep - 1
    dev = x.device
    if nb and n_margin_keep > 0:
        centre = F.normalize(x[:, :, bi.centre, :].float(), dim=-1)  # [B, H, nb, D]
        margin = F.normalize(x[:, :, bi.margin, :].float(), dim=-1)  # [B, H, nb, m, D]
        sim = torch.einsum("bhnd,bhnmd->bhnm", centre, margin)
        order = sim.argsort(dim=-1, stable=True)  # least similar first
        picked = bi.margin.expand(B, H, nb, m).gather(-1, order)  # margin positions by similarity
        kept, dropped = picked[..., :n_margin_keep], picked[..., n_margin_keep:]
    else:
        kept = bi.margin.new_empty(B, H, nb, 0)
        dropped = bi.margin.expand(B, H, nb, m)
    gather = torch.cat(
        (
            bi.centre.expand(B, H, nb),
            kept.reshape(B, H, -1),
            bi.rest.expand(B, H, bi.rest.numel()),
        ),
        dim=-1,
    )
    Lc = gather.shape[-1]
    back = torch.empty(B, H, L, dtype=torch.long, device=dev)
    back.scatter_(-1, gather, torch.arange(Lc, device=dev).expand(B, H, Lc))
    # a dropped token reads its centre's output; centres are core-set slots 0..nb-1
    bucket_of = torch.arange(nb, device=dev).view(1, 1, nb, 1).expand_as(dropped)
    back.scatter_(-1, dropped.reshape(B, H, -1), bucket_of.reshape(B, H, -1))
    return gather, back


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def coreset_attention(
    q, k, v, grid, cfg: CoresetConfig = CoresetConfig(), n_prefix: int = 0, n_suffix: int = 0,
    *, kv_mask=None, scale=None,
):
    """Core-set attention. q, k, v: [B, H, L, D] original order -> [B, H, L, D]."""
    L = n_prefix + math.prod(check_grid(grid)) + n_suffix
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape or q.shape[2] != L:
        raise ValueError(
            f"core-set attention wants q, k, v of shape [B, H, {L}, D] (grid {tuple(grid)} + "
            f"{n_prefix}+{n_suffix} extra tokens), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    bi = bucket_index(tuple(grid), cfg.bucket, n_prefix, n_suffix, q.device)
    q_gather, q_back = coreset_select(q, bi, cfg.n_keep)
    k_gather = q_gather if cfg.similarity == "q" else coreset_select(k, bi, cfg.n_keep)[0]
    qc, kc, vc = _gather_tokens(q, q_gather), _gather_tokens(k, k_gather), _gather_tokens(v, k_gather)
    mask = None
    if kv_mask is not None:  # [B, L] -> [B, H, 1, Lc]
        mask = kv_mask[:, None, :].expand(-1, q.shape[1], -1).gather(-1, k_gather)[:, :, None, :]
    if mask is None:
        oc = full_attention(qc, kc, vc, scale=scale)
    else:
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
    return _gather_tokens(oc, q_back)


# ---- backend registry and custom op ----------------------------------------------------------

# Every backend call runs inside this op (see sliding_tile.SLIDING_TILE_OP_SCHEMA): opaque to
# torch.compile, so the selection's data-dependent indexing is never traced.
CORESET_OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) out, int[] grid, int[] bucket, float keep_ratio, str similarity, "
    "int n_prefix, int n_suffix, Tensor? kv_mask, float? scale, Tensor? heads, str backend) -> ()"
)


def _coreset_op_impl(q, k, v, out, grid, bucket, keep_ratio, similarity, n_prefix, n_suffix, kv_mask, scale, heads,
                     backend):
    cfg = CoresetConfig(tuple(bucket), keep_ratio, similarity)
    _BACKENDS.run(backend, q, k, v, tuple(grid), cfg, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, out=out,
                  heads=op_heads(heads, q, "vorta::coreset_attention"))


coreset_op = torch.library.custom_op(
    "vorta::coreset_attention", _coreset_op_impl, mutates_args=("out",), schema=CORESET_OP_SCHEMA
)


@coreset_op.register_fake
def _coreset_op_fake(q, k, v, out, grid, bucket, keep_ratio, similarity, n_prefix, n_suffix, kv_mask, scale, heads,
                     backend):
    return None  # out is written in place: nothing new to describe


def _call_op(name, q, k, v, grid, cfg: CoresetConfig, n_prefix, n_suffix, *, kv_mask, scale, out, heads):
    # Eager calls skip the custom-op layer (its dispatch costs ~0.1-0.2 ms of host time per call,
    # measured on the H200 with bench.overhead); under torch.compile the op keeps the kernel opaque.
    fn = coreset_op if torch.compiler.is_compiling() else _coreset_op_impl
    fn(
        q, k, v, out, [int(x) for x in grid], list(cfg.bucket), float(cfg.keep_ratio), cfg.similarity, int(n_prefix),
        int(n_suffix), kv_mask, None if scale is None else float(scale), heads, name,
    )


_BACKENDS = BackendRegistry("core-set", op=_call_op, torch=coreset_attention)


def register_backend(name: str, fn, writes_out: bool = False, takes_heads: bool = False) -> None:
    """Plug in a faster implementation with the signature of coreset_attention (plus an ``out=``
    keyword when ``writes_out``, and a ``heads=`` keyword when ``takes_heads``: run on those heads
    of full-H q, k, v, writing only those heads of ``out``)."""
    _BACKENDS.register(name, fn, writes_out, takes_heads)


def coreset_branch(
    q, k, v, grid, cfg: CoresetConfig, n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None, backend="auto", out=None,
    heads=None,
):
    """Core-set attention through a backend: "torch", "triton" (fused select/gather/expand), or
    "auto" (triton on CUDA when registered, else torch). ``out``: optional [B, H, L, D] view to
    write the result into (dispatch passes a slice of the layer's output). ``heads``: optional
    head subset (list of ints or 1-D int tensor): only those heads are computed and written into
    ``out`` (then required, full [B, H, L, D]; its other heads are left untouched)."""
    name = backend
    if backend == "auto":
        name = "triton" if q.is_cuda and "triton" in _BACKENDS.fns else "torch"
    return _BACKENDS.call(
        name, backend, q, k, v, grid, cfg, n_prefix, n_suffix, kv_mask=kv_mask, scale=scale, out=out, heads=heads
    )


# ---- naive reference (loops; tests only) -----------------------------------------------------


def _loop_select(x_bh: torch.Tensor, grid: Grid, cfg: CoresetConfig, n_prefix: int, n_suffix: int):
    """For one (b, h): list of kept positions and a dict dropped position -> its centre."""
    T, Hg, Wg = grid
    bt, bh, bw = cfg.bucket
    keep, centre_of = [], {}
    covered = set()
    for t0 in range(0, T - bt + 1, bt):
        for h0 in range(0, Hg - bh + 1, bh):
            for w0 in range(0, Wg - bw + 1, bw):
                members = [
                    n_prefix + ((t0 + i) * Hg + h0 + j) * Wg + w0 + l
                    for i in range(bt) for j in range(bh) for l in range(bw)
                ]
                covered.update(members)
                c = n_prefix + ((t0 + bt // 2) * Hg + h0 + bh // 2) * Wg + w0 + bw // 2
                others = [p for p in members if p != c]
                cv = x_bh[c].double()
                sims = [float(cv @ x_bh[p].double() / (cv.norm() * x_bh[p].double().norm()).clamp_min(1e-12)) for p in others]
                ranked = [p for _, _, p in sorted(zip(sims, range(len(others)), others))]
                keep.append(c)
                keep.extend(ranked[: cfg.n_keep - 1])
                for p in ranked[cfg.n_keep - 1 :]:
                    centre_of[p] = c
    L = n_prefix + T * Hg * Wg + n_suffix
    keep.extend(p for p in range(L) if p not in covered)
    return keep, centre_of


def coreset_reference(q, k, v, grid, cfg: CoresetConfig = CoresetConfig(), n_prefix=0, n_suffix=0, *, kv_mask=None, scale=None):
    """Loop reference of coreset_attention (per batch, head and bucket; tiny sizes only)."""
    grid = check_grid(grid)
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    s = scale if scale is not None else D ** -0.5
    for b in range(B):
        for h in range(H):
            qkeep, qcentre = _loop_select(q[b, h], grid, cfg, n_prefix, n_suffix)
            kkeep = qkeep if cfg.similarity == "q" else _loop_select(k[b, h], grid, cfg, n_prefix, n_suffix)[0]
            scores = (q[b, h, qkeep].double() @ k[b, h, kkeep].double().T) * s
            if kv_mask is not None:
                scores = scores.masked_fill(~kv_mask[b, kkeep][None, :], float("-inf"))
            o = scores.softmax(-1) @ v[b, h, kkeep].double()
            res = {p: o[i] for i, p in enumerate(qkeep)}
            for p in range(L):
                out[b, h, p] = res[p] if p in res else res[qcentre[p]]
    return out
