"""The Triton sliding-tile kernel (vorta_ops/kernels/sliding_tile_triton.py) against
sliding_tile_reference, run on CPU under TRITON_INTERPRET=1 at tiny sizes.

TRITON_INTERPRET must be set before triton is imported, so the cases run in worker subprocesses
(two in parallel) with that variable set; this file itself never imports triton or vorta_ops.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the Triton sliding-tile kernel is optional)", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_WORKERS = 2
TIMEOUT_S = 300

TOL = {"float32": (1e-5, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}  # (atol, rtol)

# api: "fwd" = sliding_tile_fwd on tiled tensors (kernel blocks from `cfg`), "backend" = the
# registered "triton" backend through sliding_tile_attention (LAYOUT_BLOCK lowered to `block`).
# mask_all: VORTA_STA_MASK_ALL=1 (bias on every key block instead of the geometry masking).
# kv: None, "random" (random key mask incl. extras), "none_b1" (batch 1 masks every key: rows
# without any valid key must be 0, like SDPA).
_BASE = dict(pre=0, suf=0, block=16, cfg=(16, 16), D=64, dtype="float32", B=1, H=1, kv=None, api="fwd",
             strided=False, mask_all=False)
CASES = {
    "all_tiles_no_extras": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), H=2),
    "extras_prefix_suffix": dict(grid=(3, 5, 4), tile=(2, 3, 2), window=(3, 3, 3), pre=3, suf=5),
    "tile_1x4x4_window_1x3x3_block32": dict(grid=(4, 4, 8), tile=(1, 4, 4), window=(1, 3, 3), suf=7, block=32,
                                            cfg=(16, 32)),
    "dead_key_blocks_partial_tiles": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), suf=3),
    "block32_bm32_bn16": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), pre=2, block=32, cfg=(32, 16)),
    "sliding_clamped_window": dict(grid=(5, 7, 8), tile=(2, 2, 3), window=(1, 3, 3), pre=2),
    "window_1x1x1_odd_grid": dict(grid=(5, 3, 5), tile=(2, 2, 2), window=(1, 1, 1), suf=1),
    "grid_smaller_than_tile_mask_all": dict(grid=(1, 3, 6), tile=(2, 2, 4), window=(3, 3, 3), pre=1, suf=1, H=2,
                                            mask_all=True),
    "kv_mask_random": dict(grid=(5, 7, 8), tile=(2, 2, 3), window=(3, 3, 1), suf=5, B=2, kv="random"),
    "kv_mask_fp16": dict(grid=(3, 5, 8), tile=(2, 3, 4), window=(3, 3, 3), pre=4, suf=3, B=2, kv="random",
                         dtype="float16"),
    "kv_mask_fully_masked_batch": dict(grid=(2, 4, 4), tile=(1, 2, 2), window=(3, 3, 3), suf=2, B=2,
                                       kv="none_b1"),
    "bf16": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), pre=1, suf=4, H=2, dtype="bfloat16"),
    "head_dim_128": dict(grid=(2, 4, 4), tile=(1, 4, 4), window=(3, 3, 3), suf=2, D=128),
    "strided_bhld_inputs": dict(grid=(3, 5, 4), tile=(2, 2, 2), window=(3, 3, 3), pre=2, B=2, H=2, strided=True),
    "backend_api_kv_mask": dict(grid=(3, 4, 5), tile=(2, 2, 2), window=(3, 3, 3), pre=1, suf=2, H=2, block=32,
                                kv="random", api="backend"),
}
CASES = {name: {**_BASE, **c} for name, c in CASES.items()}

_WORKER = r'''
import json, math, os, sys, time, traceback, zlib
try:  # the interpreter's int-overflow checks roughly double its run time; not needed here
    import triton.runtime.interpreter as _interp
    _interp.interpreter_builder.options = _interp.InterpreterOptions(sanitize_overflow=False)
except Exception:
    pass
import torch
from vorta_ops.layout import TileLayout
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_reference, sliding_tile_attention
from vorta_ops.kernels import sliding_tile_triton as stt

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
cases = json.loads(sys.argv[1])
stt.register()


def run(name, c):
    torch.manual_seed(zlib.crc32(name.encode()))
    grid, pre, suf, B, H, D = tuple(c["grid"]), c["pre"], c["suf"], c["B"], c["H"], c["D"]
    cfg = SlidingTileConfig(tuple(c["tile"]), tuple(c["window"]))
    L = pre + math.prod(grid) + suf
    dtype = DT[c["dtype"]]
    q, k, v = (torch.randn(B, L, H, D).to(dtype).transpose(1, 2) for _ in range(3))  # [B, H, L, D] views
    if not c["strided"]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kv_mask = None
    if c["kv"] == "random":
        kv_mask = torch.rand(B, L) < 0.7
    elif c["kv"] == "none_b1":
        kv_mask = torch.ones(B, L, dtype=torch.bool)
        kv_mask[1] = False
    os.environ["VORTA_STA_MASK_ALL"] = "1" if c["mask_all"] else "0"  # bias on every key block
    ref = sliding_tile_reference(q.float(), k.float(), v.float(), grid, cfg, pre, suf, kv_mask=kv_mask)
    if c["api"] == "backend":
        stt.LAYOUT_BLOCK = c["block"]
        out = sliding_tile_attention(q, k, v, grid, cfg, pre, suf, kv_mask=kv_mask, backend="triton")
    else:
        layout = TileLayout(grid, cfg.tile, c["block"], pre, suf)
        if c["strided"]:  # tiled tensors that are [B, L, H, D] in memory
            qt, kt, vt = (layout.to_tiled(x).transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
            assert qt.stride(2) == H * D
        else:
            qt, kt, vt = (layout.to_tiled(x) for x in (q, k, v))
        kv_valid = None
        if kv_mask is not None:
            src = layout.src_index()
            kv_valid = kv_mask.index_select(-1, src.clamp(min=0)) & (src >= 0)
        cfg_k = dict(BLOCK_M=c["cfg"][0], BLOCK_N=c["cfg"][1])
        out_t = stt.sliding_tile_fwd(qt, kt, vt, layout, cfg, kv_valid=kv_valid, config=cfg_k)
        assert out_t.shape == (B, H, layout.tiled_len, D) and torch.isfinite(out_t).all()
        out = layout.from_tiled(out_t)
    atol, rtol = c["tol"]
    out = out.float()
    err = (out - ref).abs()
    ok = bool(out.shape == ref.shape and torch.isfinite(out).all() and (err <= atol + rtol * ref.abs()).all())
    if c["kv"] == "none_b1":
        ok = ok and bool((out[1] == 0).all())
    return {"ok": ok, "max_err": err.max().item()}


for name, c in cases.items():
    t0 = time.time()
    try:
        r = run(name, c)
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
