"""Fused Triton core-set path (vorta_ops.kernels.coreset_triton) vs the torch implementation.

The kernels run under the Triton CPU interpreter. TRITON_INTERPRET must be set before triton is
imported, so all cases run in ONE child process (this file, run as a script) and every test below
only checks that case's result. Tiny grids: the whole file takes a few tens of seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> case. grid, bucket, keep, sim, pre/suf extras, B, H, D, dtype, and flags:
#   blhd: inputs are [B, L, H, D] tensors transposed to [B, H, L, D] (and out= such a buffer)
#   mask: a kv_mask; ties: inputs built from a few repeated vectors (+ zero rows) so that
#   similarities tie exactly; scale: explicit softmax scale; nan: NaN rows in q and k (a margin,
#   which ranks last like torch's sort, and a whole bucket's centre, so that its margins all tie)
#   heads: a head subset (heads=) of the H heads: the compact tensors and the output are checked
#   against the torch path on those heads alone, and out (NaN-filled) must keep NaN elsewhere
#   errors: only the refusals of bad head subsets (no launch)
CASES = {
    "div_232_k50_q": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="q"),
    "div_232_k50_qk": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="qk"),
    "rem_232_k50_q_extras": dict(grid=(3, 4, 5), bucket=(2, 3, 2), keep=0.5, sim="q", pre=1, suf=2),
    "rem_232_k25_qk_extras": dict(grid=(3, 4, 5), bucket=(2, 3, 2), keep=0.25, sim="qk", pre=2, suf=1),
    "div_222_k25_q": dict(grid=(2, 4, 4), bucket=(2, 2, 2), keep=0.25, sim="q"),
    "rem_222_k50_qk": dict(grid=(3, 3, 5), bucket=(2, 2, 2), keep=0.5, sim="qk", suf=3),
    "rem_123_k50_q": dict(grid=(2, 3, 7), bucket=(1, 2, 3), keep=0.5, sim="q", pre=2),
    "div_123_k25_qk": dict(grid=(2, 4, 6), bucket=(1, 2, 3), keep=0.25, sim="qk"),
    "blhd_q": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="q", pre=1, blhd=True),
    "blhd_qk_d64": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="qk", suf=2, blhd=True, D=64, B=1),
    "d128_q": dict(grid=(2, 3, 2), bucket=(2, 3, 2), keep=0.5, sim="q", D=128, B=1),
    "bf16_blhd_q": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="q", suf=2, blhd=True, dtype="bfloat16"),
    "bf16_qk_222": dict(grid=(3, 4, 4), bucket=(2, 2, 2), keep=0.25, sim="qk", pre=1, dtype="bfloat16"),
    "fp16_qk": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="qk", dtype="float16", blhd=True),
    "kv_mask_q": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="q", suf=3, mask=True),
    "kv_mask_qk_blhd": dict(grid=(3, 4, 5), bucket=(2, 3, 2), keep=0.5, sim="qk", pre=1, suf=2, mask=True, blhd=True),
    "ties_q": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="q", ties=True),
    "ties_qk": dict(grid=(2, 4, 4), bucket=(2, 2, 2), keep=0.5, sim="qk", ties=True),
    "keep_centre_only": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.05, sim="qk", suf=1),
    "keep_all": dict(grid=(3, 3, 4), bucket=(2, 3, 2), keep=1.0, sim="q"),
    "bucket_333": dict(grid=(3, 4, 3), bucket=(3, 3, 3), keep=0.5, sim="qk", pre=1),
    "grid_smaller_than_bucket": dict(grid=(1, 2, 1), bucket=(2, 3, 2), keep=0.5, sim="q", pre=1, suf=1),
    "nan_rows": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="qk", nan=True),
    "scale": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="q", scale=0.3),
    "heads_302_of_5_q_blhd": dict(grid=(2, 3, 4), bucket=(2, 3, 2), keep=0.5, sim="q", H=5, heads=[3, 0, 2],
                                  blhd=True),
    "heads_302_of_5_qk_kv_mask": dict(grid=(3, 4, 5), bucket=(2, 3, 2), keep=0.5, sim="qk", pre=1, suf=2, H=5,
                                      heads=[3, 0, 2], mask=True),
    "single_head_of_5_bf16": dict(grid=(2, 6, 4), bucket=(2, 3, 2), keep=0.5, sim="qk", suf=1, H=5, heads=[4],
                                  blhd=True, dtype="bfloat16"),
    "head_subset_errors": dict(grid=(2, 3, 2), bucket=(2, 3, 2), keep=0.5, sim="q", H=3, errors=True),
}


# ---- child process ---------------------------------------------------------------------------


def _inputs(c, seed):
    import torch

    B, H, D = c.get("B", 2), c.get("H", 2), c.get("D", 16)
    T, Hg, Wg = c["grid"]
    L = c.get("pre", 0) + T * Hg * Wg + c.get("suf", 0)
    dtype = getattr(torch, c.get("dtype", "float32"))
    g = torch.Generator().manual_seed(seed)
    if c.get("ties"):
        # a few distinct small-integer vectors and zero rows: many exactly equal similarities
        pool = torch.randint(-2, 3, (4, D), generator=g).float()
        pool[0] = 0
        xs = [pool[torch.randint(0, 4, (B, L, H), generator=g)] for _ in range(3)]
    else:
        xs = [torch.randn(B, L, H, D, generator=g) for _ in range(3)]
    if c.get("nan"):
        for x in xs[:2]:
            x[:, 0, :, 0] = float("nan")  # margin of bucket 0
            x[:, (1 * Hg + 4) * Wg + 3] = float("nan")  # centre of bucket 3
    xs = [x.to(dtype) for x in xs]
    if c.get("blhd"):
        return [x.transpose(1, 2) for x in xs], L  # [B, H, L, D] views of [B, L, H, D] memory
    return [x.transpose(1, 2).contiguous() for x in xs], L


def _run_errors(c, seed):
    """Bad head subsets are refused before any launch, with what was expected and what came."""
    import re

    import torch

    from vorta_ops.coreset import CoresetConfig
    from vorta_ops.kernels.coreset_triton import coreset_expand, coreset_select_gather, coreset_triton

    cfg = CoresetConfig(c["bucket"], c["keep"], c["sim"])
    (q, k, v), L = _inputs(c, seed)
    out = torch.empty_like(q)
    calls = {
        "coreset_triton": lambda h, o: coreset_triton(q, k, v, c["grid"], cfg, out=o, heads=h),
        "coreset_select_gather": lambda h, o: coreset_select_gather(q, k, v, c["grid"], cfg, heads=h),
    }
    bad = [
        ([3], r"expected head indices in \[0, 3\), got \[3\] in \[3\]"),
        ([1, -2], r"expected head indices in \[0, 3\), got \[-2\]"),
        ([0, 2, 0], r"expected unique head indices, got \[0\] more than once"),
        ([], r"expected a non-empty list of head indices"),
        (torch.tensor([[0, 1]]), r"expected heads as a list of ints or a 1-D integer tensor"),
    ]
    for who, call in calls.items():
        for heads, pattern in bad:
            try:
                call(heads, out)
            except ValueError as e:
                assert re.search(pattern, str(e)) and who in str(e), f"{who}, heads={heads!r}: {e}"
            else:
                raise AssertionError(f"{who}, heads={heads!r}: no error")
    try:
        coreset_triton(q, k, v, c["grid"], cfg, heads=[1])
    except ValueError as e:
        assert re.search(r"expected out, a full \[2, 3, \d+, 16\] tensor", str(e)), str(e)
    else:
        raise AssertionError("heads= without out=: no error")
    cs = coreset_select_gather(q, k, v, c["grid"], cfg, heads=[2, 0])
    assert cs.qc.shape[1] == 2 and cs.back.shape[1] == 2
    try:
        coreset_expand(cs.qc, cs.back, out, heads=[1])
    except ValueError as e:
        assert re.search(r"expected oc \[2, 1, Lc, 16\] and back \[2, 1, \d+\] .* and 1 heads, got oc", str(e)), str(e)
    else:
        raise AssertionError("coreset_expand with 2 compact heads for 1 head: no error")


def _run_case(c, seed):
    import torch

    from vorta_ops.coreset import CoresetConfig, _gather_tokens, bucket_index, coreset_attention, coreset_select
    from vorta_ops.kernels.coreset_triton import coreset_select_gather, coreset_triton

    if c.get("errors"):
        return _run_errors(c, seed)
    cfg = CoresetConfig(c["bucket"], c["keep"], c["sim"])
    pre, suf = c.get("pre", 0), c.get("suf", 0)
    (q, k, v), L = _inputs(c, seed)
    B = q.shape[0]
    if c.get("blhd"):
        assert not q.is_contiguous()
    heads = c.get("heads")
    # the torch side works on the subset (a copy), the Triton side on the full tensors + heads=
    qs, ks, vs = (x if heads is None else x[:, heads] for x in (q, k, v))

    # selection and compact tensors vs coreset_select
    bi = bucket_index(tuple(c["grid"]), cfg.bucket, pre, suf)
    q_gather, q_back = coreset_select(qs, bi, cfg.n_keep)
    k_gather = q_gather if cfg.similarity == "q" else coreset_select(ks, bi, cfg.n_keep)[0]
    cs = coreset_select_gather(q, k, v, c["grid"], cfg, pre, suf, return_gather=True, heads=heads)
    assert cs.back.dtype == torch.int32 and cs.q_gather.dtype == torch.int32
    assert torch.equal(cs.q_gather.long(), q_gather), "query core-set differs"
    assert torch.equal(cs.k_gather.long(), k_gather), "key core-set differs"
    assert torch.equal(cs.back.long(), q_back), "back map differs"
    exact = dict(atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cs.qc, _gather_tokens(qs, q_gather), **exact, msg="compact q differs")
    torch.testing.assert_close(cs.kc, _gather_tokens(ks, k_gather), **exact, msg="compact k differs")
    torch.testing.assert_close(cs.vc, _gather_tokens(vs, k_gather), **exact, msg="compact v differs")

    # attention output vs coreset_attention
    kv_mask = None
    if c.get("mask"):
        g = torch.Generator().manual_seed(seed + 1)
        kv_mask = torch.rand(B, L, generator=g) > 0.3
        kv_mask[:, 0] = True  # every row keeps at least one key
    kw = dict(kv_mask=kv_mask, scale=c.get("scale"))
    ref = coreset_attention(qs, ks, vs, c["grid"], cfg, pre, suf, **kw)
    if c.get("blhd"):
        buf = torch.full((B, L, q.shape[1], q.shape[3]), float("nan"), dtype=q.dtype)
        out = coreset_triton(q, k, v, c["grid"], cfg, pre, suf, out=buf.transpose(1, 2), heads=heads, **kw)
        assert out.data_ptr() == buf.data_ptr() and out.stride() == buf.transpose(1, 2).stride()
    elif heads is not None:
        buf = torch.full_like(q, float("nan"))
        out = coreset_triton(q, k, v, c["grid"], cfg, pre, suf, out=buf, heads=heads, **kw)
        assert out is buf
    else:
        out = coreset_triton(q, k, v, c["grid"], cfg, pre, suf, **kw)
    if heads is not None:
        others = [h for h in range(q.shape[1]) if h not in heads]
        assert torch.isnan(out[:, others]).all(), "heads= wrote other heads of out"
        out = out[:, heads]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if q.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol, equal_nan=bool(c.get("nan")))


def _worker(names):
    sys.path.insert(0, str(ROOT))
    try:
        import triton  # noqa: F401

        import vorta_ops.kernels.coreset_triton  # noqa: F401
    except Exception as e:  # pragma: no cover - environment without triton
        print(json.dumps({"__skip__": f"triton does not import: {type(e).__name__}: {e}"}), flush=True)
        return
    for i, name in enumerate(names):
        try:
            _run_case(CASES[name], 1000 + i)
            res = "ok"
        except Exception:
            res = traceback.format_exc()
        print(json.dumps({name: res}), flush=True)


# ---- pytest side -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    from interp import SKIP_REASON

    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    env.setdefault("OMP_NUM_THREADS", "2")
    p = subprocess.run(
        [sys.executable, __file__, *CASES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    res = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            res.update(json.loads(line))
    if "__skip__" in res:
        pytest.skip(res["__skip__"])
    if not res:
        pytest.fail(f"interpreter child failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    res["__stderr__"] = p.stderr[-4000:]
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_case(results, name):
    if name not in results:
        pytest.fail(f"case did not run (child crashed?):\n{results['__stderr__']}")
    assert results[name] == "ok", results[name]


def _cuda_ok():
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import torch

    return torch.cuda.is_available()


def _check_valid_selection(x, gather, bi, n_keep):
    """gather [B, H, Lc] holds, per bucket, the centre and n_keep - 1 margins no more similar
    (float64 cosine, up to 1e-5) to the centre than any dropped margin."""
    import torch
    import torch.nn.functional as F

    B, H, L, _ = x.shape
    inset = torch.zeros(B, H, L, dtype=torch.bool, device=x.device)
    inset.scatter_(-1, gather.long(), True)
    c = F.normalize(x[:, :, bi.centre].double(), dim=-1)
    m = F.normalize(x[:, :, bi.margin].double(), dim=-1)
    sim = torch.einsum("bhnd,bhnmd->bhnm", c, m)
    kept = inset[:, :, bi.margin]
    assert inset[:, :, bi.centre].all() and inset[:, :, bi.rest].all()
    assert (kept.sum(-1) == n_keep - 1).all()
    if 0 < n_keep - 1 < bi.margin.shape[1]:
        hi = sim.masked_fill(~kept, -2).amax(-1)
        lo = sim.masked_fill(kept, 2).amin(-1)
        assert (hi <= lo + 1e-5).all()


@pytest.mark.skipif(not _cuda_ok(), reason="needs CUDA (and triton, without TRITON_INTERPRET)")
@pytest.mark.parametrize("sim", ["q", "qk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_compiled(sim, dtype):
    """Compiled kernels on a GPU. Near-ties may rank differently from torch's selection (other fp32
    summation order), so check the selection is a valid least-similar set, the compact tensors and
    the expansion exactly, and the output against coreset_attention loosely."""
    import torch
    import torch.nn.functional as F

    from vorta_ops.coreset import CoresetConfig, _gather_tokens, bucket_index, coreset_attention
    from vorta_ops.kernels.coreset_triton import coreset_select_gather, coreset_triton

    c = dict(grid=(4, 9, 17), bucket=(2, 3, 2), keep=0.5, sim=sim, pre=2, suf=3, B=2, H=4, D=128, dtype=dtype,
             blhd=True)
    (q, k, v), L = _inputs(c, 7)
    q, k, v = (x.cuda() for x in (q, k, v))
    cfg = CoresetConfig(c["bucket"], c["keep"], sim)
    bi = bucket_index(c["grid"], cfg.bucket, 2, 3, q.device)
    cs = coreset_select_gather(q, k, v, c["grid"], cfg, 2, 3, return_gather=True)
    _check_valid_selection(q, cs.q_gather, bi, cfg.n_keep)
    _check_valid_selection(k if sim == "qk" else q, cs.k_gather, bi, cfg.n_keep)
    assert torch.equal(cs.qc, _gather_tokens(q, cs.q_gather.long()))
    assert torch.equal(cs.kc, _gather_tokens(k, cs.k_gather.long()))
    assert torch.equal(cs.vc, _gather_tokens(v, cs.k_gather.long()))
    out = coreset_triton(q, k, v, c["grid"], cfg, 2, 3)
    oc = F.scaled_dot_product_attention(cs.qc, cs.kc, cs.vc)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, _gather_tokens(oc, cs.back.long()), **tol)
    ref = coreset_attention(q, k, v, c["grid"], cfg, 2, 3)
    assert ((out.float() - ref.float()).abs().mean() < 5e-2)


if __name__ == "__main__":
    _worker(sys.argv[1:] or list(CASES))
