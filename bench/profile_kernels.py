"""Counter profile of the attention kernels (not a test): one launch of each, under Nsight Compute.

    ncu --profile-from-start off --set detailed -o prof python -m bench.profile_kernels [--shape wan14b-720p]

Autotuning and warm-up run first, outside the profiled region; then cudaProfilerStart, one call of
dense cuDNN SDPA, the Triton sliding-tile kernel (official and aligned tiles) and the Triton
core-set path, cudaProfilerStop. ``bench/profile.sh`` runs it and writes the report as text.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import HEAD_DIM, SHAPES
from vorta_ops.coreset import CoresetConfig
from vorta_ops.sliding_tile import ALIGNED_TILE, SlidingTileConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="wan14b-720p", choices=sorted(SHAPES))
    p.add_argument("--fp8", action="store_true",
                   help="only the aligned sliding tile and the core-set path, each in bf16 and in fp8")
    a = p.parse_args(argv)
    from vorta_ops.kernels.coreset_triton import coreset_triton
    from vorta_ops.kernels.sliding_tile_triton import sliding_tile_triton

    spec = SHAPES[a.shape]
    grid, H = spec["grid"], spec["heads"]
    L = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    calls = {
        "dense cudnn": lambda: _cudnn(q, k, v),
        "sliding official": lambda: sliding_tile_triton(q, k, v, grid, SlidingTileConfig(spec["tile"])),
        "sliding aligned": lambda: sliding_tile_triton(q, k, v, grid, SlidingTileConfig(ALIGNED_TILE)),
        "coreset": lambda: coreset_triton(q, k, v, grid, CoresetConfig()),
    }
    if a.fp8:
        cfg = SlidingTileConfig(ALIGNED_TILE)
        calls = {f"sliding aligned {p}": (lambda p=p: sliding_tile_triton(q, k, v, grid, cfg, precision=p))
                 for p in ("bf16", "fp8")}
        calls.update({f"coreset {p}": (lambda p=p: coreset_triton(q, k, v, grid, CoresetConfig(), precision=p))
                      for p in ("bf16", "fp8")})
    for fn in calls.values():  # autotune, compile, warm caches: outside the profiled region
        fn(), fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in calls.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(calls))


def _cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    main()
