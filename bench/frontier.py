"""Error vs speed of one attention layer: VORTA's training-free routing (a tau sweep) against ComfyUI
core's sparse attention (Sol-Attn from comfy-kitchen, a tau sweep), on the same inputs in the same
run, both against dense cuDNN SDPA (a benchmark, not a test; GPU for the real shapes).

    python -m bench.frontier [--shape wan14b-720p] [--mixes 60/35/5,50/30/20] [--rows 256]

The layer's heads are planted, as video DiTs' heads are (mostly local or redundant, a few diffuse):
- local: q = k = random Fourier features of the token's 3D position at a high spatial frequency
  (scores fall off within a few tokens, like a RoPE'd local head);
- smooth: the same at a low frequency (broad, smooth scores over the whole video), v smooth;
- random: q, k, v Gaussian (no structure at all: what a random-weight model's heads look like).
A mix "60/35/5" puts 60% of the heads local, 35% smooth, 5% random, at fixed-seed positions.

Per mix, one row per method:
- dense cuDNN SDPA (the reference: error 0 by definition, speed 1x);
- VORTA at each tau: the training-free decision (vorta_ops.profiling: errors on r sampled query rows,
  cheapest branch within tau else full) and that routed layer (RoutingPlan.run, Triton kernels);
  relative L2 distance of the layer output from dense, and its time;
- VORTA speed mode at each attention-work target (vorta_ops.profiling.decide_for_budget: the least
  summed squared error that reaches the target; the "tau" column holds the target);
- Sol-Attn at each tau (comfy_kitchen.sol_attn, the kernel core's "Model Sparse Attention" runs).
Plus, per mix: the cost of the measurement itself (one profile_heads call) against the routed layer
and dense, and the agreement of the r-row decisions with decisions from the exact errors over all
rows (every branch run on every head by the kernels) and with the planted head kinds.

Writes bench/results/frontier-<gpu>.json, .md and .png (error against speed-up, both frontiers).
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

from bench.attention import save_results
from bench.timing import cuda_median_ms
from vorta_ops.branches import BRANCH_NAMES, CORESET, FULL, SLIDING
from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import RoutedConfig
from vorta_ops.plan import RoutingPlan
from vorta_ops.profiling import branch_costs, decide_for_budget, decide_from_errors, profile_heads, sample_rows
from vorta_ops.sliding_tile import DEFAULT_WINDOW, WAN_TILE, SlidingTileConfig

SHAPES = {  # name: grid, heads, head dim
    "wan14b-720p": ((20, 45, 80), 40, 128),
    "wan1.3b-480p": ((21, 30, 52), 12, 128),
    "tiny": ((4, 9, 8), 10, 128),  # a CPU smoke run of this script
}
TAUS = (0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2, 1.6, 2.0, 3.0)
SOL_TAUS = (1.0, 1.3, 1.6, 2.0)
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)  # speed mode: attention work targets (share of dense)
KINDS = ("local", "smooth", "random")
CFG = RoutedConfig(SlidingTileConfig(WAN_TILE, DEFAULT_WINDOW), CoresetConfig((2, 3, 2), 0.5, "q"))


def planted_layer(grid, heads, d, mix, device, seed=0):
    """q, k, v [1, H, L, d] bf16 and the planted kind of each head."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    counts = [round(heads * m / 100) for m in mix]
    counts[0] += heads - sum(counts)
    kinds = [k for k, n in zip(KINDS, counts) for _ in range(n)]
    kinds = [kinds[i] for i in torch.randperm(heads, generator=g).tolist()]
    T, Hg, Wg = grid
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Hg), torch.arange(Wg), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).float().to(device)
    L, half = pos.shape[0], d // 2
    q, k, v = (torch.empty(1, heads, L, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    for h, kind in enumerate(kinds):
        if kind == "random":
            for x, s in ((q, 1.5), (k, 1.5), (v, 1.0)):
                x[0, h] = (torch.randn(L, d, generator=g) * s).to(device)
            continue
        sigma = 0.3 if kind == "local" else 0.012  # cycles per token (vorta_ops.demo's local .. global heads)
        freq = (torch.randn(half, 3, generator=g) * sigma).to(device)
        phase = (torch.rand(half, generator=g) * 2 * math.pi).to(device)
        ang = 2 * math.pi * pos @ freq.T + phase
        feats = torch.cat((ang.cos(), ang.sin()), -1) * (5.3 / d ** 0.25)
        noise = lambda: (0.1 * torch.randn(L, d, generator=g)).to(device)  # noqa: E731
        q[0, h], k[0, h] = feats + noise(), feats + noise()
        vfreq = (torch.randn(d, 3, generator=g) * 0.08).to(device)
        v[0, h] = torch.sin(2 * math.pi * pos @ vfreq.T + (torch.rand(d, generator=g) * 6.28).to(device)) + noise()
    return q, k, v, kinds


def timer(device):
    """ms(fn): CUDA-event median on a GPU (bench.timing), wall-clock mean elsewhere (smoke runs)."""
    def ms(fn, warmup=2, iters=5):
        if device.type == "cuda":
            return cuda_median_ms(fn, warmup, iters)
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    return ms


def dense_fn(q, k, v):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def per_head_rel_l2(a, b) -> torch.Tensor:
    a, b = a.float(), b.float()
    return ((a - b).flatten(2).norm(dim=-1) / b.flatten(2).norm(dim=-1))[0].cpu()


def sol_attn():
    try:
        import comfy_kitchen as ck

        return ck
    except Exception:
        return None


def run_mix(shape, mix, r, device, ms):
    grid, H, D = SHAPES[shape]
    q, k, v, kinds = planted_layer(grid, H, D, mix, device)
    label = "/".join(map(str, mix))
    dense = dense_fn(q, k, v)
    dense_ms = ms(lambda: dense_fn(q, k, v))
    base = dict(shape=shape, mix=label, grid=list(grid), heads=H, rows=r)
    rows = [dict(base, method="dense cuDNN SDPA", tau=None, ms=round(dense_ms, 3), speedup=1.0, rel_l2=0.0)]

    # the measurement (what a profiled step pays) and its decision quality
    sample = sample_rows(grid, r, 0, seed=0).to(device)
    errors = profile_heads(q, k, v, grid, CFG, sample)
    prof_ms = ms(lambda: profile_heads(q, k, v, grid, CFG, sample), warmup=1, iters=3)
    every = torch.zeros(H, len(BRANCH_NAMES))  # exact errors over all rows: each branch on every head
    for b in (SLIDING, CORESET):
        out = RoutingPlan(torch.full((1, H), b, dtype=torch.int8), grid, CFG).run(0, q, k, v)
        every[:, b] = per_head_rel_l2(out, dense)
    costs = branch_costs(CFG, grid)
    want = {"local": SLIDING, "smooth": CORESET, "random": FULL}
    for tau in TAUS:
        table = decide_from_errors(errors, tau, costs)
        truth = decide_from_errors(every, tau, costs)
        plan = RoutingPlan(table[None], grid, CFG)
        out = plan.run(0, q, k, v)
        t = ms(lambda: plan.run(0, q, k, v))
        shares = {n: round(s, 3) for n, s in plan.sparsity().items()}
        rows.append(dict(base, method="VORTA training-free", tau=tau, ms=round(t, 3), speedup=round(dense_ms / t, 3),
                         rel_l2=round(rel_l2(out, dense), 5), shares=shares,
                         agree_all_rows=round(float((table == truth).float().mean()), 3),
                         agree_planted=round(sum(int(table[h]) == want[kd] for h, kd in enumerate(kinds)) / H, 3)))
    for budget in BUDGETS:  # speed mode: the least error at each attention-work target
        table = decide_for_budget(errors, budget, costs)
        plan = RoutingPlan(table[None], grid, CFG)
        out = plan.run(0, q, k, v)
        t = ms(lambda: plan.run(0, q, k, v))
        rows.append(dict(base, method="VORTA speed mode", tau=budget, ms=round(t, 3), speedup=round(dense_ms / t, 3),
                         rel_l2=round(rel_l2(out, dense), 5), shares={n: round(s, 3) for n, s in plan.sparsity().items()}))
    ck = sol_attn()
    if ck is not None:
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, T, H, 128)
        for tau in SOL_TAUS:
            out = ck.sol_attn(qs, ks, vs, tau=tau).transpose(1, 2)
            t = ms(lambda: ck.sol_attn(qs, ks, vs, tau=tau))
            rows.append(dict(base, method="Sol-Attn (comfy-kitchen)", tau=tau, ms=round(t, 3),
                             speedup=round(dense_ms / t, 3), rel_l2=round(rel_l2(out, dense), 5)))
    rows.append(dict(base, method="measurement (profile_heads)", tau=None, ms=round(prof_ms, 3),
                     speedup=None, rel_l2=None, of_dense=round(prof_ms / dense_ms, 3)))
    return rows


def frontier(points):
    """The lower-left hull of (speedup, error) points: for each speed, the least error at that speed or faster."""
    pts = sorted(points, key=lambda p: -p[0])
    out, best = [], math.inf
    for s, e in pts:
        if e < best:
            out.append((s, e))
            best = e
    return sorted(out)


def error_at_speed(front, speed):
    """Least error VORTA reaches at >= this speed-up (None if it never gets that fast)."""
    errs = [e for s, e in front if s >= speed]
    return min(errs) if errs else None


def speed_at_error(front, err):
    speeds = [s for s, e in front if e <= err]
    return max(speeds) if speeds else None


def compare(rows):
    out = []
    for mix in dict.fromkeys(r["mix"] for r in rows):
        vorta = frontier([(r["speedup"], r["rel_l2"]) for r in rows if r["mix"] == mix and r["method"].startswith("VORTA")])
        for r in rows:
            if r["mix"] == mix and r["method"].startswith("Sol"):
                out.append(dict(mix=mix, sol_tau=r["tau"], sol_speedup=r["speedup"], sol_rel_l2=r["rel_l2"],
                                vorta_rel_l2_at_that_speed=error_at_speed(vorta, r["speedup"]),
                                vorta_speedup_at_that_error=speed_at_error(vorta, r["rel_l2"])))
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    fig, axes = plt.subplots(1, len(mixes), figsize=(5.5 * len(mixes), 4.2), squeeze=False)
    for ax, mix in zip(axes[0], mixes):
        for method, colour, marker, label in (("VORTA training-free", "#009e73", "o", "VORTA quality mode (tau sweep)"),
                                              ("VORTA speed mode", "#0072b2", "^", "VORTA speed mode (work target)"),
                                              ("Sol", "#d55e00", "s", "Sol-Attn (tau sweep)")):
            pts = sorted((r["speedup"], r["rel_l2"], r["tau"]) for r in rows
                         if r["mix"] == mix and r["method"].startswith(method))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=label)
            for s, e, t in pts:
                ax.annotate(f"{t:g}", (s, e), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colour)
        ax.set_xlabel("speed-up vs dense cuDNN (one layer)")
        ax.set_ylabel("relative L2 distance from dense")
        ax.set_title(f"heads local/smooth/random = {mix}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="wan14b-720p", choices=sorted(SHAPES))
    ap.add_argument("--mixes", default="60/35/5,50/30/20")
    ap.add_argument("--rows", type=int, default=256)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ms = timer(device)
    rows = []
    for m in a.mixes.split(","):
        rows += run_mix(a.shape, tuple(int(x) for x in m.split("/")), a.rows, device, ms)
        for r in rows[-(len(TAUS) + len(BUDGETS) + len(SOL_TAUS) + 2):]:
            print(r)
    cmp = compare(rows)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # a CPU smoke run without triton still writes its results
        triton_version = None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{a.shape}"
    meta = {"device": name, "torch": torch.__version__, "triton": triton_version}
    ck = sol_attn()
    md = [f"# Error vs speed of one attention layer: VORTA training-free vs Sol-Attn ({name}, torch {meta['torch']}, "
          f"triton {meta['triton']}, comfy-kitchen {getattr(ck, '__version__', 'not installed')}, {platform.python_version()})", "",
          f"Shape {a.shape} {SHAPES[a.shape]} (grid, heads, head dim), batch 1, bf16; VORTA: official Wan tiles {WAN_TILE}, "
          f"window {DEFAULT_WINDOW}, core-set bucket (2,3,2) keep 0.5; training-free decisions from {a.rows} sampled "
          "query rows per head. Heads planted (bench/frontier.py says how): local / smooth-diffuse / random. Errors are "
          "relative L2 distances of the whole layer output from dense cuDNN SDPA on the same inputs; speed-ups are "
          "against dense cuDNN in the same run. Synthetic heads: real models' heads must be measured on real weights.", "",
          "| mix | method | tau | ms | speed-up | rel. L2 | branch shares (full / core-set / sliding) | decisions = all-row decisions | = planted kind |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sh = r.get("shares")
        shares = " / ".join(f"{sh[n]:.2f}" for n in BRANCH_NAMES) if sh else ""
        md.append(f"| {r['mix']} | {r['method']} | {'' if r['tau'] is None else r['tau']} | {r['ms']} | "
                  f"{'' if r['speedup'] is None else r['speedup']} | {'' if r['rel_l2'] is None else r['rel_l2']} | {shares} | "
                  f"{r.get('agree_all_rows', '')} | {r.get('agree_planted', '')} |")
    md += ["", "Against each Sol-Attn point: the least error VORTA's frontier reaches at that speed-up or faster, "
               "and the highest speed-up it reaches at that error or lower.", "",
           "| mix | Sol-Attn tau | Sol speed-up | Sol rel. L2 | VORTA rel. L2 at that speed | VORTA speed-up at that error |",
           "|---|---|---|---|---|---|"]
    for c in cmp:
        md.append(f"| {c['mix']} | {c['sol_tau']} | {c['sol_speedup']} | {c['sol_rel_l2']} | "
                  f"{c['vorta_rel_l2_at_that_speed']} | {c['vorta_speedup_at_that_error']} |")
    for r in rows:
        if r["method"].startswith("measurement"):
            md.append("")
            md.append(f"Mix {r['mix']}: one measurement (profile_heads, {a.rows} rows, all heads) {r['ms']} ms = "
                      f"{r['of_dense']:.3f} of a dense layer.")
    rows.append({"comparison": cmp})
    save_results("frontier", rows, meta, md)
    from bench.attention import RESULTS

    png = plot([r for r in rows if "mix" in r and r.get("speedup") is not None],
               RESULTS / f"frontier-{name.lower().replace(' ', '-')}.png")
    print("plot:", png)


if __name__ == "__main__":
    main()
