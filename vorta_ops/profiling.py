"""Training-free routing, the measuring part: how far each sparse branch lands from dense attention.

For one attention call (q, k, v of one block) the profiler takes r sampled query rows of the
video grid, computes on those rows the exact attention output and what each sparse branch would
output, and returns the relative L2 error per (head, branch). A decision then picks, per head,
the cheapest branch whose error is at most tau, else full (``decide_from_errors``). Errors, not
decisions, are what a ``HeadProfile`` stores, so a new tau needs no new profile.

Design and prior art: shared/research/training-free-routing.md (SVG samples rows the same way,
but from the global RNG and only from the first frames; here the rows are stratified over every
latent frame and drawn from a fixed-seed generator).

Shape words: q, k, v [B, H, L, D] in the original t-major order (layout.py); grid (T, Hg, Wg);
rows: 1-D int64 positions in [0, L), grid tokens only (prefix/suffix extras are never sampled).

Cost per head: one r x L score matrix (shared by exact and sliding tile), one r x Lc matrix for
the core-set (Lc ~ keep_ratio * L kept keys), and the core-set selection (one cosine similarity
per bucket member: O(L * D)). That is O(r * L * D), never L x L; memory B x r x L floats per head
(heads run one at a time). Measured on an H200 (bf16, r = 256, one call = one block): Wan-1.3B
480p (L 32,760, 12 heads) 17 ms against 10 ms for dense SDPA; Wan-14B 720p (L 75,600, 40 heads)
74 ms against 204 ms. The per-head loop is launch-bound at these sizes (r = 64 costs 13 / 54 ms):
running groups of heads at once would cut it; profiling runs on a few steps of a run only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .branches import BRANCH_NAMES, CORESET, FULL, N_BRANCHES, SLIDING
from .coreset import CoresetConfig, bucket_index, coreset_select
from .dispatch import RoutedConfig
from .layout import check_grid
from .sliding_tile import SlidingTileConfig, sliding_tile_mask

__all__ = ["sample_rows", "profile_heads", "decide_from_errors", "branch_costs", "HeadProfile"]

PROFILE_FORMAT = 1  # HeadProfile.to_dict()'s "format"; bump when the fields change


# ---- which rows ------------------------------------------------------------------------------


def _frame_rows(Hg: int, Wg: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n distinct in-frame positions (h * Wg + w) spread over h and w: the frame is cut into an
    a x b lattice of cells (a*b >= n, cells about square), n cells are drawn, and one token at
    random inside each (jittered stratified sampling). Falls back to random extra tokens in the
    rare shapes where the lattice has fewer than n cells."""
    if n >= Hg * Wg:
        return torch.arange(Hg * Wg)
    a = min(Hg, max(1, math.ceil(math.sqrt(n * Hg / Wg))))
    b = min(Wg, max(1, math.ceil(n / a)))
    hb = [i * Hg // a for i in range(a + 1)]  # cell edges on h
    wb = [j * Wg // b for j in range(b + 1)]
    cells = torch.randperm(a * b, generator=g)[:n].tolist()
    picked = []
    for c in cells:
        i, j = divmod(c, b)
        h = hb[i] + int(torch.randint(hb[i + 1] - hb[i], (1,), generator=g))
        w = wb[j] + int(torch.randint(wb[j + 1] - wb[j], (1,), generator=g))
        picked.append(h * Wg + w)
    if len(picked) < n:  # lattice too coarse (a or b clamped): top up with unpicked tokens
        free = torch.ones(Hg * Wg, dtype=torch.bool)
        free[picked] = False
        rest = free.nonzero()[:, 0]
        picked += rest[torch.randperm(rest.numel(), generator=g)[: n - len(picked)]].tolist()
    return torch.tensor(sorted(picked), dtype=torch.long)


def sample_rows(grid, r: int, n_prefix: int = 0, seed: int = 0) -> torch.Tensor:
    """r query rows of the video grid, stratified so every latent frame is represented.

    Each of the T frames gets r // T rows; the r % T left over go to frames drawn by the
    generator. Inside a frame the rows are spread over h and w (``_frame_rows``). Positions are
    in the original t-major order, offset by n_prefix (the prefix extras come first). Uses only a
    torch.Generator seeded with ``seed`` (never the global RNG): the same (grid, r, n_prefix,
    seed) gives the same rows. r >= T*Hg*Wg gives every grid token.

    Returns sorted int64 [min(r, T*Hg*Wg)].
    """
    T, Hg, Wg = check_grid(grid)
    if isinstance(r, bool) or not isinstance(r, int) or r < T:
        raise ValueError(f"r must be a whole number of at least T = {T} (one row per latent frame), got {r!r}")
    if n_prefix < 0:
        raise ValueError(f"n_prefix must be >= 0, got {n_prefix}")
    per_frame = Hg * Wg
    if r >= T * per_frame:
        return torch.arange(T * per_frame) + n_prefix
    g = torch.Generator().manual_seed(int(seed))
    share = [r // T] * T
    for t in torch.randperm(T, generator=g)[: r % T].tolist():
        share[t] += 1
    out = [t * per_frame + _frame_rows(Hg, Wg, n, g) for t, n in enumerate(share)]
    return torch.cat(out) + n_prefix


# ---- what the branches give on those rows ----------------------------------------------------


def _validate(q, k, v, grid, rows, n_prefix, n_suffix, kv_mask):
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"profile_heads wants q, k, v of one shape [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    n_grid = math.prod(check_grid(grid))
    L = n_prefix + n_grid + n_suffix
    if q.shape[2] != L:
        raise ValueError(
            f"sequence length {q.shape[2]} does not match grid {tuple(grid)} ({n_grid} tokens) + {n_prefix} prefix "
            f"+ {n_suffix} suffix tokens = {L}"
        )
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if rows.numel() == 0:
        raise ValueError("rows is empty; pass sample_rows(grid, r, n_prefix)")
    if int(rows.min()) < 0 or int(rows.max()) >= L:
        raise ValueError(f"rows must lie in [0, {L}), got {int(rows.min())} .. {int(rows.max())}")
    if kv_mask is not None and (kv_mask.dtype != torch.bool or tuple(kv_mask.shape) != (q.shape[0], L)):
        raise ValueError(f"kv_mask must be bool [B, L] = [{q.shape[0]}, {L}], got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    return rows.to(q.device)


def _rel_err(o: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[B, r, D] -> worst over the batch of ||o - ref||_F / ||ref||_F (fp32)."""
    num = (o - ref).flatten(1).norm(dim=1)
    den = ref.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (num / den).max()


def _attend(scores: torch.Tensor, v: torch.Tensor, allowed=None) -> torch.Tensor:
    """softmax over the last axis of fp32 scores [B, r, n] (entries where ``allowed`` is False
    left out) @ v [B, n, D]."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], idx [B, n] -> [B, n, D]."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def profile_heads(
    q, k, v, grid, cfg: RoutedConfig, rows, n_prefix: int = 0, n_suffix: int = 0, kv_mask=None, *, scale=None
) -> torch.Tensor:
    """Relative L2 error of every branch on the sampled query rows, per head.

    For each head: the exact output O on ``rows`` (fp32, over all keys); the sliding tile's output
    there (the same scores under ``sliding_tile_mask(..., rows=rows)``); the core-set's output
    there, computed for those rows only: vorta_ops.coreset's own selection (``coreset_select`` over
    all buckets, O(L*D)) says which kept query each row reads (itself, or its bucket centre when
    dropped) and which keys are kept; that query then attends the kept keys. Then
    e_b = ||O_b - O||_F / ||O||_F over the rows and D, in fp32; e_full = 0.

    Batch: the worst (max) over B. A head is routed sparse for every sample of the batch at once
    (e.g. the cond and uncond halves of a CFG batch), so it must be close on each of them; a mean
    would let one bad sample hide behind a good one.

    kv_mask: optional bool [B, L] (True = key may be attended), applied in every branch as the
    branches apply it. scale: softmax scale, default D**-0.5.

    Returns float32 [H, N_BRANCHES] on the CPU, columns in branch order (full, core-set, tile).
    """
    rows = _validate(q, k, v, grid, rows, n_prefix, n_suffix, kv_mask)
    grid = check_grid(grid)
    B, H, L, D = q.shape
    s = float(scale) if scale is not None else D ** -0.5
    dev = q.device
    tile_ok = sliding_tile_mask(grid, cfg.sliding, n_prefix, n_suffix, dev, rows)[None]  # [1, r, L]
    key_ok = None if kv_mask is None else kv_mask[:, None, :]  # [B, 1, L]
    if key_ok is not None:
        tile_ok = tile_ok & key_ok
    cs: CoresetConfig = cfg.coreset
    bi = bucket_index(grid, cs.bucket, n_prefix, n_suffix, dev)
    errors = torch.zeros(H, N_BRANCHES, dtype=torch.float32, device=dev)  # on q's device: one sync, at the end
    for h in range(H):
        qh, kh, vh = (x[:, h].float() for x in (q, k, v))  # [B, L, D]
        # exact and sliding tile share one [B, r, L] score matrix
        scores = (qh[:, rows] @ kh.transpose(1, 2)) * s
        exact = _attend(scores, vh, key_ok)
        errors[h, SLIDING] = _rel_err(_attend(scores, vh, tile_ok), exact)
        del scores
        # core-set: the selection of this head, then only the sampled rows
        q_gather, q_back = coreset_select(q[:, h : h + 1], bi, cs.n_keep)  # [B, 1, Lc], [B, 1, L]
        k_gather = q_gather if cs.similarity == "q" else coreset_select(k[:, h : h + 1], bi, cs.n_keep)[0]
        q_gather, q_back, k_gather = q_gather[:, 0], q_back[:, 0], k_gather[:, 0]
        reads = q_gather.gather(1, q_back[:, rows])  # [B, r]: the kept query whose output each row gets
        c_scores = (_take(qh, reads) @ _take(kh, k_gather).transpose(1, 2)) * s  # [B, r, Lc]
        c_ok = None if kv_mask is None else kv_mask.gather(1, k_gather)[:, None, :]
        errors[h, CORESET] = _rel_err(_attend(c_scores, _take(vh, k_gather), c_ok), exact)
    errors[:, FULL] = 0.0
    return errors.cpu()


# ---- the decision ----------------------------------------------------------------------------


def branch_costs(cfg: RoutedConfig, grid) -> torch.Tensor:
    """float64 [N_BRANCHES]: each branch's attention work as a share of dense at this grid and
    config (the branch table's relative_cost, via plan.branch_cost)."""
    from .plan import branch_cost  # plan imports dispatch; imported here to keep this module light

    return torch.tensor([branch_cost(i, cfg, grid) for i in range(N_BRANCHES)], dtype=torch.float64)


def decide_from_errors(errors, tau: float, costs=None, *, prev=None, margin: float = 0.1) -> torch.Tensor:
    """Per head, the cheapest branch whose error is <= tau; full when none is.

    errors: float [..., H, N_BRANCHES] (profile_heads' output, or a stack of them, e.g. [blocks,
    H, N_BRANCHES]); full's column is treated as 0. tau >= 0: tau = 0 routes every head full
    unless a sparse error is exactly 0. costs: [N_BRANCHES] relative costs (``branch_costs(cfg,
    grid)``); None ranks every sparse branch below full and equal to each other. Ties in cost go
    to the lower error, then to the lower branch id. A NaN error never passes.

    Monotone: raising tau only adds passing branches, so it never adds a full head.

    Hysteresis (``prev``, int [..., H], the previous decision): a head whose previous branch was
    sparse keeps it while that branch's error is <= tau * (1 + margin), against flicker of heads
    whose error sits near tau. Returns int8 [..., H].
    """
    errors = torch.as_tensor(errors).to("cpu", torch.float64)
    if errors.dim() < 1 or errors.shape[-1] != N_BRANCHES:
        raise ValueError(f"errors must be [..., H, {N_BRANCHES}] (branches {list(BRANCH_NAMES)}), got {tuple(errors.shape)}")
    tau = float(tau)
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if costs is None:
        costs = torch.tensor([1.0] + [0.0] * (N_BRANCHES - 1), dtype=torch.float64)
    costs = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
    if costs.numel() != N_BRANCHES:
        raise ValueError(f"costs must hold {N_BRANCHES} values (one per branch, {list(BRANCH_NAMES)}), got {costs.numel()}")
    errors = errors.clone()
    errors[..., FULL] = 0.0
    passing = errors <= tau  # NaN compares False
    passing[..., FULL] = True
    # order by (cost, error, branch id): equal costs share a rank, so the error decides between them
    n = N_BRANCHES
    cost_rank = (costs[None, :] < costs[:, None]).sum(1).double()  # branches that cost less
    err_rank = errors.nan_to_num(float("inf")).argsort(dim=-1, stable=True).argsort(dim=-1).double()
    key = (cost_rank * n + err_rank).masked_fill(~passing, float("inf"))
    choice = key.argmin(-1)  # argmin takes the first (lowest id) of equal keys
    if prev is not None:
        prev = torch.as_tensor(prev).to("cpu", torch.long)
        if prev.shape != choice.shape:
            raise ValueError(f"prev must be one branch id per head, shape {tuple(choice.shape)}, got {tuple(prev.shape)}")
        if int(prev.min()) < 0 or int(prev.max()) >= N_BRANCHES:
            raise ValueError(f"prev holds branch ids outside 0..{N_BRANCHES - 1}")
        prev_err = errors.gather(-1, prev[..., None])[..., 0]
        keep = (prev != FULL) & (prev_err <= tau * (1.0 + float(margin)))
        choice = torch.where(keep, prev, choice)
    return choice.to(torch.int8)


# ---- the stored profile ----------------------------------------------------------------------


def _cfg_summary(cfg: RoutedConfig) -> dict:
    s, c = cfg.sliding, cfg.coreset
    return {
        "sliding": {"tile": list(s.tile), "window": list(s.window)},
        "coreset": {"bucket": list(c.bucket), "keep_ratio": float(c.keep_ratio), "similarity": c.similarity},
    }


def _cfg_from_summary(d: dict) -> RoutedConfig:
    s, c = d["sliding"], d["coreset"]
    return RoutedConfig(SlidingTileConfig(tuple(s["tile"]), tuple(s["window"])),
                        CoresetConfig(tuple(c["bucket"]), float(c["keep_ratio"]), c["similarity"]))


@dataclass(frozen=True, eq=False)
class HeadProfile:
    """Profiled branch errors of a model's attention blocks at one grid and branch config.

    errors  float32 [blocks, H, N_BRANCHES] (profile_heads of each block, stacked)
    grid    (T, Hg, Wg)
    cfg     the branch config summary (tile, window, bucket, keep ratio, similarity): plain data
    n_rows  rows sampled per head; seed: the sample_rows seed
    costs   [N_BRANCHES] relative branch costs at this grid and config (branch_costs)

    ``table(tau)`` re-thresholds without re-profiling; ``to_dict``/``from_dict`` are JSON-safe
    (a non-finite error is stored as null and read back as NaN, which never passes a tau).
    """

    errors: torch.Tensor
    grid: tuple[int, int, int]
    cfg: dict
    n_rows: int
    seed: int
    costs: tuple[float, ...] = field(default=())

    @classmethod
    def build(cls, errors, grid, cfg: RoutedConfig, n_rows: int, seed: int) -> "HeadProfile":
        """From profile_heads outputs: one [H, N_BRANCHES] per block (a list) or [blocks, H, N]."""
        if isinstance(errors, (list, tuple)):
            errors = torch.stack([torch.as_tensor(e) for e in errors])
        errors = torch.as_tensor(errors).to("cpu", torch.float32)
        if errors.dim() != 3 or errors.shape[-1] != N_BRANCHES:
            raise ValueError(f"errors must be [blocks, H, {N_BRANCHES}], got {tuple(errors.shape)}")
        grid = check_grid(grid)
        return cls(errors, grid, _cfg_summary(cfg), int(n_rows), int(seed), tuple(branch_costs(cfg, grid).tolist()))

    @property
    def routed_config(self) -> RoutedConfig:
        """The branch config the profile was taken with (backends at their defaults)."""
        return _cfg_from_summary(self.cfg)

    def table(self, tau: float, costs=None, *, prev=None, margin: float = 0.1) -> torch.Tensor:
        """int8 [blocks, H]: decide_from_errors at tau (costs default to the profile's own)."""
        return decide_from_errors(self.errors, tau, self.costs if costs is None else costs, prev=prev, margin=margin)

    def to_dict(self) -> dict:
        e = self.errors.double()
        rows = [[[float(x) if math.isfinite(x) else None for x in head] for head in block] for block in e.tolist()]
        return {
            "format": PROFILE_FORMAT,
            "branches": list(BRANCH_NAMES),
            "grid": list(self.grid),
            "cfg": self.cfg,
            "n_rows": self.n_rows,
            "seed": self.seed,
            "costs": list(self.costs),
            "errors": rows,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadProfile":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"head profile format {d.get('format')!r}, this code reads format {PROFILE_FORMAT}; profile again")
        if list(d["branches"]) != list(BRANCH_NAMES):
            raise ValueError(f"head profile branches {d['branches']} differ from this code's {list(BRANCH_NAMES)}; profile again")
        errors = torch.tensor(
            [[[float("nan") if x is None else x for x in head] for head in block] for block in d["errors"]],
            dtype=torch.float32,
        )
        if errors.dim() != 3 or errors.shape[-1] != N_BRANCHES:
            raise ValueError(f"head profile errors must be [blocks, H, {N_BRANCHES}], got {tuple(errors.shape)}")
        cfg = _cfg_from_summary(d["cfg"])  # validates it
        return cls(errors, check_grid(d["grid"]), _cfg_summary(cfg), int(d["n_rows"]), int(d["seed"]),
                   tuple(float(c) for c in d["costs"]))
