"""Transformer-block benchmark (not a test): how much of a whole DiT block VORTA saves.

    python -m bench.block [--shapes wan14b-720p,hunyuan-720p] [--iters 5]

One Wan-2.1-14B-sized block at 720p (72,000 video tokens, dim 5120, 40 heads, FFN 13824, 512 text
tokens) in bf16, built from torch ops with random weights: self-attention (q/k/v/o projections,
RMS-normed q and k), cross-attention to the text, FFN, with the modulations reduced to layer
norms. Attention inside is dense cuDNN SDPA, or routed_attention with a branch mix (default 0.2%
full, the rest split evenly between sliding tile and core-set, heads scattered as a trained router
picks them). The block's other work is the same in both, so the ratio is the per-step speed-up
VORTA can give at this size (all blocks routed, no dense steps). A HunyuanVideo-720p-sized block
(dim 3072, 24 heads, 108,000 tokens; the same block structure, not HunyuanVideo's dual/single-stream
blocks) is the second shape. Writes bench/results/block-<gpu>.{json,md}.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import branch_mix, save_results
from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import RoutedConfig, routed_attention
from bench.timing import cuda_median_ms
from vorta_ops.router import CORESET, FULL, SLIDING
from vorta_ops.sliding_tile import ALIGNED_TILE, HUNYUAN_TILE, WAN_TILE, SlidingTileConfig

SHAPES = {
    "wan14b-720p": dict(grid=(20, 45, 80), dim=5120, heads=40, ffn=13824, text=512, tile=WAN_TILE),
    "hunyuan-720p": dict(grid=(30, 45, 80), dim=3072, heads=24, ffn=12288, text=256, tile=HUNYUAN_TILE),
}


class Block(torch.nn.Module):
    def __init__(self, dim, heads, ffn, text_dim=4096):
        super().__init__()
        self.heads = heads
        lin = lambda i, o: torch.nn.Linear(i, o)  # noqa: E731
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.q, self.k, self.v, self.o = (lin(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.cq, self.ck, self.cv, self.co = lin(dim, dim), lin(text_dim, dim), lin(text_dim, dim), lin(dim, dim)
        self.ffn = torch.nn.Sequential(lin(dim, ffn), torch.nn.GELU(approximate="tanh"), lin(ffn, dim))

    def split(self, x):  # [B, L, H*D] -> [B, H, L, D] view (ComfyUI's layout underneath)
        B, L, _ = x.shape
        return x.view(B, L, self.heads, -1).transpose(1, 2)

    def forward(self, x, context, attention):
        h = self.norm1(x)
        q, k, v = self.split(self.norm_q(self.q(h))), self.split(self.norm_k(self.k(h))), self.split(self.v(h))
        a = attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(x.shape))
        h = self.norm2(x)
        a = F.scaled_dot_product_attention(self.split(self.cq(h)), self.split(self.ck(context)), self.split(self.cv(context)))
        x = x + self.co(a.transpose(1, 2).reshape(x.shape))
        return x + self.ffn(self.norm3(x))


def dense(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def run_shape(name, spec, mix_full, iters):
    grid, dim, H = spec["grid"], spec["dim"], spec["heads"]
    L = math.prod(grid)
    torch.manual_seed(0)
    block = Block(dim, H, spec["ffn"]).to("cuda", torch.bfloat16)
    x = torch.randn(1, L, dim, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, spec["text"], 4096, device="cuda", dtype=torch.bfloat16)
    branches = branch_mix(H, mix_full, scattered=True)
    rows = []

    def add(method, fn, note=""):
        with torch.no_grad():
            ms = cuda_median_ms(fn, warmup=2, iters=iters)
        rows.append(dict(shape=name, grid=list(grid), dim=dim, heads=H, tokens=L, method=method, ms=round(ms, 2), note=note))
        print(f"{name:>14} {method:<44} {ms:9.2f} ms  {note}", flush=True)

    with torch.no_grad():
        add("block, dense attention (cuDNN SDPA)", lambda: block(x, ctx, dense))
        qkv = [block.split(torch.randn_like(x)) for _ in range(3)]
        add("dense self-attention alone", lambda qkv=qkv: dense(*qkv))
        del qkv
        precisions = ("bf16", "fp8") if torch.cuda.get_device_capability() >= (8, 9) else ("bf16",)
        for precision in precisions:
            for label, tile in (("official", spec["tile"]), ("aligned", ALIGNED_TILE)):
                cfg = RoutedConfig(SlidingTileConfig(tile), CoresetConfig(), precision=precision)
                routed = lambda q, k, v, cfg=cfg: routed_attention(q, k, v, branches, grid, cfg)  # noqa: E731
                n = {b: branches.count(b) for b in (FULL, SLIDING, CORESET)}
                what = "VORTA routed" if precision == "bf16" else "VORTA routed, sparse branches fp8"
                add(f"block, {what} ({label} tiles {tile})", lambda: block(x, ctx, routed),
                    f"{n[FULL]}/{n[SLIDING]}/{n[CORESET]} full/sliding/core-set heads, scattered")
    finish(rows)
    return rows


def finish(rows):
    """Ratios against the dense block of the same shape; the attention-alone row gets its share."""
    base = rows[0]["ms"]
    for r in rows:
        alone = r["method"].startswith("dense self-attention alone")
        r["speedup_vs_dense_block"] = None if alone else round(base / r["ms"], 3)
        if alone:
            r["note"] = f"{r['ms'] / base:.0%} of the dense block"


def write(rows, meta):
    lines = [f"# Transformer-block benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, batch 1, random weights; median of {meta['iters']} runs "
             "of one whole block (self-attention with projections, cross-attention to the text, FFN). "
             "Ratio: against the same block with dense cuDNN attention, in the same run. "
             "'dense self-attention alone' shows the attention's share of the dense block.", "",
             "| shape | method | ms | x vs dense block | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | "
              f"{'' if r['speedup_vs_dense_block'] is None else format(r['speedup_vs_dense_block'], '.2f')} | {r['note']} |"
              for r in rows]
    save_results("block", rows, meta, lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--mix", type=float, default=0.002, help="share of full-attention heads")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.block needs a CUDA GPU; timings are only meaningful there")
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, iters=a.iters)
    rows = []
    for name in a.shapes.split(","):
        rows += run_shape(name, SHAPES[name], a.mix, a.iters)
        torch.cuda.empty_cache()
        write(rows, meta)


if __name__ == "__main__":
    main()
