"""Attention benchmark (not a test): VORTA branches vs dense attention, one call, same process.

    python -m bench.attention [--shapes wan14b-720p,...] [--mix 0.002] [--iters 10]

For each shape: dense SDPA with the cuDNN and flash backends (and flash-attn when it imports),
sliding tile with FlexAttention and with the Triton kernel (official and block-aligned tiles),
core-set with the torch path (official-style gather/scatter + SDPA) and the Triton path, and a
routed layer with a branch mix: contiguous heads (full, then sliding, then core-set; in sequence and
on side streams) and the same counts on a scattered head pattern (a fixed-seed permutation, as
trained routers give: the Triton kernels read and write those heads through a head table, the
other backends copy each subset). Reports ms, speed-up vs the best dense, TFLOP/s per kept block
relative to dense (padding counted as work), and max abs error against a reference on sampled
query rows. Writes bench/results/attention-<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vorta_ops.coreset import CoresetConfig, coreset_attention
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.full import FLASH_ATTN_AVAILABLE
from bench.timing import cuda_median_ms
from vorta_ops.layout import TileLayout
from vorta_ops.router import CORESET, FULL, SLIDING
from vorta_ops.sliding_tile import (
    ALIGNED_TILE,
    FLEX_BLOCK,
    HUNYUAN_TILE,
    WAN_TILE,
    SlidingTileConfig,
    available_backends,
    sliding_tile_flex,
    sliding_tile_reference,
    tile_window_tables,
)

SHAPES = {
    "wan1.3b-480p": dict(grid=(21, 30, 52), heads=12, tile=WAN_TILE),
    "wan14b-720p": dict(grid=(20, 45, 80), heads=40, tile=WAN_TILE),
    "hunyuan-720p": dict(grid=(30, 45, 80), heads=24, tile=HUNYUAN_TILE),
}
HEAD_DIM = 128
RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, warmup=3, iters=10) -> float:
    return cuda_median_ms(fn, warmup, iters)


def sliding_kept_flops(layout: TileLayout, cfg: SlidingTileConfig, B: int, H: int, D: int) -> float:
    """4*D*(query slots x key slots visited), padded tile slots counted as work."""
    _, _, span = tile_window_tables(layout, cfg)
    keys_per_tile = int(torch.prod(span)) * layout.tile_len
    return 4.0 * D * layout.num_tiles * layout.tile_len * keys_per_tile * B * H


def branch_mix(heads: int, mix_full: float, scattered: bool = False) -> list[int]:
    """Branch ids of a routed layer: round(heads * mix_full) full heads, the rest split evenly
    between sliding tile and core-set, in runs by branch, or (scattered) in a fixed-seed
    permutation, spread over the heads as a trained router spreads them."""
    n_full = round(heads * mix_full)
    n_slide = (heads - n_full) // 2
    branches = [FULL] * n_full + [SLIDING] * n_slide + [CORESET] * (heads - n_full - n_slide)
    if scattered:
        branches = [branches[i] for i in torch.randperm(heads, generator=torch.Generator().manual_seed(0)).tolist()]
    return branches


def save_results(kind: str, rows: list[dict], meta: dict, md_lines: list[str]) -> None:
    """bench/results/<kind>-<gpu>.json (rows, each stamped with device, torch and triton) and .md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"{kind}-{meta['device'].lower().replace(' ', '-')}"
    for r in rows:
        r.update(device=meta["device"], torch=meta["torch"], triton=meta["triton"])
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    base.with_suffix(".md").write_text("\n".join(md_lines) + "\n")
    print("wrote", base.with_suffix(".json"), base.with_suffix(".md"))


def sampled_sliding_reference(q, k, v, grid, cfg, rows):
    """Exact sliding-tile attention for the query rows `rows` only, in fp32."""
    return sliding_tile_reference(q.float(), k.float(), v.float(), grid, cfg, rows=rows)


