"""Embedded-default demo: routed attention on a built-in synthetic video, with no downloads.

The synthetic "video" is a smooth 3D field (a few low-frequency waves over t, h, w per channel)
plus a little noise, projected to q, k, v per head: neighbouring tokens are similar, which is the
redundancy core-set selection exploits. The router is synthetic too (seeded random weights on a
sinusoidal timestep embedding, biased against the full branch the way a trained router is), so
the decision table changes with the step like a real one. Nothing here is a trained model.
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
from .router import BRANCH_NAMES, FULL, RouterSet, decision_shares, sinusoidal_embedding
from .sliding_tile import SlidingTileConfig
from .viz import render_decisions

__all__ = ["synthetic_video_qkv", "synthetic_router", "timestep_embedding", "reference_attention", "run_demo"]


def timestep_embedding(t: float, dim: int) -> torch.Tensor:
    """[dim] sinusoidal embedding of one timestep (0..1000); the synthetic router's input."""
    return sinusoidal_embedding(t, dim)[0]


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


def synthetic_router(blocks=12, heads=8, embed_dim=256, seed=0) -> RouterSet:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(blocks, heads * 3, embed_dim, generator=g) * (3.0 / math.sqrt(embed_dim))
    b = torch.zeros(blocks, heads, 3)
    b[:, :, 0] = -2.5  # full attention is rare, as with trained routers
    b[:, :, 2] = torch.linspace(0.8, -0.4, blocks)[:, None]  # early blocks lean local
    return RouterSet("generic", w, b.reshape(blocks, heads * 3), meta={"note": "synthetic demo router, not trained"})


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
    tile=(2, 4, 4), window=(3, 3, 3), device=None, seed=0, log=print,
) -> dict:
    """Runs the three branches and the routed layer on a synthetic video, measures each against
    an independent float64 reference (``reference_attention``) and checks that the routed layer
    gives every head exactly its branch's output; writes the routing picture and a JSON summary
    into ``out_dir``. Bad arguments raise ValueError before anything is computed or written."""
    grid = check_grid(grid)
    heads, head_dim = _check_count("heads", heads), _check_count("head_dim", head_dim, even=True)
    blocks, steps = _check_count("blocks", blocks), _check_count("steps", steps)
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
    router = synthetic_router(blocks, heads, seed=seed)
    timesteps = torch.linspace(999, 0, steps).tolist()
    tables = torch.stack([router.decide(timestep_embedding(t, router.embed_dim)) for t in timesteps])
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
    img = render_decisions(tables, sigmas=[t / 1000.0 for t in timesteps], title="VORTA demo routing (synthetic router)")
    png = out / "vorta_demo_routing.png"
    img.save(png)
    (out / "vorta_demo_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"  wrote {png} and {out / 'vorta_demo_summary.json'}  (branches: {', '.join(BRANCH_NAMES)})")
    summary["png"] = str(png)
    return summary
