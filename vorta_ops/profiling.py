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
per bucket member: O(L * D)). That is O(r * L * D), never L x L. Heads run in chunks of several
at once (``chunk_heads``: as many as fit PROFILE_CHUNK_BYTES of fp32 working set), and each
product by v is blocked by keys (``_weighted_sum``): left whole, [r, L] @ [L, D] ran on a few SMs
for ~2-3 ms at L 72,000 whatever the number of heads, which is what made one head at a time slow.
H200, bf16, batch 2 (cond + uncond), one call = one block (bench/results/profiling-nvidia-h200.md):
Wan-1.3B 480p (L 32,760, 12 heads) r = 256 14 ms (one head at a time before: 48 ms), r = 64
7 ms (42), against 21 ms for dense SDPA and 8 ms for a routed layer; Wan-14B 720p (L 72,000,
40 heads) r = 256 103 ms (328), r = 64 47 ms (305), against 362 ms dense and 83 ms routed.
Profiling 4 steps of 50 then costs 4-14% of the run's routed attention time. A call makes one
host sync (the errors coming back to the CPU), none per head or chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .branches import BRANCH_NAMES, CORESET, FULL, N_BRANCHES, SLIDING
from .coreset import CoresetConfig, bucket_index, coreset_select
from .dispatch import RoutedConfig
from .layout import check_grid
from .sliding_tile import SlidingTileConfig

__all__ = ["sample_rows", "profile_heads", "chunk_heads", "decide_from_errors", "decide_for_budget", "branch_costs",
           "HeadProfile"]

