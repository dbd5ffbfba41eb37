"""Embedded-default demo: routed attention on a built-in synthetic video, with no downloads.

The synthetic "video" is a smooth 3D field (a few low-frequency waves over t, h, w per channel)
plus a little noise, projected to q, k, v per head: neighbouring tokens are similar, which is the
redundancy core-set selection exploits. There is no router: the demo routes training-free
(profiling.py). Once per step bin it profiles every block's heads on sampled query rows
(profile_heads: each branch's relative error against exact attention) and takes, per head, the
cheapest branch within DEMO_TAU of dense (decide_from_errors, with hysteresis across bins). Each
block has its own synthetic heads (block 0 is the one the demo measures in full). Nothing here is
a trained model.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .coreset import CoresetConfig
from .dispatch import RoutedConfig, routed_attention
from .layout import check_grid
from .profiling import HeadProfile, branch_costs, decide_from_errors, profile_heads, sample_rows
from .router import BRANCH_NAMES, CORESET, FULL, SLIDING, decision_shares
from .sliding_tile import SlidingTileConfig
from .viz import render_decisions

__all__ = ["synthetic_video_qkv", "reference_attention", "run_demo", "DEMO_TAU", "DEMO_ROWS", "DEMO_BINS"]

# The demo's error budget: a head takes the cheapest sparse branch whose relative L2 error on the
# sampled rows is <= 0.3, else full. Why 0.3, on these synthetic heads (see synthetic_video_qkv):
# a branch that fits a head's pattern errs 0.002-0.06 (sliding tile on the local heads) or
# 0.12-0.26 (core-set on the global heads: they average a zero-mean v field, so the dense output is
# small and a relative error looks large), while a branch that misses the pattern errs 0.33-0.47
# (core-set on the local heads) or 0.29-0.44 (sliding tile on the most global heads of a small
# grid). 0.3 sits in that gap (checked at the default and the test sizes, seeds 0-2), so local
# heads go to sliding tile, global heads to core-set, and heads that neither fits stay full. It is
# a demo setting, not a quality recommendation for real models: their tau is to be calibrated
# (shared/research/training-free-routing.md, section 3).
DEMO_TAU = 0.3
DEMO_ROWS = 256  # sampled query rows per profile (the design's r; all rows when the grid is smaller)
DEMO_BINS = 4  # step bins, each profiled at its first step (the design's K)


def synthetic_video_qkv(grid, heads=8, head_dim=64, batch=1, noise=0.1, seed=0, device="cpu", dtype=torch.float32):
    """q, k, v [batch, heads, T*Hg*Wg, head_dim] from smooth 3D fields plus noise.

    q and k share random Fourier features of the token position, so q.k falls off with distance
    like a RoPE'd video model's; each head gets its own spatial frequency scale, from local heads
    (sharp, sliding-tile friendly) to global ones (broad, core-set friendly). v is a smooth field.
    """
    g = torch.Generator().manual_seed(seed)
    T, Hg, Wg = grid
    pos = torch.stack(
        torch.meshgrid(torch.arange(T), torch.arange(Hg), torch.arange(Wg), indexing="ij"), dim=-1
    ).reshape(-1, 3).float()  # [L, 3] token coordinates
    L, half = pos.shape[0], head_dim // 2
    q, k, v = (torch.empty(heads, L, head_dim) for _ in range(3))
    for h in range(heads):
        sigma = 0.3 * (0.04 ** (h / max(heads - 1, 1)))  # cycles per token: local ... global
        freq = torch.randn(half, 3, generator=g) * sigma
        ang = 2 * math.pi * pos @ freq.T + torch.rand(half, generator=g) * 2 * math.pi
        feats = torch.cat((ang.cos(), ang.sin()), dim=-1) * (5.3 / head_dim**0.25)  # peak logit ~14
        q[h] = feats + noise * torch.randn(L, head_dim, generator=g)
        k[h] = feats + noise * torch.randn(L, head_dim, generator=g)
        vfreq = torch.randn(head_dim, 3, generator=g) * 0.08
        v[h] = torch.sin(2 * math.pi * pos @ vfreq.T + torch.rand(head_dim, generator=g) * 6.28)
        v[h] += noise * torch.randn(L, head_dim, generator=g)
    return tuple(x[None].expand(batch, -1, -1, -1).contiguous().to(device, dtype) for x in (q, k, v))


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def reference_attention(q, k, v, chunk_bytes: int = 1 << 27) -> torch.Tensor:
    """Plain attention, softmax(q k^T / sqrt(d)) v, written out in float64 (no SDPA, no code of
    this pack): the independent reference the demo measures every branch against. Query rows go
    in chunks of about ``chunk_bytes`` of scores. Returns float64 [B, H, L, D]."""
    B, H, L, D = q.shape
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    out = torch.empty(B, H, L, D, dtype=torch.float64, device=q.device)
    rows = max(1, chunk_bytes // (8 * k.shape[2]))
    scale = 1.0 / math.sqrt(D)
    for b in range(B):
        for h in range(H):
            kt, vv = k64[b, h].T, v64[b, h]
            for r0 in range(0, L, rows):
                s = (q64[b, h, r0:r0 + rows] @ kt) * scale
                p = (s - s.amax(dim=-1, keepdim=True)).exp()
                out[b, h, r0:r0 + rows] = (p / p.sum(dim=-1, keepdim=True)) @ vv
    return out


def _errors(o, ref):
    """(relative Frobenius error, max abs error) of o against the float64 reference."""
    d = o.to(torch.float64) - ref
    return float(d.norm() / ref.norm().clamp_min(1e-300)), float(d.abs().max())


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda (or leave --device out)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"the demo runs on cpu or cuda, not {device!r}; use --device cpu or --device cuda")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(
            f"device {device!r} is not available: {why} (torch {torch.__version__}); "
            f"use --device cpu, or leave --device out to pick cuda only when it works"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        which = "--device cuda:0 (or cuda)" if n == 1 else f"--device cuda:0 .. cuda:{n - 1}"
        raise ValueError(f"device {device!r} does not exist: {n} CUDA device(s) visible; use {which}")
    return dev


def _check_count(name: str, value, even: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    if even and value % 2:
        raise ValueError(f"{name} must be even (cos/sin feature pairs), got {value}; use e.g. 64")
    return value


def _prepare_out(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file, not a folder; pass a folder path with --out (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out} ({e.strerror or e}); pass another --out") from None
    return out


def run_demo(
    out_dir="demo_out", grid=(8, 16, 24), heads=8, head_dim=64, blocks=12, steps=10,
    tile=(2, 4, 4), window=(3, 3, 3), device=None, seed=0, log=print, tau=DEMO_TAU,
) -> dict:
    """Runs the three branches and the routed layer on a synthetic video, measures each against
    an independent float64 reference (``reference_attention``) and checks that the routed layer
    gives every head exactly its branch's output; the routing table comes from profiling the
    synthetic heads (``_profile_tables``) at error budget ``tau``. Writes the routing picture and a
    JSON summary into ``out_dir``. Bad arguments raise ValueError before anything is computed or
    written."""
    grid = check_grid(grid)
    heads, head_dim = _check_count("heads", heads), _check_count("head_dim", head_dim, even=True)
    blocks, steps = _check_count("blocks", blocks), _check_count("steps", steps)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"tau must be a number >= 0 (the relative error a sparse branch may have), got {tau!r}")
    cfg = RoutedConfig(SlidingTileConfig(tile, window), CoresetConfig())  # checks tile and window
    device = _resolve_device(device)
    out = _prepare_out(out_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = synthetic_video_qkv(grid, heads, head_dim, seed=seed, device=device, dtype=dtype)
    L = q.shape[2]
    log(f"VORTA demo on {device} ({dtype}): synthetic video grid {tuple(grid)} = {L} tokens, {heads} heads x {head_dim}")
    if device.type == "cpu":
        log("  (CPU runs the torch reference paths: times show correctness work, not speed-ups)")
    ref = reference_attention(q, k, v)
    summary = {"device": str(device), "grid": list(grid), "tokens": L, "heads": heads, "head_dim": head_dim,
               "reference": "float64 softmax(q k^T / sqrt(d)) v", "dense_ms": None, "branches": {}, "steps": []}
    # each branch as the pack runs it: the routed dispatch with every head on that branch
    branch_out = {}
    log(f"  {'branch':<13} {'rel err':>9} {'max abs':>9} {'ms':>8}   (errors against the float64 reference)")
    for bid, name in enumerate(BRANCH_NAMES):
        table = torch.full((heads,), bid, dtype=torch.int8)
        run = lambda: routed_attention(q, k, v, table, grid, cfg)  # noqa: E731
        run()  # warm-up
        o, ms = _timed(run, device)
        branch_out[bid] = o
        rel, mx = _errors(o, ref)
        summary["branches"][name] = {"rel_err": rel, "max_abs_err": mx, "ms": ms}
        log(f"  {name:<13} {rel:>9.2e} {mx:>9.2e} {ms:>8.1f}")
    summary["dense_ms"] = summary["branches"][BRANCH_NAMES[FULL]]["ms"]
    timesteps = torch.linspace(999, 0, steps).tolist()
    tables, routing = _profile_tables(q, k, v, grid, cfg, blocks, steps, seed, float(tau), log)
    summary["routing"] = routing
    log(f"  routed layer (block 0) per step:  {'full':>5} {'core':>5} {'slide':>5}  {'rel err':>8} {'dispatch':>8} {'ms':>7}")
    for s, t in enumerate(timesteps):
        routed_attention(q, k, v, tables[s, 0], grid, cfg)  # warm-up: a new head split may compile kernels
        o, ms = _timed(lambda: routed_attention(q, k, v, tables[s, 0], grid, cfg), device)
        # every head must be exactly what its branch gives on its own
        expect = torch.empty_like(o)
        for h, b in enumerate(tables[s, 0].tolist()):
            expect[:, h] = branch_out[b][:, h]
        dispatch = float((o.float() - expect.float()).abs().max())
        sh = decision_shares(tables[s])
        rel = _errors(o, ref)[0]
        row = {"step": s, "timestep": t, "shares": sh, "block0_branches": tables[s, 0].tolist(),
               "block0_rel_err": rel, "block0_dispatch_max_abs": dispatch, "block0_ms": ms}
        summary["steps"].append(row)
        log(f"  step {s:>2} t={t:6.1f}  all blocks: {sh['full']:5.2f} {sh['coreset']:5.2f} {sh['sliding_tile']:5.2f}  "
            f"{rel:8.4f} {dispatch:8.1e} {ms:7.1f}")
    log("  (rel err: routed layer against the float64 reference; dispatch: max |routed - per-head branch outputs|)")
    # a flow-matching schedule (as Wan and HunyuanVideo use) has sigma = timestep / 1000
    img = render_decisions(tables, sigmas=[t / 1000.0 for t in timesteps],
                           title=f"VORTA demo routing (training-free, tau {float(tau):g})")
    png = out / "vorta_demo_routing.png"
    img.save(png)
    (out / "vorta_demo_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"  wrote {png} and {out / 'vorta_demo_summary.json'}  (branches: {', '.join(BRANCH_NAMES)})")
    summary["png"] = str(png)
    return summary


def _profile_tables(q, k, v, grid, cfg: RoutedConfig, blocks: int, steps: int, seed: int, tau: float, log):
    """The demo's routing table int8 [steps, blocks, heads], training-free.

    The steps are cut into min(DEMO_BINS, steps) equal bins; at the first step of each bin every
    block's heads are profiled on DEMO_ROWS stratified rows (a new row seed per bin) and decided at
    ``tau``, with hysteresis against the block's previous bin; the bin's other steps reuse that
    table. Block 0 is the demo's q, k, v; block b > 0 gets synthetic heads of seed ``seed + b``,
    rolled by b along the heads so the blocks' local and global heads sit at different places, as
    in a real model (made once, dropped after its profiles). Unlike the design there is no dense warm-up (first
    steps, block 0): the demo's heads do not change with the step, and block 0 is the routed layer
    the demo checks. Returns (tables, the summary's "routing" entry).
    """
    heads, head_dim = q.shape[1], q.shape[3]
    n_bins = min(DEMO_BINS, steps)
    first = [b * steps // n_bins for b in range(n_bins)]  # first step of each bin
    r = min(DEMO_ROWS, math.prod(grid))
    rows = [sample_rows(grid, max(r, grid[0]), seed=seed * 1000 + b) for b in range(n_bins)]
    costs = branch_costs(cfg, grid)
    errors = torch.zeros(n_bins, blocks, heads, len(BRANCH_NAMES))
    decided = torch.zeros(n_bins, blocks, heads, dtype=torch.int8)
    t0 = time.perf_counter()
    for blk in range(blocks):
        qkv = (q, k, v) if blk == 0 else tuple(x.roll(blk, dims=1) for x in synthetic_video_qkv(
            grid, heads, head_dim, seed=seed + blk, device=q.device, dtype=q.dtype))
        prev = None
        for b in range(n_bins):
            errors[b, blk] = profile_heads(*qkv, grid, cfg, rows[b])
            prev = decided[b, blk] = decide_from_errors(errors[b, blk], tau, costs, prev=prev)
    profile_ms = (time.perf_counter() - t0) * 1e3
    bin_of = [min(s * n_bins // steps, n_bins - 1) for s in range(steps)]
    tables = decided[bin_of]
    profiles = [HeadProfile.build(errors[b], grid, cfg, rows[b].numel(), seed * 1000 + b) for b in range(n_bins)]
    log(f"  training-free routing: {n_bins} step bins x {blocks} blocks profiled on {rows[0].numel()} rows each "
        f"({profile_ms:.0f} ms in all); tau {tau:g}; costs vs dense: "
        + ", ".join(f"{n} {float(c):.2f}" for n, c in zip(BRANCH_NAMES, costs)))
    log(f"  block 0 profile (bin 0):  {'head':>4} {'core err':>9} {'tile err':>9}  branch")
    for h in range(heads):
        e = errors[0, 0, h]
        log(f"  {'':25}{h:>4} {float(e[CORESET]):9.4f} {float(e[SLIDING]):9.4f}  {BRANCH_NAMES[int(decided[0, 0, h])]}")
    routing = {
        "method": "training-free: profile_heads on sampled rows, then decide_from_errors (cheapest branch with error <= tau)",
        "tau": tau, "rows": rows[0].numel(), "bins": n_bins, "profiled_steps": first, "profile_ms": profile_ms,
        "profiles": [p.to_dict() for p in profiles],
    }
    return tables, routing
