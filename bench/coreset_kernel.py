"""Self-timing of the fused Triton core-set path on a GPU (was ``python -m
vorta_ops.kernels.coreset_triton``): ``python -m bench.coreset_kernel --help``.
"""
from __future__ import annotations

import argparse
import math

import torch

from bench.timing import cuda_median_ms
from vorta_ops.coreset import CoresetConfig, coreset_attention
from vorta_ops.full import full_attention
from vorta_ops.kernels.coreset_triton import coreset_expand, coreset_select_gather, coreset_triton


def main(argv=None):
    """Time select+gather / attention / expand of the fused core-set path (CUDA)."""
    ap = argparse.ArgumentParser(description="time select+gather / attention / expand of the fused core-set path")
    ap.add_argument("--grid", type=int, nargs=3, default=(20, 45, 80))
    ap.add_argument("--bucket", type=int, nargs=3, default=(2, 3, 2))
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--sim", choices=("q", "qk"), default="q")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--torch", action="store_true", help="also time the torch coreset_attention")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs CUDA")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    cfg = CoresetConfig(tuple(a.bucket), a.keep, a.sim)
    grid = tuple(a.grid)
    L = math.prod(grid)
    B, H, D = a.batch, a.heads, a.dim
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    buf = torch.empty(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)

    def timed(fn):
        return cuda_median_ms(fn, warmup=1, iters=a.iters)

    cs = coreset_select_gather(q, k, v, grid, cfg)
    oc = full_attention(cs.qc, cs.kc, cs.vc)
    t_sel = timed(lambda: coreset_select_gather(q, k, v, grid, cfg))
    t_att = timed(lambda: full_attention(cs.qc, cs.kc, cs.vc))
    t_exp = timed(lambda: coreset_expand(oc, cs.back, buf))
    t_all = timed(lambda: coreset_triton(q, k, v, grid, cfg, out=buf))
    nbytes = q.element_size() * B * H * D
    Lc = cs.qc.shape[2]
    print(f"grid {grid} bucket {cfg.bucket} keep {a.keep} sim {a.sim} B {B} H {H} D {D} {a.dtype}: L {L} -> Lc {Lc}")
    rd = L + (L if a.sim == "qk" else Lc) + Lc  # rows read by select (q all; k all or kept; v kept)
    print(f"select+gather {t_sel:8.3f} ms  ({(rd + 3 * Lc) * nbytes / t_sel / 1e6:7.0f} GB/s)")
    print(f"attention     {t_att:8.3f} ms")
    print(f"expand        {t_exp:8.3f} ms  ({(Lc + L) * nbytes / t_exp / 1e6:7.0f} GB/s)")
    print(f"total         {t_all:8.3f} ms  overhead (select+expand)/attention = {100 * (t_sel + t_exp) / t_att:.2f} %")
    if a.torch:
        t_ref = timed(lambda: coreset_attention(q, k, v, grid, cfg))
        print(f"torch coreset_attention {t_ref:8.3f} ms")
        ref = coreset_attention(q, k, v, grid, cfg)
        got = coreset_triton(q, k, v, grid, cfg)
        bad = ((got.float() - ref.float()).abs().amax(-1) > 2e-2).float().mean().item()
        print(f"rows differing from torch: {100 * bad:.4f} %")


if __name__ == "__main__":
    main()
