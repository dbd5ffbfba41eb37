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

from .coreset import CoresetConfig, coreset_attention
from .dispatch import RoutedConfig, routed_attention
from .full import full_attention
from .router import BRANCH_NAMES, RouterSet, decision_shares, sinusoidal_embedding
from .sliding_tile import SlidingTileConfig, sliding_tile_attention
from .viz import render_decisions

__all__ = ["synthetic_video_qkv", "synthetic_router", "timestep_embedding", "run_demo"]


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


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run_demo(
    out_dir="demo_out", grid=(8, 16, 24), heads=8, head_dim=64, blocks=12, steps=10,
    tile=(2, 4, 4), window=(3, 3, 3), device=None, seed=0, log=print,
) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RoutedConfig(SlidingTileConfig(tile, window), CoresetConfig())
    q, k, v = synthetic_video_qkv(grid, heads, head_dim, seed=seed, device=device, dtype=dtype)
    L = q.shape[2]
    log(f"VORTA demo on {device} ({dtype}): synthetic video grid {tuple(grid)} = {L} tokens, {heads} heads x {head_dim}")
    if device.type == "cpu":
        log("  (CPU runs the torch reference paths: times show correctness work, not speed-ups)")
    full_attention(q, k, v)  # warm-up
    dense, t_dense = _timed(lambda: full_attention(q, k, v), device)
    branch_runs = {
        "full": lambda: full_attention(q, k, v),
        "coreset": lambda: coreset_attention(q, k, v, grid, cfg.coreset),
        "sliding_tile": lambda: sliding_tile_attention(q, k, v, grid, cfg.sliding),
    }
    summary = {"device": str(device), "grid": list(grid), "tokens": L, "heads": heads, "head_dim": head_dim,
               "dense_ms": t_dense, "branches": {}, "steps": []}
    log(f"  {'branch':<13} {'rel err':>9} {'max abs':>9} {'ms':>8}")
    for name, fn in branch_runs.items():
        fn()
        o, ms = _timed(fn, device)
        rel, mx = _rel(o, dense), float((o.float() - dense.float()).abs().max())
        summary["branches"][name] = {"rel_err": rel, "max_abs_err": mx, "ms": ms}
        log(f"  {name:<13} {rel:>9.4f} {mx:>9.4f} {ms:>8.1f}")
    router = synthetic_router(blocks, heads, seed=seed)
    timesteps = torch.linspace(999, 0, steps).tolist()
    tables = torch.stack([router.decide(timestep_embedding(t, router.embed_dim)) for t in timesteps])
    log(f"  routed layer (block 0) per step:  {'full':>5} {'core':>5} {'slide':>5}  {'rel err':>8} {'ms':>7}")
    for s, t in enumerate(timesteps):
        routed_attention(q, k, v, tables[s, 0], grid, cfg)  # warm-up: a new head split may compile kernels
        o, ms = _timed(lambda: routed_attention(q, k, v, tables[s, 0], grid, cfg), device)
        sh = decision_shares(tables[s])
        row = {"step": s, "timestep": t, "shares": sh, "block0_rel_err": _rel(o, dense), "block0_ms": ms}
        summary["steps"].append(row)
        log(f"  step {s:>2} t={t:6.1f}  all blocks: {sh['full']:5.2f} {sh['coreset']:5.2f} {sh['sliding_tile']:5.2f}  "
            f"{row['block0_rel_err']:8.4f} {ms:7.1f}")
    img = render_decisions(tables, [f"step {s} (t={t:.0f})" for s, t in enumerate(timesteps)],
                           title="VORTA demo routing (synthetic router)")
    png = out / "vorta_demo_routing.png"
    img.save(png)
    (out / "vorta_demo_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"  wrote {png} and {out / 'vorta_demo_summary.json'}  (branches: {', '.join(BRANCH_NAMES)})")
    summary["png"] = str(png)
    return summary