def smooth_qkv(grid, heads):
    """vorta_ops.demo's smooth, video-like q, k, v (local to global heads), bf16 on the GPU."""
    from vorta_ops.demo import synthetic_video_qkv

    return [x.to("cuda", torch.bfloat16) for x in synthetic_video_qkv(grid, heads=heads, head_dim=HEAD_DIM, seed=0)]


def rel_cos(o: torch.Tensor, ref: torch.Tensor) -> str:
    """'rel L2 x, cos y' of o against ref (both fp32)."""
    rel = float((o - ref).norm() / ref.norm())
    cos = float(F.cosine_similarity(o.flatten(), ref.flatten(), dim=0))
    return f"rel L2 {rel:.4f}, cos {cos:.5f}"


def run_shape(name, spec, mix_full, iters, rows_n=1024, no_flex=False, fp8_only=False):
    from vorta_ops.kernels.fp8_triton import fp8_attention

    grid, H, D, B = spec["grid"], spec["heads"], HEAD_DIM, 1
    L = math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = torch.randperm(L, generator=torch.Generator().manual_seed(0))[:rows_n].cuda()
    dense_flops = 4.0 * D * L * L * B * H
    out = []
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    smooth_cache = []

    def smooth():
        if not smooth_cache:
            smooth_cache.append(smooth_qkv(grid, H))
        return smooth_cache[0]

    def add(method, ms, flops=None, err=None, note=""):
        out.append(dict(shape=name, grid=list(grid), heads=H, head_dim=D, tokens=L, method=method, ms=round(ms, 3),
                        kept_flops=flops, max_abs_err=err, note=note))
        print(f"{name:>14} {method:<34} {ms:9.2f} ms  {note}", flush=True)

    ref_dense = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    dense_backends = (("dense sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("dense sdpa flash", SDPBackend.FLASH_ATTENTION))
    for method, backend in dense_backends[:1] if fp8_only else dense_backends:
        try:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v)
                err = float((o[:, :, rows].float() - ref_dense).abs().max())
                add(method, timeit(lambda: F.scaled_dot_product_attention(q, k, v), iters=iters), dense_flops, err)
        except RuntimeError as e:
            print(f"  {method} unavailable: {e}")
    if FLASH_ATTN_AVAILABLE and not fp8_only:
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        add("flash-attn", timeit(lambda: flash_attn_func(qt, kt, vt), iters=iters), dense_flops)

    backends = [b for b in available_backends() if not ((no_flex or fp8_only) and b == "flex")]
    for label, tile in (("official", spec["tile"]), ("aligned", ALIGNED_TILE)):
        cfg = SlidingTileConfig(tile)
        lay = TileLayout(grid, tile, FLEX_BLOCK)
        flops = sliding_kept_flops(lay, cfg, B, H, D)
        ref = sampled_sliding_reference(q, k, v, grid, cfg, rows)
        for bk in ("flex", "triton"):
            if bk not in backends:
                continue
            fn = (lambda: sliding_tile_flex(q, k, v, grid, cfg)) if bk == "flex" else (
                lambda: routed_attention(q, k, v, [SLIDING] * H, grid, RoutedConfig(cfg, sliding_backend="triton")))
            o = fn()
            err = float((o[:, :, rows].float() - ref).abs().max())
            add(f"sliding {bk} {label} {tile}", timeit(fn, iters=iters), flops, err,
                f"tile_len {lay.tile_len}, pad {lay.padding_fraction:.1%}")
        if "triton" in backends and fp8_ok:
            # the fp8 kernel (vorta_ops/fp8.py's scheme; K and V prepared once per call), with its distance from
            # exact on random and smooth, video-like inputs
            from vorta_ops.kernels.sliding_tile_triton import _layout_for, sliding_tile_forward

            layout = _layout_for(grid, cfg, 0, 0)
            for prec in ("fp8",):
                fn = lambda: sliding_tile_forward(q, k, v, layout, cfg, precision=prec)  # noqa: E731
                quality = []
                for kind, (qq, kk, vv) in (("random", (q, k, v)), ("smooth", smooth())):
                    o = sliding_tile_forward(qq, kk, vv, layout, cfg, precision=prec)[:, :, rows].float()
                    quality.append(f"{kind}: {rel_cos(o, sampled_sliding_reference(qq, kk, vv, grid, cfg, rows))}")
                add(f"sliding triton {prec} {label} {tile}", timeit(fn, iters=iters), flops, None, "; ".join(quality))

    ccfg = CoresetConfig()
    keep_tokens = None
    o_ref = None if fp8_only else coreset_attention(q, k, v, grid, ccfg)
    for bk in ("torch", "triton")[fp8_only:] + (("triton-fp8",) if fp8_ok else ()):
        if bk == "torch":
            fn = lambda: coreset_attention(q, k, v, grid, ccfg)
        else:
            try:
                from vorta_ops.kernels.coreset_triton import coreset_triton
            except Exception as e:  # not built yet / import error
                print(f"  coreset triton unavailable: {e}")
                continue
            prec = "fp8" if bk == "triton-fp8" else "bf16"
            fn = lambda: coreset_triton(q, k, v, grid, ccfg, precision=prec)  # noqa: E731
        o = fn()
        from vorta_ops.coreset import bucket_index

        bi = bucket_index(grid, ccfg.bucket)
        keep_tokens = bi.centre.numel() * ccfg.n_keep + bi.rest.numel()
        err = None if fp8_only else float((o.float() - o_ref.float()).abs().max()) if bk != "torch" else 0.0
        note = f"core-set {keep_tokens} tokens"
        if bk == "triton-fp8":  # vs the bf16 path's selection computed in fp32, on the sampled rows
            err = None
            quality = []
            for kind, (qq, kk, vv) in (("random", (q, k, v)), ("smooth", smooth())):
                r = coreset_attention(qq.float(), kk.float(), vv.float(), grid, ccfg)[:, :, rows]
                quality.append(f"{kind}: {rel_cos(coreset_triton(qq, kk, vv, grid, ccfg, precision='fp8')[:, :, rows].float(), r)}")
            note += "; " + "; ".join(quality)
        add(f"coreset {bk} keep {ccfg.keep_ratio}", timeit(fn, iters=iters), 4.0 * D * keep_tokens**2 * B * H, err, note)
    if keep_tokens and not fp8_only:
        qc = q[:, :, :keep_tokens]
        add("sdpa on core-set size (floor)", timeit(lambda: F.scaled_dot_product_attention(qc, qc, qc), iters=iters),
            4.0 * D * keep_tokens**2 * B * H)
        if fp8_ok:
            add("fp8 dense on core-set size", timeit(lambda: fp8_attention(qc, qc, qc), iters=iters),
                4.0 * D * keep_tokens**2 * B * H)
    if fp8_ok and not fp8_only:  # the dense fp8 kernel on the whole sequence (a candidate for the full branch)
        quality = []
        for kind, (qq, kk, vv) in (("random", (q, k, v)), ("smooth", smooth())):
            r = F.scaled_dot_product_attention(qq[:, :, rows].float(), kk.float(), vv.float())
            quality.append(f"{kind}: {rel_cos(fp8_attention(qq[:, :, rows], kk, vv).float(), r)}")
        add("dense fp8 (Triton)", timeit(lambda: fp8_attention(q, k, v), iters=iters), dense_flops, None,
            "; ".join(quality))

    branches, scattered = branch_mix(H, mix_full), branch_mix(H, mix_full, scattered=True)
    n_full, n_slide = branches.count(FULL), branches.count(SLIDING)
    patterns = (("", branches, (False, True)), (" scattered heads", scattered, (False,)))  # side streams: contiguous only
    if fp8_only:
        patterns = patterns[1:]
    for label, tile in (("official", spec["tile"]), ("aligned", ALIGNED_TILE)):
        for bk in [b for b in ("triton", "flex") if b in backends][:1]:
            for suffix, pattern, concurrents in patterns:
                for concurrent in concurrents:
                    cfg = RoutedConfig(SlidingTileConfig(tile), ccfg, bk, concurrent=concurrent)
                    fn = lambda: routed_attention(q, k, v, pattern, grid, cfg)
                    how = "branches on side streams" if concurrent else "branches in sequence"
                    add(f"routed {label} ({bk}) {n_full}/{n_slide}/{H - n_full - n_slide} f/s/c{suffix}",
                        timeit(fn, iters=iters), None, None, how)
        if fp8_ok and "triton" in backends:
            for suffix, pattern in ((("", branches),) if not fp8_only else ()) + ((" scattered heads", scattered),):
                cfg = RoutedConfig(SlidingTileConfig(tile), ccfg, precision="fp8")
                fn = lambda: routed_attention(q, k, v, pattern, grid, cfg)  # noqa: E731
                add(f"routed fp8 {label} {n_full}/{n_slide}/{H - n_full - n_slide} f/s/c{suffix}",
                    timeit(fn, iters=iters), None, None, "branches in sequence; sliding + core-set in fp8")
    return out


def finish(rows):
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape_rows in by_shape.values():
        dense = [r for r in shape_rows if r["method"].startswith(("dense sdpa", "flash-attn"))]  # bf16 dense backends
        best = min(dense, key=lambda r: r["ms"])
        best_tflops = best["kept_flops"] / best["ms"] / 1e9
        for r in shape_rows:
            r["speedup_vs_dense_best"] = round(best["ms"] / r["ms"], 3)
            r["dense_best"] = best["method"]
            tf = r["kept_flops"] / r["ms"] / 1e9 if r["kept_flops"] else None
            r["tflops"] = round(tf, 1) if tf else None
            r["kept_block_tflops_ratio"] = round(tf / best_tflops, 3) if tf else None
    return rows


def _fmt_err(e):
    return "" if e is None else f"{e:.2e}"


def write(rows, meta, kind="attention", note=""):
    lines = [f"# Attention benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, head dim {HEAD_DIM}, batch 1, one call; median of {meta['iters']} runs. "
             f"Speed-up is against the best dense SDPA backend of the same run; TFLOP/s ratio is per kept block (padding counted as work) vs that dense. "
             f"Kept work is counted on the block-128 tile layout; the Triton kernel skips whole padding blocks, so where a grid pads a lot (Wan 1.3B 480p: 39%) its ratio can exceed 1. "
             f"Errors: max abs vs exact references on {meta['rows']} sampled query rows (sliding, dense) or vs the torch core-set path (core-set); "
             "fp8 rows give relative L2 and cosine against exact on the sampled rows instead.", ""] + ([note, ""] if note else []) + [
             "| shape | method | ms | x vs dense | TFLOP/s | kept-block TFLOP/s ÷ dense | max abs err | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | {r['speedup_vs_dense_best']:.2f} | {r['tflops'] or ''} | "
                     f"{r['kept_block_tflops_ratio'] if r['kept_block_tflops_ratio'] is not None else ''} | "
                     f"{_fmt_err(r['max_abs_err'])} | {r['note']} |")
    save_results(kind, rows, meta, lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--mix", type=float, default=0.002, help="share of full-attention heads in the routed layer")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--no-flex", action="store_true", help="leave out the FlexAttention rows (slow to compile)")
    p.add_argument("--fp8-only", action="store_true",
                   help="only dense cuDNN, the Triton kernels in bf16 and fp8 and routed scattered heads in both "
                        "(bench/results/attention_fp8-<gpu>.*)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention needs a CUDA GPU; timings are only meaningful there")
    import triton

    try:
        from vorta_ops.kernels import sliding_tile_triton

        sliding_tile_triton.register()
    except Exception as e:
        print(f"triton sliding-tile kernel unavailable: {e}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                iters=a.iters, rows=a.rows, python=platform.python_version())
    rows = []
    for name in a.shapes.split(","):
        rows += run_shape(name, SHAPES[name], a.mix, a.iters, a.rows, a.no_flex, a.fp8_only)
        torch.cuda.empty_cache()
        write(finish(rows), meta, "attention_fp8" if a.fp8_only else "attention")  # after every shape, so a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
