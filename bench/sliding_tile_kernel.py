"""Self-timing of the Triton sliding-tile kernel on a GPU (was ``python -m
vorta_ops.kernels.sliding_tile_triton --bench``): ``python -m bench.sliding_tile_kernel --bench``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.timing import cuda_median_ms
from vorta_ops.layout import TileLayout
from vorta_ops.sliding_tile import (
    ALIGNED_TILE,
    HUNYUAN_TILE,
    WAN_TILE,
    SlidingTileConfig,
    sliding_tile_reference,
    tile_window_tables,
)


def main(argv=None, device: str = "cuda") -> None:
    """``python -m bench.sliding_tile_kernel --bench``: Wan-14B 720p (grid (20, 45, 80),
    40 heads, bf16, head dim 128) on the current GPU: cuDNN dense SDPA, then for the official and
    the aligned tile the kernel alone (autotuned) and the whole
    sliding_tile_triton call, with TFLOP/s per kept block relative to dense (padding to 128-slot
    tiles counted as work, as in bench/attention.py) and a sampled-rows error check."""
    p = argparse.ArgumentParser(prog="python -m bench.sliding_tile_kernel", description=main.__doc__)
    p.add_argument("--bench", action="store_true", help="run the benchmark (the only action)")
    p.add_argument("--grid", default="20,45,80", help="token grid T,H,W (default Wan-14B 720p)")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--comfy", action="store_true", help="inputs as ComfyUI hands them: [B, L, H, D] memory")
    p.add_argument("--hunyuan", action="store_true",
                   help="also HunyuanVideo 720p (30,45,80), 24 heads, tile (6,9,8): layout block 64 vs 128")
    a = p.parse_args(argv)
    if not a.bench:
        p.error("nothing to do: pass --bench")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--bench needs a CUDA GPU")

    import triton

    from vorta_ops.kernels import sliding_tile_triton as stt
    from vorta_ops.kernels.sliding_tile_configs import sta_fwd_tuned

    def timeit(fn, warmup=3):
        return cuda_median_ms(fn, warmup=warmup, iters=a.iters)

    def kept_flops(grid, tile, cfg, H, D):
        lay = TileLayout(grid, tile, 128)
        _, _, span = tile_window_tables(lay, cfg)
        return 4.0 * D * lay.num_tiles * lay.tile_len * int(torch.prod(span)) * lay.tile_len * H

    def sampled_err(q, k, v, out, grid, cfg, n=512):
        rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:n].to(q.device)
        ref = sliding_tile_reference(q.float(), k.float(), v.float(), grid, cfg, rows=rows)
        return float((out[:, :, rows].float() - ref).abs().max())

    def inputs(grid, H, D=128):
        L = math.prod(grid)
        g = torch.Generator(device=device).manual_seed(0)
        if a.comfy:
            return [torch.randn(1, L, H, D, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
                    for _ in range(3)]
        return [torch.randn(1, H, L, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3)]

    def dense(q, k, v):
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v)
                    return name, timeit(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as e:
                print(f"  dense sdpa {name} unavailable: {str(e).splitlines()[0]}")
        raise SystemExit("no dense SDPA backend to compare with")

    def best():
        c = getattr(sta_fwd_tuned, "best_config", None)
        if c is None:
            return ""
        return f"BLOCK {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}, {c.num_warps} warps, {c.num_stages} stages"

    def row(what, ms, flops, dense_tf, extra=""):
        tf = flops / ms / 1e9
        print(f"  {what:<46} {ms:8.2f} ms  {tf:6.1f} TFLOP/s/kept  {tf / dense_tf:5.3f} of dense  {extra}", flush=True)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"inputs {'[B, L, H, D] memory' if a.comfy else '[B, H, L, D] contiguous'}")

    shapes = [("wan14b-720p", tuple(int(x) for x in a.grid.split(",")), a.heads,
               (("official", WAN_TILE, None), ("aligned", ALIGNED_TILE, None)))]
    if a.hunyuan:
        hy_tiles = (("official", HUNYUAN_TILE, 64), ("official", HUNYUAN_TILE, 128), ("aligned", ALIGNED_TILE, None))
        shapes.append(("hunyuan-720p", (30, 45, 80), 24, hy_tiles))
    for shape, grid, H, tiles in shapes:
        q, k, v = inputs(grid, H)
        D = q.shape[-1]
        L = q.shape[2]
        name, dms = dense(q, k, v)
        dense_tf = 4.0 * D * L * L * H / dms / 1e9
        print(f"{shape} grid {grid}, {H} heads, L {L}:  dense sdpa {name} {dms:.2f} ms ({dense_tf:.1f} TFLOP/s)")
        for label, tile, force_block in tiles:
            cfg = SlidingTileConfig(tile)
            block = force_block or stt.layout_block(tile)
            layout = TileLayout(grid, tile, block)
            flops = kept_flops(grid, tile, cfg, H, D)
            print(f" {label} tile {tile}: layout block {block}, {layout.tile_len} slots per tile "
                  f"({layout.padding_fraction:.1%} padding)")
            launch, out = stt._launcher(q, k, v, layout, cfg)
            launch()  # autotunes on the first call
            row("kernel alone", timeit(launch), flops, dense_tf, f"[{best()}]")
            if force_block is None:
                fn = lambda: stt.sliding_tile_triton(q, k, v, grid, cfg)  # noqa: E731
                out = fn()
                err = sampled_err(q, k, v, out, grid, cfg)
                row("whole sliding_tile_triton call", timeit(fn), flops, dense_tf,
                    f"max abs err {err:.2e} (512 sampled rows)")
                lay128 = TileLayout(grid, tile, 128)  # the permutations the fused kernel no longer does
                qt = lay128.to_tiled(q)
                perm = lambda: ([lay128.to_tiled(x) for x in (q, k, v)], lay128.from_tiled(qt))  # noqa: E731
                print(f"  {'(old path: to_tiled x3 + from_tiled alone)':<46} {timeit(perm):8.2f} ms")
                del qt
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