PROFILE_FORMAT = 1  # HeadProfile.to_dict()'s "format"; bump when the fields change
# fp32 working set of one chunk of heads in profile_heads (see chunk_heads): 2 GiB, about 1.5 GiB
# of [B, h, r, L] score-sized matrices at r = 256, D = 128 (the rest: fp32 k, v of the chunk).
PROFILE_CHUNK_BYTES = 2 << 30
# Keys per partial product in _weighted_sum. probs [r, L] @ v [L, D] has one or two 128 x 128
# output tiles per (batch, head) and a reduction over all L keys: left whole, the GEMM runs on a
# handful of SMs (H200, fp32, L 72,000: ~2-3 ms each, whatever the number of heads); cut into
# blocks of this many keys it runs on L / PV_KEY_BLOCK times more.
PV_KEY_BLOCK = 2048


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
    """Checks the inputs; returns (rows on q's device, bounds). Rows on the CPU are range-checked
    here (bounds None); rows already on a device are checked with the result (bounds: int64 [2]
    min and max, left on the device so the check costs no sync of its own), clamped meanwhile so
    an out-of-range row never indexes out of bounds on the device."""
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
    if kv_mask is not None and (kv_mask.dtype != torch.bool or tuple(kv_mask.shape) != (q.shape[0], L)):
        raise ValueError(f"kv_mask must be bool [B, L] = [{q.shape[0]}, {L}], got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    bounds = None
    if rows.device.type == "cpu":
        _check_row_bounds(int(rows.min()), int(rows.max()), L)
    else:
        bounds = torch.stack((rows.min(), rows.max()))
        rows = rows.clamp(0, L - 1)
    return rows.to(q.device, non_blocking=True), bounds  # a pageable CPU source is staged: no sync


def _check_row_bounds(lo: int, hi: int, L: int) -> None:
    if lo < 0 or hi >= L:
        raise ValueError(f"rows must lie in [0, {L}), got {lo} .. {hi}")


def chunk_heads(B: int, L: int, D: int, r: int, budget: int = PROFILE_CHUNK_BYTES) -> int:
    """Heads profile_heads runs at once: the most whose fp32 working set fits ``budget`` bytes,
    at least 1. Per head: three [B, r, L] score-sized matrices (the scores, their softmax, and its
    copy blocked by keys in _weighted_sum) and the fp32 copies of k and v [B, L, D]:
    4 * B * L * (3r + 2D) bytes. E.g. B = 2, D = 128, r = 256: Wan-1.3B 480p (L 32,760) 8 heads,
    Wan-14B 720p (L 72,000) 3 heads."""
    return max(1, int(budget) // (4 * B * L * (3 * r + 2 * D)))


def _weighted_sum(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [B, h, r, n] @ v [B, h, n, D] -> [B, h, r, D], the n keys cut into blocks of
    PV_KEY_BLOCK (a partial product per block, summed; the remainder added last) so the GEMM
    spreads over the device (see PV_KEY_BLOCK). The blocking depends on n only, never on h, so
    it never makes a head's result depend on the heads beside it."""
    n = p.shape[-1]
    nb = n // PV_KEY_BLOCK
    if nb < 2:
        return p @ v
    m = nb * PV_KEY_BLOCK
    blocks = p[..., :m].unflatten(-1, (nb, PV_KEY_BLOCK)).transpose(-3, -2)  # [B, h, nb, r, block]
    out = (blocks @ v[..., :m, :].unflatten(-2, (nb, PV_KEY_BLOCK))).sum(-3)  # [B, h, r, D]
    return out if m == n else out + p[..., m:] @ v[..., m:, :]


def _tile_ok(grid, cfg: SlidingTileConfig, n_prefix: int, n_suffix: int, rows: torch.Tensor) -> torch.Tensor:
    """bool [r, L]: ``sliding_tile_mask(grid, cfg, n_prefix, n_suffix, rows.device, rows)``, built
    axis by axis from Python ints: no small host-to-device copies (each a stream sync) and no
    [r, L, 3] int64 difference (464 MB at r = 256 on Wan-14B 720p), only [r, L] bools."""
    T, Hg, Wg = grid
    n_grid = T * Hg * Wg
    dev = rows.device
    L = n_prefix + n_grid + n_suffix
    keys = torch.arange(L, device=dev) - n_prefix  # grid index of every key; extras fall outside [0, n_grid)
    key_extra = (keys < 0) | (keys >= n_grid)
    q_pos = rows - n_prefix
    row_extra = (q_pos < 0) | (q_pos >= n_grid)
    keys, q_pos = keys.clamp(0, n_grid - 1), q_pos.clamp(0, n_grid - 1)  # extras: any coordinate, masked below
    ok = torch.ones(rows.numel(), L, dtype=torch.bool, device=dev)
    for stride, size, tile, win in zip((Hg * Wg, Wg, 1), grid, cfg.tile, cfg.window):
        n, rad = -(-size // tile), win // 2  # tiles on this axis, window radius in tiles
        key_t = keys // stride % size // tile  # [L]
        # window centre clamped into [rad, n-1-rad]; when n < win the centre is rad (as sliding_tile_mask)
        centre = (q_pos // stride % size // tile).clamp(max=n - 1 - rad).clamp(min=rad)  # [r]
        ok &= (key_t[None, :] >= (centre - rad)[:, None]) & (key_t[None, :] <= (centre + rad)[:, None])
    return ok | row_extra[:, None] | key_extra[None, :]


def _rel_err(o: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[B, h, r, D] -> [h]: worst over the batch of ||o - ref||_F / ||ref||_F (fp32), per head."""
    num = (o - ref).flatten(2).norm(dim=-1)
    den = ref.flatten(2).norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (num / den).amax(0)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, h, L, D], idx [B, h, n] -> [B, h, n, D]."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _profile_sdpa(q, k, v, rows, tile_out, kv_mask, bi, cs: CoresetConfig, scale, heads_per_chunk, errors) -> None:
    """profile_heads' "sdpa" method: the exact, sliding-tile and core-set outputs of the sampled
    rows by scaled_dot_product_attention on the inputs' dtype; errors in fp32 into ``errors``."""
    import torch.nn.functional as F

    B, H = q.shape[:2]
    keep = None if kv_mask is None else kv_mask[:, None, None, :]  # [B, 1, 1, L]
    tile = ~tile_out[None, None]  # [1, 1, r, L]
    tile = tile if keep is None else tile & keep
    for h0 in range(0, H, heads_per_chunk):
        hs = slice(h0, min(h0 + heads_per_chunk, H))
        qr, kh, vh = q[:, hs, rows], k[:, hs], v[:, hs]
        exact = F.scaled_dot_product_attention(qr, kh, vh, attn_mask=keep, scale=scale).float()
        sliding = F.scaled_dot_product_attention(qr, kh, vh, attn_mask=tile, scale=scale)
        errors[hs, SLIDING] = _rel_err(sliding.float(), exact)
        del sliding
        q_gather, q_back = coreset_select(q[:, hs], bi, cs.n_keep)
        k_gather = q_gather if cs.similarity == "q" else coreset_select(k[:, hs], bi, cs.n_keep)[0]
        reads = q_gather.gather(-1, q_back[:, :, rows])
        c_keep = None
        if kv_mask is not None:
            c_keep = kv_mask[:, None, :].expand(-1, k_gather.shape[1], -1).gather(-1, k_gather)[:, :, None, :]
        core = F.scaled_dot_product_attention(_take(q[:, hs], reads), _take(kh, k_gather), _take(vh, k_gather),
                                              attn_mask=c_keep, scale=scale)
        errors[hs, CORESET] = _rel_err(core.float(), exact)


PROFILE_METHODS = ("auto", "exact", "sdpa")


def profile_heads(
    q, k, v, grid, cfg: RoutedConfig, rows, n_prefix: int = 0, n_suffix: int = 0, kv_mask=None, *, scale=None,
    heads_per_chunk: int | None = None, method: str = "auto",
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
    branches apply it. scale: softmax scale, default D**-0.5. heads_per_chunk: heads computed at
    once (every step above, selection included, runs on [B, h, ...] tensors); default
    ``chunk_heads(B, L, D, r)``. Each head's error does not depend on the chunking: the same
    per-head arithmetic, bit for bit on the CPU (tested against one head at a time); on CUDA the
    GEMM kernels change with the batch, so fp32 sums round otherwise (H200: <= 7e-5 absolute on
    errors of order 0.1, bench/results/profiling-*.md).

    method: "exact" computes every output above in fp32 from explicit score matrices (the
    reference); "sdpa" computes the same three outputs with torch's fused attention
    (scaled_dot_product_attention: flash / cuDNN / memory-efficient kernels on the inputs' dtype,
    fp32 accumulation, masks for the tile and the core-set; no [r, L] score matrix is made) and
    the errors from them in fp32: in bf16 its errors sit within about 0.005 of the exact ones
    (the outputs' rounding), far below any useful tau. "auto": sdpa on CUDA, exact elsewhere.

    Returns float32 [H, N_BRANCHES] on the CPU, columns in branch order (full, core-set, tile).
    """
    if method not in PROFILE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PROFILE_METHODS)}, got {method!r}")
    if method == "auto":
        method = "sdpa" if q.is_cuda else "exact"
    rows, bounds = _validate(q, k, v, grid, rows, n_prefix, n_suffix, kv_mask)
    grid = check_grid(grid)
    B, H, L, D = q.shape
    r = rows.numel()
    if heads_per_chunk is None:  # the sdpa path makes no [r, L] score matrices
        heads_per_chunk = chunk_heads(B, L, D, r if method == "exact" else 0)
    elif isinstance(heads_per_chunk, bool) or not isinstance(heads_per_chunk, int) or heads_per_chunk < 1:
        raise ValueError(f"heads_per_chunk must be a whole number >= 1 (or None for chunk_heads), got {heads_per_chunk!r}")
    s = float(scale) if scale is not None else D ** -0.5
    dev = q.device
    tile_out = ~_tile_ok(grid, cfg.sliding, n_prefix, n_suffix, rows)  # [r, L]: keys the tile leaves out
    key_out = None if kv_mask is None else ~kv_mask[:, None, None, :]  # [B, 1, 1, L]
    cs: CoresetConfig = cfg.coreset
    bi = bucket_index(grid, cs.bucket, n_prefix, n_suffix, dev)
    errors = torch.zeros(H, N_BRANCHES, dtype=torch.float32, device=dev)  # on q's device: one sync, at the end
    if method == "sdpa":
        _profile_sdpa(q, k, v, rows, tile_out, kv_mask, bi, cs, s, heads_per_chunk, errors)
    for h0 in range(0, H if method == "exact" else 0, heads_per_chunk):
        hs = slice(h0, min(h0 + heads_per_chunk, H))
        kf, vf = k[:, hs].float(), v[:, hs].float()  # [B, h, L, D]
        # exact and sliding tile share one [B, h, r, L] score matrix, masked in place (key mask,
        # then the tile): two score-sized matrices live at most
        scores = (q[:, hs, rows].float() @ kf.transpose(-1, -2)).mul_(s)
        if key_out is not None:
            scores.masked_fill_(key_out, float("-inf"))
        exact = _weighted_sum(scores.softmax(-1), vf)  # [B, h, r, D]
        errors[hs, SLIDING] = _rel_err(_weighted_sum(scores.masked_fill_(tile_out, float("-inf")).softmax(-1), vf), exact)
        del scores
        # core-set: the selection of these heads, then only the sampled rows
        q_gather, q_back = coreset_select(q[:, hs], bi, cs.n_keep)  # [B, h, Lc], [B, h, L]
        k_gather = q_gather if cs.similarity == "q" else coreset_select(k[:, hs], bi, cs.n_keep)[0]
        reads = q_gather.gather(-1, q_back[:, :, rows])  # [B, h, r]: the kept query whose output each row gets
        c_scores = (_take(q[:, hs], reads).float() @ _take(kf, k_gather).transpose(-1, -2)).mul_(s)  # [B, h, r, Lc]
        if kv_mask is not None:
            c_keep = kv_mask[:, None, :].expand(-1, k_gather.shape[1], -1).gather(-1, k_gather)  # [B, h, Lc]
            c_scores.masked_fill_(~c_keep[:, :, None, :], float("-inf"))
        errors[hs, CORESET] = _rel_err(_weighted_sum(c_scores.softmax(-1), _take(vf, k_gather)), exact)
        del c_scores, kf, vf
    if bounds is None:
        return errors.cpu()
    back = torch.cat((errors.double().flatten(), bounds.double())).cpu()  # the call's one sync
    _check_row_bounds(int(back[-2]), int(back[-1]), L)
    return back[:-2].float().view(H, N_BRANCHES)  # float32 -> float64 -> float32 is exact


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



def decide_for_budget(errors, budget: float, costs, *, max_error: float | None = None, fixed=None) -> torch.Tensor:
    """Speed mode: per head the branches that bring the attention work down to at most ``budget``
    (a share of dense, averaged over all heads given) with the least summed squared error.

    errors: float [..., H, N_BRANCHES] as for decide_from_errors; costs: [N_BRANCHES] relative
    costs (full's is taken as 1). max_error: a branch whose error is above it is never used (a
    quality floor under the speed target). fixed: optional bool [..., H], heads kept full (they
    count at full cost). The squared errors of the heads add up the way a layer's relative L2
    distance does, so the greedy walk below takes the cheapest error per unit of work saved first:
    every head's options form a lower convex hull in (work saved, squared error), the hull segments
    of all heads go in order of their slope, and the walk stops as soon as the work is within
    budget (optimal up to the last segment). A budget it cannot meet leaves every usable head on
    its cheapest usable branch. Returns int8 [..., H].
    """
    errors = torch.as_tensor(errors).to("cpu", torch.float64)
    if errors.dim() < 1 or errors.shape[-1] != N_BRANCHES:
        raise ValueError(f"errors must be [..., H, {N_BRANCHES}] (branches {list(BRANCH_NAMES)}), got {tuple(errors.shape)}")
    if not 0.0 <= float(budget):
        raise ValueError(f"budget must be a share of dense attention work >= 0, got {budget}")
    costs = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
    if costs.numel() != N_BRANCHES:
        raise ValueError(f"costs must hold {N_BRANCHES} values (one per branch, {list(BRANCH_NAMES)}), got {costs.numel()}")
    shape = errors.shape[:-1]
    flat = errors.reshape(-1, N_BRANCHES)
    keep_full = torch.zeros(flat.shape[0], dtype=torch.bool) if fixed is None else torch.as_tensor(fixed).reshape(-1).bool()
    choice = torch.full((flat.shape[0],), FULL, dtype=torch.long)
    c = costs.tolist()
    c[FULL] = 1.0
    segments = []  # (slope, work saved, head, branch)
    for h in range(flat.shape[0]):
        if bool(keep_full[h]):
            continue
        pts = [(0.0, 0.0, FULL)]  # (work saved vs full, squared error, branch)
        for b in range(N_BRANCHES):
            e = float(flat[h, b])
            if b == FULL or not math.isfinite(e) or c[b] >= 1.0 or (max_error is not None and e > max_error):
                continue
            pts.append((1.0 - c[b], e * e, b))
        pts.sort(key=lambda p: (p[0], p[1]))
        hull = []  # lower convex hull from full towards cheaper branches (slopes rise along it)
        for p in pts:
            if hull and p[0] == hull[-1][0]:
                continue  # the same work at no less error
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) / (hull[-1][0] - hull[-2][0]) >= \
                    (p[1] - hull[-1][1]) / (p[0] - hull[-1][0]):
                hull.pop()
            hull.append(p)
        for (s0, e0, _), (s1, e1, b1) in zip(hull, hull[1:]):
            segments.append(((e1 - e0) / (s1 - s0), s1 - s0, h, b1))
    work = float(sum(1.0 if choice[h] == FULL else c[int(choice[h])] for h in range(flat.shape[0])))
    target = float(budget) * flat.shape[0]
    for slope, saved, h, b in sorted(segments, key=lambda s: (s[0], s[2])):
        if work <= target + 1e-9:
            break
        choice[h] = b
        work -= saved
    return choice.reshape(shape).to(torch.int8)


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
