"""The FP8 Triton paths (vorta_ops/kernels/fp8_triton.py: the K / V preparation pass and dense FP8
attention; the core-set branch and routed dispatch with precision fp8) against vorta_ops/fp8.py's
reference, run on CPU under TRITON_INTERPRET=1 at tiny sizes, and the clear errors where FP8 cannot
run. Full-size checks on a GPU: tests/test_gpu_kernels.py.

TRITON_INTERPRET must be set before triton is imported, so the checks run in one worker subprocess.
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

_WORKER = r'''
import json, sys, traceback
import torch
from vorta_ops.coreset import CoresetConfig, coreset_attention
from vorta_ops.demo import synthetic_video_qkv
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.fp8 import fp8_attention_reference, quantize_channels, quantize_heads, smooth_keys
from vorta_ops.kernels import coreset_triton as ctt, sliding_tile_triton as stt
from vorta_ops.kernels.fp8_triton import fp8_attention, fp8_prepare_kv
from vorta_ops.sliding_tile import SlidingTileConfig

stt.register()
ctt.register()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def smooth(grid, H, D=32, B=1, extra=0, seed=0):
    q, k, v = synthetic_video_qkv(grid, heads=H, head_dim=D, batch=B, seed=seed)
    if extra:
        g = torch.Generator().manual_seed(seed + 1)
        q, k, v = (torch.cat([x, torch.randn(B, H, extra, D, generator=g)], 2) for x in (q, k, v))
    return q, k, v


def blhd(x):
    """the same values in [B, L, H, D] memory seen as [B, H, L, D] (ComfyUI's layout)"""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def prep_bits():
    """The preparation pass writes exactly vorta_ops.fp8's quantisation, in the order of its index
    table, zeros on padding slots (scale 1) and V transposed; a head subset in table order."""
    q, k, v = smooth((2, 3, 4), 3, extra=2)
    L = k.shape[2]
    src = torch.tensor([5, -1, 0, 7, 3] + list(range(8, L)) + [-1, -1], dtype=torch.int32)
    heads = torch.tensor([2, 0])
    p = fp8_prepare_kv(blhd(k), blhd(v), n_slots=src.numel(), src=src, n_h=2, head_tab=heads)
    k8, ks = quantize_heads(smooth_keys(k))
    v8, vs = quantize_channels(v)
    ok = p.lp % 128 == 0 and p.lp >= src.numel() and torch.equal(p.v_scale, vs[:, :, 0])
    ok = ok and torch.equal(p.k_scale, ks[:, :, 0, 0])  # every head's, the subset's or not
    for i, h in enumerate(heads.tolist()):
        for slot, pos in enumerate(src.tolist() + [-1] * (p.lp - src.numel())):
            want_k = k8[0, h, pos].float() if pos >= 0 else torch.zeros(k.shape[3])
            want_v = v8[0, h, pos].float() if pos >= 0 else torch.zeros(k.shape[3])
            ok = ok and torch.equal(p.k8[i, slot].float(), want_k)
            ok = ok and torch.equal(p.v8t[i, :, slot].float(), want_v)
    return {"ok": bool(ok)}


def dense_cases():
    res = {}
    q, k, v = smooth((3, 4, 5), 2, extra=3)
    ref8, refx = fp8_attention_reference(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)
    o = fp8_attention(q, k, v)
    res["dense_vs_reference"] = {"ok": rel(o, ref8) <= 0.01 and rel(o, refx) <= 0.05, "err": rel(o, ref8)}
    # fewer queries than keys, [B, L, H, D] memory, an explicit scale
    o = fp8_attention(blhd(q)[:, :, :17], blhd(k), blhd(v), scale=0.2)
    r = fp8_attention_reference(q[:, :, :17], k, v, scale=0.2)
    res["dense_blhd_lq_ne_lk_scale"] = {"ok": rel(o, r) <= 0.01, "err": rel(o, r)}
    # key masks: per batch (batch 1 masks every key: rows of zeros) and per head
    q2, k2, v2 = (torch.cat([x, 0.5 * x], 0) for x in (q, k, v))
    km = torch.ones(2, k.shape[2], dtype=torch.bool)
    km[0, -4:] = False
    km[1] = False
    o = fp8_attention(q2, k2, v2, kv_mask=km)
    r = fp8_attention_reference(q2[:1], k2[:1], v2[:1], kv_mask=km[:1])
    res["dense_kv_mask_and_empty_rows"] = {"ok": rel(o[:1], r) <= 0.01 and bool((o[1] == 0).all()), "err": rel(o[:1], r)}
    kmh = torch.ones(1, 2, k.shape[2], dtype=torch.bool)
    kmh[0, 1, :9] = False
    o = fp8_attention(q, k, v, kv_mask=kmh)
    r = torch.cat([fp8_attention_reference(q[:, :1], k[:, :1], v[:, :1]),
                   fp8_attention_reference(q[:, 1:], k[:, 1:], v[:, 1:], kv_mask=kmh[:, 1])], 1)
    res["dense_per_head_kv_mask"] = {"ok": rel(o, r) <= 0.01, "err": rel(o, r)}
    # a head subset: only its heads written (NaN poison kept elsewhere), bf16 in and out
    q3, k3, v3 = (blhd(x.bfloat16()) for x in smooth((2, 4, 4), 4, seed=3))
    out = torch.full_like(q3, float("nan"))
    fp8_attention(q3, k3, v3, out=out, heads=[3, 1])
    r = fp8_attention_reference(q3[:, [3, 1]], k3[:, [3, 1]], v3[:, [3, 1]])
    ok = bool(torch.isnan(out[:, [0, 2]]).all()) and out.dtype == torch.bfloat16 and rel(out[:, [3, 1]], r) <= 0.02
    res["dense_head_subset_bf16"] = {"ok": ok, "err": rel(out[:, [3, 1]], r)}
    try:
        x16 = torch.randn(1, 1, 8, 16)
        fp8_attention(x16, x16, x16)
        res["dense_head_dim_16_refused"] = {"ok": False, "error": "no error"}
    except ValueError as e:
        res["dense_head_dim_16_refused"] = {"ok": "supports head dims 32, 64, 128, 256; got 16" in str(e)}
    try:
        fp8_attention(q3, k3, v3, heads=[0])
        res["dense_head_subset_needs_out"] = {"ok": False, "error": "no error"}
    except ValueError as e:
        res["dense_head_subset_needs_out"] = {"ok": "expected out" in str(e)}
    return res


def coreset_cases():
    res = {}
    grid = (4, 6, 4)
    cfg = CoresetConfig((2, 3, 2), 0.5, "q")
    q, k, v = smooth(grid, 3, extra=2)
    # reference: the same selection, its attention in fp8 (coreset_attention with the fp8 reference as SDPA)
    exact = coreset_attention(q, k, v, grid, cfg, 0, 2)
    o = ctt.coreset_triton(q, k, v, grid, cfg, 0, 2, precision="fp8")
    ob = ctt.coreset_triton(q, k, v, grid, cfg, 0, 2)
    # within 5% of exact, and not the bf16 path (whose error here is ~1e-7): fp8 really ran
    res["coreset_fp8_vs_exact"] = {"ok": rel(o, exact) <= 0.05 and rel(o, exact) > 100 * max(rel(ob, exact), 1e-6),
                                   "err": rel(o, exact)}
    km = torch.ones(1, q.shape[2], dtype=torch.bool)
    km[0, -1] = False
    km[0, 5] = False
    exact = coreset_attention(q, k, v, grid, cfg, 0, 2, kv_mask=km)
    out = torch.full_like(q, float("nan"))
    ctt.coreset_triton(blhd(q), blhd(k), blhd(v), grid, cfg, 0, 2, kv_mask=km, precision="fp8", out=out, heads=[2, 0])
    ok = bool(torch.isnan(out[:, 1]).all()) and rel(out[:, [2, 0]], exact[:, [2, 0]]) <= 0.05
    res["coreset_fp8_kv_mask_head_subset"] = {"ok": ok, "err": rel(out[:, [2, 0]], exact[:, [2, 0]])}
    try:
        ctt.coreset_triton(q, k, v, grid, cfg, 0, 2, precision="int4")
        res["coreset_bad_precision"] = {"ok": False, "error": "no error"}
    except ValueError as e:
        res["coreset_bad_precision"] = {"ok": "precision must be bf16 or fp8" in str(e)}
    return res


def routed_case():
    """precision fp8 through routed dispatch: full heads unchanged (bf16 path, bit for bit), sparse
    heads within 5% of the bf16 kernels."""
    grid = (4, 6, 4)
    q, k, v = smooth(grid, 5)
    sl, cs = SlidingTileConfig((2, 2, 2), (3, 3, 3)), CoresetConfig((2, 3, 2), 0.5, "q")
    branches = [2, 0, 1, 2, 1]
    o8 = routed_attention(q, k, v, branches, grid, RoutedConfig(sl, cs, precision="fp8"))
    ob = routed_attention(q, k, v, branches, grid, RoutedConfig(sl, cs, "triton", "triton"))
    errs = [rel(o8[:, h], ob[:, h]) for h in range(5)]
    sparse = [errs[h] for h in (0, 2, 3, 4)]  # sliding and core-set heads: fp8, so not equal to bf16
    return {"routed_fp8": {"ok": errs[1] == 0.0 and max(errs) <= 0.05 and min(sparse) > 1e-4, "err": max(errs)}}


def inference_mask_case():
    """A key mask made under torch.inference_mode (as ComfyUI's are) has no version counter: the
    kernel's per-mask table cache still serves it, and the result matches the reference."""
    from vorta_ops.sliding_tile import sliding_tile_reference
    grid, cfg = (2, 4, 4), SlidingTileConfig((1, 2, 2), (1, 3, 3))
    q, k, v = smooth(grid, 2, extra=3)
    with torch.inference_mode():
        km = torch.ones(1, q.shape[2], dtype=torch.bool)
        km[0, -2:] = False
    ref = sliding_tile_reference(q, k, v, grid, cfg, 0, 3, kv_mask=km)
    outs = [stt.sliding_tile_triton(q, k, v, grid, cfg, 0, 3, kv_mask=km) for _ in range(2)]
    err = max(float((o - ref).abs().max()) for o in outs)
    return {"inference_mode_key_mask": {"ok": err < 1e-4, "err": err}}


results = {}
for name, fn in (("prep_bits", prep_bits), ("dense", dense_cases), ("coreset", coreset_cases), ("routed", routed_case),
                 ("inference_mask", inference_mask_case)):
    try:
        r = fn()
        results.update(r if name != "prep_bits" else {"prep_bits": r})
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()}
print("RESULTS " + json.dumps(results))
'''

_NO_GPU = r'''
import torch
from vorta_ops.fp8 import fp8_supported
from vorta_ops.kernels.fp8_triton import fp8_attention
from vorta_ops.kernels.sliding_tile_triton import sliding_tile_triton
from vorta_ops.sliding_tile import SlidingTileConfig
q = torch.randn(1, 2, 24, 32)
msgs = [str(fp8_supported("cpu"))]
for call in (lambda: fp8_attention(q, q, q),
             lambda: sliding_tile_triton(q, q, q, (2, 3, 4), SlidingTileConfig((2, 2, 2), (1, 1, 1)), precision="fp8")):
    try:
        call()
        msgs.append("no error")
    except RuntimeError as e:
        msgs.append(str(e))
