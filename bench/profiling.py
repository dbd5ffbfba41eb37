"""What training-free profiling costs (GPU only; a benchmark, not a test).

    python -m bench.profiling [--shapes wan1.3b-480p,wan14b-720p] [--rows 64,256] [--iters 5]
                              [--before OLD_PROFILING_PY]

One ``profile_heads`` call profiles one attention block. For each shape (bf16, head dim 128,
batch 2 as the cond and uncond halves of a CFG batch) and each number of sampled rows r, on the
same q, k, v in the same process:

- profile ms: one call, heads in chunks (``chunk_heads``' default), one head at a time
  (``heads_per_chunk=1``) and, where the default chunk is smaller, all heads at once, wall time with the call's own sync in it (the call ends by copying the
  errors to the CPU, so its wall time is what a sampling step pays); rows passed on the GPU, as
  the ComfyUI router passes them;
- against dense cuDNN SDPA and the routed layer (``routed_attention``, half sliding-tile heads with
  the official Wan tiles (5, 9, 8) and window (3, 3, 3), half core-set heads, scattered): CUDA-event
  medians of one call;
- share of a run: profiling 4 of 50 steps costs profile_ms * 4 * blocks / (50 * blocks * routed_ms)
  of the run's routed attention time (the blocks cancel);
- host syncs per call (``torch.cuda.set_sync_debug_mode``), the call's peak memory above its
  inputs, and the largest difference between the chunked and the one-head errors;
- ``--before FILE``: also an earlier ``vorta_ops/profiling.py`` (e.g. ``git show
  REV:vorta_ops/profiling.py > FILE``), loaded as a module of vorta_ops and timed the same way.

Inputs: vorta_ops.demo.synthetic_video_qkv (smooth fields, local to global heads) for the cond
half, plus small noise for the uncond half. Writes bench/results/profiling-<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import branch_mix, save_results
from bench.timing import cuda_median_ms
from vorta_ops.coreset import CoresetConfig
from vorta_ops.demo import synthetic_video_qkv
from vorta_ops.dispatch import RoutedConfig, routed_attention  # vorta_ops registers the Triton kernels
from vorta_ops.profiling import PROFILE_CHUNK_BYTES, PV_KEY_BLOCK, chunk_heads, profile_heads, sample_rows
from vorta_ops.sliding_tile import DEFAULT_WINDOW, WAN_TILE, SlidingTileConfig

SHAPES = {  # name: grid, heads, attention blocks of the model
    "wan1.3b-480p": dict(grid=(21, 30, 52), heads=12, blocks=30),
    "wan14b-720p": dict(grid=(20, 45, 80), heads=40, blocks=40),
}
BATCH, HEAD_DIM = 2, 128
PROFILED_STEPS, STEPS = 4, 50  # the share column: 4 profiled steps in a 50-step run
CFG = RoutedConfig(SlidingTileConfig(WAN_TILE, DEFAULT_WINDOW), CoresetConfig())


def make_qkv(grid, heads, seed=0):
    """bf16 [2, heads, L, 128] on the GPU: synthetic_video_qkv (made on the CPU for one sample)
    for the cond half, the same plus noise of 0.05 for the uncond half."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for x in synthetic_video_qkv(grid, heads=heads, head_dim=HEAD_DIM, seed=seed):
        x = x.to("cuda")
        out.append(torch.cat((x, x + 0.05 * torch.randn(x.shape, device="cuda", generator=g))).bfloat16())
    return out


