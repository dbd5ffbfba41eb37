"""The Triton sliding-tile kernel (vorta_ops/kernels/sliding_tile_triton.py) against
sliding_tile_reference, run on CPU under TRITON_INTERPRET=1 at tiny sizes: original-order inputs
of any strides ([B, L, H, D] memory, head-subset views, mixed), out= into strided buffers, prefix /
suffix extras, kv masks, grids that cut tiles in t, h and w, layout blocks 16 to 128 (and the
choice of layout_block()), kernel blocks from 16 to 128 (BLOCK_N larger than the layout block too),
scattered head subsets (heads=: only those heads of out written, the others keep a NaN poison) and
the errors for bad head subsets.

TRITON_INTERPRET must be set before triton is imported, so the cases run in worker subprocesses
(two in parallel) with that variable set; this file itself never imports triton or vorta_ops.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from interp import SKIP_REASON  # noqa: E402

if SKIP_REASON is not None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_WORKERS = 2
TIMEOUT_S = 300

TOL = {"float32": (1e-5, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}  # (atol, rtol)

# api: "forward" = sliding_tile_forward on original-order tensors with an explicit layout block
# `block` and kernel blocks `cfg` (BLOCK_M, BLOCK_N); "backend" = the registered "triton" backend
# through sliding_tile_attention (LAYOUT_BLOCK set to `block`; None = layout_block(tile) picks);
# "fwd" = the compatibility entry sliding_tile_fwd on tiled tensors.
# mem: "bhld" contiguous [B, H, L, D]; "blhd" [B, L, H, D] memory seen as [B, H, L, D] (ComfyUI);
# "heads" a head-subset view (heads 1..H of a [B, L, H + 3, D] buffer); "mixed": one of each
# (q, k, v with three different row strides).
# out: None (allocated, must keep q's memory layout); "blhd" = a [B, L, H, D] buffer viewed as
# [B, H, L, D]; "step2" = a view with last-dim stride 2 (computed, then copied in).
# mask_all: VORTA_STA_MASK_ALL=1 (bias on every key block instead of the geometry masking).
# kv: None, "random" (random key mask incl. extras and grid keys), "suffix" (only trailing suffix
# tokens masked: the text-padding case, grid keys on the geometry path), "none_b1" (batch 1 masks
# every key: rows without any valid key must be 0, like SDPA).
# heads: a head subset (heads=) of the H heads, checked against the reference on those heads; out
# (a NaN-filled buffer like q when `out` is None) must keep NaN in the other heads. heads_tensor:
# pass the subset as a 1-D int tensor instead of a list.
_BASE = dict(pre=0, suf=0, block=16, cfg=(16, 16), D=64, dtype="float32", B=1, H=1, kv=None, api="forward",
             mem="bhld", out=None, mask_all=False, heads=None, heads_tensor=False, precision="bf16")
CASES = {
    "all_tiles_no_extras": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), H=2),
    "extras_prefix_suffix": dict(grid=(3, 5, 4), tile=(2, 3, 2), window=(3, 3, 3), pre=3, suf=5),
    "tile_1x4x4_window_1x3x3_block32": dict(grid=(4, 4, 8), tile=(1, 4, 4), window=(1, 3, 3), suf=7, block=32,
                                            cfg=(16, 32)),
    "cut_tiles_t_h_w": dict(grid=(3, 5, 11), tile=(2, 3, 2), window=(3, 3, 3), suf=3),
    "block32_bm32_bn16": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), pre=2, block=32, cfg=(32, 16)),
    "bn_larger_than_block": dict(grid=(3, 5, 7), tile=(2, 2, 3), window=(3, 3, 3), pre=1, suf=2, cfg=(16, 32)),
    "sliding_clamped_window": dict(grid=(5, 7, 8), tile=(2, 2, 2), window=(1, 3, 3), pre=2),
    "window_1x1x1_odd_grid": dict(grid=(5, 3, 5), tile=(2, 2, 2), window=(1, 1, 1), suf=1),
    "grid_smaller_than_tile_mask_all": dict(grid=(1, 3, 6), tile=(2, 2, 4), window=(3, 3, 3), pre=1, suf=1, H=2,
                                            mask_all=True),
    "kv_mask_random": dict(grid=(5, 6, 4), tile=(2, 2, 3), window=(3, 3, 1), suf=5, B=2, kv="random"),
    "kv_mask_fp16": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), pre=4, suf=3, B=2, kv="random",
                         dtype="float16"),
    "kv_mask_fully_masked_batch": dict(grid=(2, 4, 4), tile=(1, 2, 2), window=(3, 3, 3), suf=2, B=2,
                                       kv="none_b1"),
    "bf16_blhd_inputs": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), pre=1, suf=4, H=2, dtype="bfloat16",
                             mem="blhd"),
    "head_dim_128": dict(grid=(2, 4, 4), tile=(1, 4, 4), window=(3, 3, 3), suf=2, D=128),
    # precision fp8 (vorta_ops/fp8.py's scheme): checked against fp8_attention_reference with the tile mask
    # (relative L2 <= 1%: P is rounded at the running max in the kernel) and against exact (<= 5%)
    "fp8_extras_video_like": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 1), pre=1, suf=3, H=2,
                                  precision="fp8", mem="blhd"),
    "fp8_prefix_kv_mask_heads_blhd": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), pre=2, suf=4, B=2, H=3,
                                          heads=[1, 2], kv="suffix", precision="fp8", mem="blhd"),
    "fp8_kv_mask_heads_bf16": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), suf=4, B=2, H=3, heads=[2, 0],
                                   kv="suffix", precision="fp8", dtype="bfloat16"),
    "blhd_inputs_blhd_out": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), pre=2, H=2, mem="blhd",
                                 out="blhd"),
    "head_subset_views_out_step2": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), suf=2, H=2,
                                        mem="heads", out="step2"),
    "backend_api_kv_mask": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), pre=1, suf=2, H=2, block=32,
                                kv="random", api="backend", mem="heads"),
    # layout block from layout_block(tile): 24 tokens -> 64 slots; 72 tokens -> 128 (cut in h and w)
    "auto_layout_block_64_kv_suffix": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), suf=6, B=2,
                                           block=None, kv="suffix", api="backend", mem="blhd"),
    "auto_layout_block_128": dict(grid=(3, 5, 7), tile=(3, 4, 6), window=(1, 3, 3), pre=2, block=None,
                                  api="backend", mem="blhd", dtype="bfloat16"),
    "legacy_tiled_fwd": dict(grid=(3, 5, 4), tile=(2, 3, 2), window=(3, 3, 3), pre=2, suf=1, B=2, kv="random",
                             api="fwd"),
    "mixed_strides_pre_suf": dict(grid=(3, 4, 5), tile=(2, 2, 3), window=(3, 3, 3), pre=2, suf=3, H=2,
                                  mem="mixed"),
    "blocks_64x64_layout64": dict(grid=(4, 9, 8), tile=(2, 3, 8), window=(3, 3, 3), suf=3, block=64, cfg=(64, 64),
                                  mem="blhd", dtype="bfloat16"),
    "blocks_128x128_layout128": dict(grid=(4, 8, 16), tile=(2, 8, 8), window=(3, 3, 3), pre=1, block=128,
                                     cfg=(128, 128), mem="blhd"),
    "scattered_heads_302_of_5_kv_blhd": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), pre=1, suf=2, B=2,
                                             H=5, heads=[3, 0, 2], kv="random", mem="blhd", out="blhd"),
    "single_head_tensor_of_5_out_step2": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), suf=2, H=5,
                                              heads=[4], heads_tensor=True, mem="heads", out="step2"),
    "backend_api_scattered_heads": dict(grid=(3, 5, 4), tile=(2, 3, 2), window=(3, 3, 3), pre=2, H=4, heads=[2, 0],
                                        block=32, api="backend", dtype="bfloat16"),
    "layout_block_choice": dict(grid=(1, 1, 1), tile=(1, 1, 1), window=(1, 1, 1)),  # layout_block() values only
    "head_subset_errors": dict(grid=(1, 1, 1), tile=(1, 1, 1), window=(1, 1, 1)),  # validation only, no launch
    "fp8_quantisation": dict(grid=(1, 1, 1), tile=(1, 1, 1), window=(1, 1, 1)),  # the e4m3 rounding's bits
}
CASES = {name: {**_BASE, **c} for name, c in CASES.items()}

_WORKER = r'''
import json, math, os, re, sys, time, traceback, zlib
try:  # the interpreter's int-overflow checks roughly double its run time; not needed here
    import triton.runtime.interpreter as _interp
    _interp.interpreter_builder.options = _interp.InterpreterOptions(sanitize_overflow=False)
except Exception:
    pass
import torch
from vorta_ops.layout import TileLayout
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_reference, sliding_tile_attention
from vorta_ops.kernels import sliding_tile_triton as stt
from vorta_ops.fp8 import fp8_attention_reference, quantize_rows
from vorta_ops.sliding_tile import sliding_tile_mask

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
cases = json.loads(sys.argv[1])
stt.register()


def make_qkv(c, B, H, L, D, dtype):
    if c["precision"].startswith("fp8"):  # smooth, video-like heads (the regime the fp8 error bar is for) + extras
        from vorta_ops.demo import synthetic_video_qkv
        grid, pre, suf = tuple(c["grid"]), c["pre"], c["suf"]
        qkv = synthetic_video_qkv(grid, heads=H, head_dim=D, batch=B, seed=0)
        ext = lambda n: torch.randn(B, H, n, D)
        qkv = [torch.cat((ext(pre), x, ext(suf)), 2).to(dtype) for x in qkv]
        if c["mem"] == "blhd":
            qkv = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv]
        return qkv
    if c["mem"] == "heads":  # heads 1..H of a wider [B, L, H + 3, D] buffer: strided, non-dense views
        return [torch.randn(B, L, H + 3, D).to(dtype).transpose(1, 2)[:, 1 : H + 1] for _ in range(3)]
    qkv = [torch.randn(B, L, H, D).to(dtype).transpose(1, 2) for _ in range(3)]  # [B, H, L, D] views
    if c["mem"] == "bhld":
        qkv = [x.contiguous() for x in qkv]
    elif c["mem"] == "mixed":  # q [B, L, H, D] memory, k contiguous, v a head subset: three strides
        qkv[1] = qkv[1].contiguous()
        qkv[2] = torch.randn(B, L, H + 2, D).to(dtype).transpose(1, 2)[:, 2:]
    return qkv


def run(name, c):
    torch.manual_seed(zlib.crc32(name.encode()))
    grid, pre, suf, B, H, D = tuple(c["grid"]), c["pre"], c["suf"], c["B"], c["H"], c["D"]
    cfg = SlidingTileConfig(tuple(c["tile"]), tuple(c["window"]))
    L = pre + math.prod(grid) + suf
    dtype = DT[c["dtype"]]
    q, k, v = make_qkv(c, B, H, L, D, dtype)
    kv_mask = None
    if c["kv"] == "random":
        kv_mask = torch.rand(B, L) < 0.7
    elif c["kv"] == "suffix":
        kv_mask = torch.ones(B, L, dtype=torch.bool)
        kv_mask[0, -2:] = False
        kv_mask[1, -4:] = False
    elif c["kv"] == "none_b1":
        kv_mask = torch.ones(B, L, dtype=torch.bool)
        kv_mask[1] = False
    os.environ["VORTA_STA_MASK_ALL"] = "1" if c["mask_all"] else "0"  # bias on every key block
    heads = c["heads"]
    sub = (lambda x: x.float()) if heads is None else (lambda x: x[:, heads].float())
    ref = sliding_tile_reference(sub(q), sub(k), sub(v), grid, cfg, pre, suf, kv_mask=kv_mask)
    out_buf = None
    if c["out"] == "blhd":
        out_buf = torch.full((B, L, H, D), float("nan"), dtype=dtype).transpose(1, 2)
    elif c["out"] == "step2":
        out_buf = torch.full((B, H, L, 2 * D), float("nan"), dtype=dtype)[..., ::2]
    elif heads is not None:
        out_buf = torch.full_like(q, float("nan"))
    heads_arg = torch.tensor(heads) if c["heads_tensor"] else heads
    if c["api"] == "backend":
        stt.LAYOUT_BLOCK = c["block"]
        if c["block"] is None:
            blk = stt.layout_block(cfg.tile)
            assert blk == (64 if math.prod(cfg.tile) <= 64 else 128), (cfg.tile, blk)
        out = sliding_tile_attention(q, k, v, grid, cfg, pre, suf, kv_mask=kv_mask, backend="triton", out=out_buf,
                                     heads=heads_arg)
    elif c["api"] == "forward":
        layout = TileLayout(grid, cfg.tile, c["block"], pre, suf)
        cfg_k = dict(BLOCK_M=c["cfg"][0], BLOCK_N=c["cfg"][1])
        out = stt.sliding_tile_forward(q, k, v, layout, cfg, kv_mask=kv_mask, out=out_buf, config=cfg_k,
                                       heads=heads_arg, precision=c["precision"])
        if out_buf is not None:
            assert out is out_buf, "out= must be written in place and returned"
        elif c["mem"] == "blhd":
            assert out.stride() == q.stride(), f"output layout {out.stride()} != input layout {q.stride()}"
    else:  # the compatibility entry on tiled tensors
        layout = TileLayout(grid, cfg.tile, c["block"], pre, suf)
        qt, kt, vt = (layout.to_tiled(x) for x in (q, k, v))
        kv_valid = None
        if kv_mask is not None:
            src = layout.src_index()
            kv_valid = kv_mask.index_select(-1, src.clamp(min=0)) & (src >= 0)
        cfg_k = dict(BLOCK_M=c["cfg"][0], BLOCK_N=c["cfg"][1])
        out_t = stt.sliding_tile_fwd(qt, kt, vt, layout, cfg, kv_valid=kv_valid, config=cfg_k)
        assert out_t.shape == (B, H, layout.tiled_len, D) and torch.isfinite(out_t).all()
        out = layout.from_tiled(out_t)
    untouched = True
    if heads is not None:
        assert out is out_buf, "heads= must write into out= and return it"
        others = [h for h in range(H) if h not in heads]
        untouched = bool(torch.isnan(out[:, others]).all())  # poison kept: no other head written
        out = out[:, heads]
    if c["precision"].startswith("fp8"):
        mask = sliding_tile_mask(grid, cfg, pre, suf)
        sel = (lambda x: x) if heads is None else (lambda x: x[:, heads])
        ref8 = sel(fp8_attention_reference(q, k, v, attn_mask=mask, kv_mask=kv_mask))
        out = out.float()
        rel = lambda a, b: float((a - b).norm() / b.norm())
        r8, rx = rel(out, ref8), rel(out, ref)
        return {"ok": untouched and r8 <= 0.01 and rx <= 0.05, "max_err": r8, "rel_exact": rx}
    atol, rtol = c["tol"]
    out = out.float()
    err = (out - ref).abs()
    ok = untouched and bool(out.shape == ref.shape and torch.isfinite(out).all() and (err <= atol + rtol * ref.abs()).all())
    if c["kv"] == "none_b1":
        ok = ok and bool((out[1] == 0).all())
    return {"ok": ok, "max_err": err.max().item()}


def check_layout_block():
    lb = stt.layout_block
    got = {t: lb(t) for t in [(6, 9, 8), (5, 9, 8), (4, 8, 8), (2, 3, 4), (3, 4, 8), (1, 1, 1)]}
    want = {(6, 9, 8): 64, (5, 9, 8): 128, (4, 8, 8): 128, (2, 3, 4): 64, (3, 4, 8): 128, (1, 1, 1): 64}
    return {"ok": got == want, "max_err": 0.0, **({} if got == want else {"error": f"got {got}, want {want}"})}


def check_head_errors():
    """Bad head subsets are refused before any launch, with what was expected and what came."""
    cfg = SlidingTileConfig((1, 2, 2), (1, 1, 1))
    layout = TileLayout((2, 2, 2), cfg.tile, 16)
    q = torch.randn(1, 3, 8, 16)
    out = torch.empty_like(q)
    bad = [
        ([3], out, r"expected head indices in \[0, 3\), got \[3\] in \[3\]"),
        ([0, -1], out, r"expected head indices in \[0, 3\), got \[-1\]"),
        ([2, 0, 2], out, r"expected unique head indices, got \[2\] more than once"),
        ([], out, r"expected a non-empty list of head indices, got \[\]"),
        (torch.tensor([], dtype=torch.long), out, r"expected a non-empty list"),
        ([0.5], out, r"expected heads as a list of ints or a 1-D integer tensor"),
        (torch.tensor([1.0]), out, r"expected heads as a list of ints or a 1-D integer tensor"),
        ([True], out, r"expected heads as a list of ints"),
        ([1], None, r"expected out, a full \[1, 3, 8, 16\] tensor whose other heads are left untouched, got None"),
    ]
    problems = []
    for heads, o, pattern in bad:
        for call in (lambda: stt.sliding_tile_forward(q, q, q, layout, cfg, out=o, heads=heads),
                     lambda: sliding_tile_attention(q, q, q, (2, 2, 2), cfg, backend="triton", out=o, heads=heads)):
            try:
                call()
                problems.append(f"heads={heads!r}: no error")
            except ValueError as e:
                if not re.search(pattern, str(e)):
                    problems.append(f"heads={heads!r}: {e} does not match {pattern!r}")
    return {"ok": not problems, "max_err": 0.0, **({"error": "\n".join(problems)} if problems else {})}


def check_fp8_quantisation():
    """The kernel's e4m3 rounding (its interpreter emulation; on a GPU the hardware's conversion) gives
    the bits vorta_ops.fp8.quantize_rows gives, values that round up into the next power of two included."""
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from fp8_probe import quant_rows_probe

    x = torch.randn(32, 64) * torch.logspace(-4, 2, 32)[:, None]
    x[3].zero_()
    o, s = torch.empty(32, 64), torch.empty(32)
    quant_rows_probe[(1,)](x, o, s, R=32, D=64, EMULATE=True)
    x8, sr = quantize_rows(x)
    ok = torch.equal(o, x8.float()) and torch.equal(s, sr[:, 0])
    return {"ok": ok, "max_err": float((o - x8.float()).abs().max())}


CHECKS = {"layout_block_choice": check_layout_block, "head_subset_errors": check_head_errors,
          "fp8_quantisation": check_fp8_quantisation}

for name, c in cases.items():
    t0 = time.time()
    try:
        r = CHECKS[name]() if name in CHECKS else run(name, c)
    except Exception:
        r = {"ok": False, "max_err": float("nan"), "error": traceback.format_exc()}
    r.update(name=name, seconds=round(time.time() - t0, 2))
    print("RESULT " + json.dumps(r), flush=True)
'''


@pytest.fixture(scope="module")
def results():
    names = list(CASES)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TRITON_DEFAULT_FP_FUSION": "1",
    }
    procs = []
    for w in range(N_WORKERS):
        chunk = {n: {**CASES[n], "tol": TOL[CASES[n]["dtype"]]} for n in names[w::N_WORKERS]}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(chunk)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    out, logs = {}, []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        logs.append(f"--- worker rc={p.returncode}\n{stderr[-4000:]}")
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                out[r["name"]] = r
    return out, "\n".join(logs)


@pytest.mark.parametrize("name", list(CASES))
def test_sliding_tile_triton_matches_reference(results, name):
    res, logs = results
    assert name in res, f"case {name} produced no result; worker output:\n{logs}"
    r = res[name]
    assert "error" not in r, f"{name} raised:\n{r['error']}"
    assert r["ok"], f"{name}: max abs err {r['max_err']:.3e} exceeds tolerance {TOL[CASES[name]['dtype']]}"