print("\n".join(msgs))
'''

EXPECTED = ["prep_bits", "dense_vs_reference", "dense_blhd_lq_ne_lk_scale", "dense_kv_mask_and_empty_rows",
            "dense_per_head_kv_mask", "dense_head_subset_bf16", "dense_head_subset_needs_out", "dense_head_dim_16_refused", "coreset_fp8_vs_exact",
            "coreset_fp8_kv_mask_head_subset", "coreset_bad_precision", "routed_fp8", "inference_mode_key_mask"]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def results():
    p = subprocess.run([sys.executable, "-c", _WORKER], cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True,
                       text=True, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"worker rc={p.returncode}\n{p.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", EXPECTED)
def test_fp8_triton_under_the_interpreter(results, name):
    failed = {k: v for k, v in results.items() if k not in EXPECTED}
    assert not failed, f"a check group raised: {failed}"
    r = results[name]
    assert r["ok"], f"{name}: {r}"


def test_fp8_on_a_machine_without_fp8_says_so():
    """Without a GPU (and without the interpreter) each FP8 entry refuses with one line naming what it needs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, "-c", _NO_GPU], cwd=ROOT, env={k: v for k, v in _env().items()
                                                                        if k != "TRITON_INTERPRET"},
                       capture_output=True, text=True, timeout=300)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines[0] == "False", p.stderr[-3000:]
    assert all("precision fp8 cannot run here: the FP8 kernels need a CUDA GPU with FP8 tensor cores (sm_89+" in x
               and x.endswith("use precision bf16") for x in lines[1:]), lines


def test_routed_config_checks_precision():
    from vorta_ops.dispatch import RoutedConfig

    with pytest.raises(ValueError, match="precision must be one of bf16, fp8, got 'int8'"):
        RoutedConfig(precision="int8")
    with pytest.raises(ValueError, match="sliding_backend 'flex' has no fp8 path"):
        RoutedConfig(precision="fp8", sliding_backend="flex")
    assert RoutedConfig(precision="fp8").backend(2) == "triton-fp8"
    assert RoutedConfig().backend(1) == "auto"


def test_precision_is_not_part_of_the_branch_settings_routers_are_measured_at():
    """Measured routers and the disk cache name their branch settings by repr(RoutedConfig): files
    written before precision existed still match, and fp8 does not make a measured table stale."""
    from vorta_ops.dispatch import RoutedConfig

    assert repr(RoutedConfig(precision="fp8")) == repr(RoutedConfig())
    assert "precision" not in repr(RoutedConfig()) and RoutedConfig(precision="fp8") != RoutedConfig()