def wall_median_ms(fn, warmup=2, iters=5) -> float:
    """Median wall time of fn() in ms, the GPU idle at each start and drained at each end."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def count_syncs(fn) -> int:
    """Host syncs in one fn() call, as torch.cuda.set_sync_debug_mode('warn') reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def peak_mib(fn) -> float:
    """Memory one fn() call allocates above what was allocated before it, at its peak, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def load_before(path):
    """An earlier vorta_ops/profiling.py, imported as vorta_ops._profiling_before."""
    spec = importlib.util.spec_from_file_location("vorta_ops._profiling_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def run_shape(name, spec, rs, iters, before=None):
    grid, H, blocks = spec["grid"], spec["heads"], spec["blocks"]
    L = math.prod(grid)
    q, k, v = make_qkv(grid, H)
    out = []

    def add(method, ms, **extra):
        out.append(dict(shape=name, grid=list(grid), heads=H, tokens=L, batch=BATCH, head_dim=HEAD_DIM, blocks=blocks,
                        method=method, ms=round(ms, 3), **extra))
        print(f"{name:>13} {method:<34} {ms:9.2f} ms  {extra}", flush=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = cuda_median_ms(lambda: F.scaled_dot_product_attention(q, k, v), 2, iters)
    add("dense sdpa cudnn", dense_ms)
    branches = branch_mix(H, 0.0, scattered=True)  # half sliding tile, half core-set
    routed_ms = cuda_median_ms(lambda: routed_attention(q, k, v, branches, grid, CFG), 2, iters)
    add("routed (half tile, half core-set)", routed_ms, sliding_backend=CFG.sliding_backend)

    for r in rs:
        rows = sample_rows(grid, r, seed=0).to(q.device)  # on the GPU, as the router passes them
        chunk = min(H, chunk_heads(BATCH, L, HEAD_DIM, r))
        # (label, heads per chunk, method): the fused-attention default, the exact fp32 reference path
        variants = [(f"profile r={r} sdpa (default)", None, "sdpa"),
                    (f"profile r={r} exact, chunked", chunk, "exact"),
                    (f"profile r={r} exact, one head at a time", 1, "exact")]
        if before is not None:
            variants.append((f"profile r={r} before (--before)", None, None))
        ref = profile_heads(q, k, v, grid, CFG, rows, heads_per_chunk=1, method="exact")
        for method, chunk, how in variants:
            fn = profile_heads if how is not None else before.profile_heads
            kw = {} if how is None else dict(method=how) if chunk is None else dict(heads_per_chunk=chunk, method=how)
            call = lambda: fn(q, k, v, grid, CFG, rows, **kw)  # noqa: E731
            e = call()
            rel = float(((e - ref).abs() / ref.abs().clamp_min(1e-30)).max())
            ms = wall_median_ms(call, 2, iters)
            add(method, ms, rows=r, heads_per_chunk=chunk, x_dense=round(ms / dense_ms, 3),
                x_routed=round(ms / routed_ms, 3),
                run_share=round(ms * PROFILED_STEPS * blocks / (STEPS * blocks * routed_ms), 4),
                syncs=count_syncs(call), peak_mib=round(peak_mib(call), 1),
                max_abs_diff_vs_one_head=float((e - ref).abs().max()), max_rel_diff_vs_one_head=rel)
        del ref
    # rows out of range on the GPU are refused after the call (checked with its one sync)
    try:
        profile_heads(q[:, :1], k[:, :1], v[:, :1], grid, CFG, torch.tensor([0, L], device=q.device))
        refused = False
    except ValueError:
        refused = True
    assert refused, "out-of-range rows on the GPU were not refused"
    return out


def write(rows, meta):
    lines = [
        f"# Training-free profiling cost on {meta['device']}", "",
        f"torch {meta['torch']}, triton {meta['triton']}, bf16, head dim {HEAD_DIM}, batch {BATCH} (cond + uncond), "
        f"synthetic smooth q, k, v (vorta_ops.demo). One profile_heads call = one attention block; its ms is the "
        f"median wall time of {meta['iters']} calls (its sync included), rows on the GPU. Dense (cuDNN SDPA) and "
        f"routed (half sliding tile, official Wan tiles {WAN_TILE} window {DEFAULT_WINDOW}; half core-set bucket "
        f"(2, 3, 2) keep 0.5; scattered heads) are CUDA-event medians of one call on the same q, k, v. "
        f"Run share = profile ms x {PROFILED_STEPS} x blocks / ({STEPS} x blocks x routed ms): {PROFILED_STEPS} "
        f"profiled steps of {STEPS}. Chunk = heads per chunk (chunk_heads' default in the chunked rows). Diff = "
        f"largest absolute difference of the errors (relative L2 errors, e.g. 0.05) against one head at a time "
        f"(fp32 sums in another order as the GEMMs' batch changes; the JSON has the relative one too).", "",
        *([f"Before rows: the profiling.py given as --before ({meta['before']}), timed the same way.", ""]
          if meta.get("before") else []),
        "| shape | method | ms | x dense | x routed | run share | chunk | syncs | peak MiB | diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "rows" not in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | | | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | {r['x_dense']:.2f} | {r['x_routed']:.2f} | "
                     f"{r['run_share']:.1%} | {r['heads_per_chunk'] or ''} | {r['syncs']} | {r['peak_mib']:.0f} | "
                     f"{r['max_abs_diff_vs_one_head']:.1e} |")
    save_results("profiling", rows, meta, lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="64,256", help="sampled rows per call, comma-separated")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--before", default=None, help="an earlier vorta_ops/profiling.py to time beside this one")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profiling needs a CUDA GPU; timings are only meaningful there")
    import triton

    before = load_before(a.before) if a.before else None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                iters=a.iters, python=platform.python_version(), before=a.before, pv_key_block=PV_KEY_BLOCK,
                chunk_bytes=PROFILE_CHUNK_BYTES)
    rows = []
    for name in a.shapes.split(","):
        rows += run_shape(name, SHAPES[name], [int(x) for x in a.rows.split(",")], a.iters, before)
        torch.cuda.empty_cache()
        write(rows, meta)  # after every shape, so a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
