import json
import os
import pathlib
import subprocess
import sys

import pytest
from interp import SKIP_REASON
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import extras, qkv
from vorta_ops._backends import BackendRegistry
from vorta_ops.coreset import CoresetConfig, coreset_attention, coreset_branch, coreset_reference
from vorta_ops.dispatch import RoutedConfig, head_groups, routed_attention
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_attention, sliding_tile_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]

small_grids = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


def assert_per_head_references(out, q, k, v, branches, grid, cfg, pre, suf, kv_mask):
    """Each head of a routed output equals its branch's plain reference on that head alone."""
    for h, b in enumerate(branches):
        s = slice(h, h + 1)
        if b == 0:
            ref = F.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s], attn_mask=kv_mask[:, None, None])
        elif b == 1:
            ref = coreset_reference(q[:, s], k[:, s], v[:, s], grid, cfg.coreset, pre, suf, kv_mask=kv_mask)
        else:
            ref = sliding_tile_reference(q[:, s], k[:, s], v[:, s], grid, cfg.sliding, pre, suf, kv_mask=kv_mask)
        torch.testing.assert_close(out[:, s], ref, atol=1e-10, rtol=1e-10)


@settings(max_examples=20)
@given(small_grids, st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=6), extras, extras,
       st.sampled_from(["q", "qk"]), st.integers(0, 2**16))
def test_dispatch_equals_per_head_references(grid, branches, pre, suf, sim, seed):
    H = len(branches)
    cfg = RoutedConfig(SlidingTileConfig((2, 2, 3), (3, 1, 3)), CoresetConfig((2, 2, 2), 0.5, sim), "reference")
    L = pre + grid[0] * grid[1] * grid[2] + suf
    q, k, v = qkv(2, H, L, 8, seed)
    kv_mask = torch.ones(2, L, dtype=torch.bool)
    if suf:
        kv_mask[1, -1] = False
    out = routed_attention(q, k, v, torch.tensor(branches, dtype=torch.int8), grid, cfg, pre, suf, kv_mask=kv_mask)
    assert_per_head_references(out, q, k, v, branches, grid, cfg, pre, suf, kv_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_full_is_bit_identical_to_dense(dtype):
    grid = (3, 4, 6)
    # ComfyUI layout: [B, L, H*D] viewed as [B, H, L, D] without a copy
    x = torch.randn(3, 2, 72, 4 * 16).to(dtype)
    q, k, v = (t.view(2, 72, 4, 16).transpose(1, 2) for t in x)
    out = routed_attention(q, k, v, [0, 0, 0, 0], grid)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_contiguous_head_runs_are_views_and_scattered_heads_work():
    grid = (2, 3, 4)
    q, k, v = qkv(1, 5, 24, 8, 0)
    cfg = RoutedConfig(SlidingTileConfig((1, 2, 2)), CoresetConfig(), "reference")
    a = routed_attention(q, k, v, [2, 0, 2, 1, 0], grid, cfg)
    for h, b in enumerate([2, 0, 2, 1, 0]):
        single = routed_attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], [b], grid, cfg)
        assert torch.equal(a[:, h : h + 1], single)
    assert head_groups([2, 0, 2, 1, 0]) == {0: [1, 4], 1: [3], 2: [0, 2]}


def test_bad_branch_tables_are_explained():
    q = torch.zeros(1, 3, 8, 4)
    with pytest.raises(ValueError, match="got 2 branch ids for 3 heads"):
        routed_attention(q, q, q, [0, 1], (2, 2, 2))
    with pytest.raises(ValueError, match="head 1: branch id 7 is not one of"):
        routed_attention(q, q, q, [0, 7, 1], (2, 2, 2))


def test_scattered_branches_equal_per_head_references():
    """Every branch on a scattered head subset (CPU: the reference backends, through the registry's
    copy fallback; the full branch through its own gather)."""
    grid, pre, suf = (2, 3, 4), 1, 2
    branches = [1, 2, 1, 0, 2, 1, 0]  # core-set 0, 2, 5; sliding 1, 4; full 3, 6
    L = pre + 24 + suf
    q, k, v = qkv(2, len(branches), L, 8, 3)
    kv_mask = torch.ones(2, L, dtype=torch.bool)
    kv_mask[1, -2:] = False
    cfg = RoutedConfig(SlidingTileConfig((1, 2, 2), (1, 3, 1)), CoresetConfig((2, 3, 2), 0.5, "qk"), "reference", "torch")
    out = routed_attention(q, k, v, branches, grid, cfg, pre, suf, kv_mask=kv_mask)
    assert_per_head_references(out, q, k, v, branches, grid, cfg, pre, suf, kv_mask)


@pytest.mark.parametrize("heads", [[3, 0, 2], [4], torch.tensor([1, 3])])
def test_backends_without_heads_run_a_copy_of_the_subset(heads):
    """heads= on a backend that does not take it: the subset is gathered, run, and written into
    out's heads; out's other heads keep their values."""
    grid = (2, 3, 4)
    q, k, v = qkv(1, 5, 24, 8, 1)
    hs = heads.tolist() if isinstance(heads, torch.Tensor) else heads
    others = [h for h in range(5) if h not in hs]
    sl_cfg, cs_cfg = SlidingTileConfig((1, 2, 2)), CoresetConfig((2, 3, 2))
    for run, ref in (
        (lambda o: sliding_tile_attention(q, k, v, grid, sl_cfg, backend="reference", out=o, heads=heads),
         sliding_tile_reference(q[:, hs], k[:, hs], v[:, hs], grid, sl_cfg)),
        (lambda o: coreset_branch(q, k, v, grid, cs_cfg, backend="torch", out=o, heads=heads),
         coreset_attention(q[:, hs], k[:, hs], v[:, hs], grid, cs_cfg)),
    ):
        out = torch.full_like(q, 1e4)
        assert run(out) is out
        torch.testing.assert_close(out[:, hs], ref, atol=0, rtol=0)
        assert (out[:, others] == 1e4).all()


def test_bad_head_subsets_are_explained():
    q = torch.zeros(1, 3, 24, 8)
    out = torch.empty_like(q)
    cfg = SlidingTileConfig((1, 2, 2))
    for heads, msg in (
        ([3], r"expected head indices in \[0, 3\), got \[3\]"),
        ([1, 1], r"expected unique head indices, got \[1\] more than once"),
        ([], r"expected a non-empty list of head indices"),
        ([0.0], r"expected heads as a list of ints or a 1-D integer tensor"),
    ):
        with pytest.raises(ValueError, match=msg):
            sliding_tile_attention(q, q, q, (2, 3, 4), cfg, backend="reference", out=out, heads=heads)
        with pytest.raises(ValueError, match=msg):
            coreset_branch(q, q, q, (2, 3, 4), CoresetConfig(), backend="torch", out=out, heads=heads)
    with pytest.raises(ValueError, match=r"expected out, a full \[1, 3, 24, 8\] tensor .* got None"):
        sliding_tile_attention(q, q, q, (2, 3, 4), cfg, backend="reference", heads=[0])
    with pytest.raises(ValueError, match="takes_heads=True needs writes_out=True"):
        BackendRegistry("test").register("x", lambda *a, **k: None, takes_heads=True)


_NO_COPY_WORKER = r'''
import json
import torch
from vorta_ops.coreset import CoresetConfig, coreset_attention
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.kernels import sliding_tile_triton as stt
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_reference

stt.LAYOUT_BLOCK = 16  # small layout blocks keep the interpreter fast
grid, branches = (2, 3, 4), [2, 1, 2, 1, 0]  # sliding 0, 2 and core-set 1, 3 scattered; full 4 a view
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 24, 5, 16, generator=g).transpose(1, 2) for _ in range(3))  # ComfyUI's layout
sl, cs = SlidingTileConfig((1, 2, 2), (1, 3, 3)), CoresetConfig((2, 3, 2), 0.5, "q")
sources = {x.untyped_storage().data_ptr() for x in (q, k, v)}
copies = []
orig = {name: getattr(torch.Tensor, name) for name in ("index_select", "index_copy_", "index_copy")}


def counting(name):
    def wrapper(self, *args, **kwargs):
        if name != "index_select" or self.untyped_storage().data_ptr() in sources:
            copies.append(name)
        return orig[name](self, *args, **kwargs)
    return wrapper


for name in orig:
    setattr(torch.Tensor, name, counting(name))
res = {}
for sb, cb in (("triton", "triton"), ("reference", "torch")):
    del copies[:]
    out = routed_attention(q, k, v, branches, grid, RoutedConfig(sl, cs, sb, cb))
    res[sb] = {"copies": list(copies)}
    for h, b in enumerate(branches):
        x = [t[:, h : h + 1] for t in (q, k, v)]
        if b == 0:
            ref = torch.nn.functional.scaled_dot_product_attention(*x)
        elif b == 1:
            ref = coreset_attention(*x, grid, cs)
        else:
            ref = sliding_tile_reference(*x, grid, sl)
        res[sb][h] = (out[:, h : h + 1] - ref).abs().max().item()
print("RESULT " + json.dumps(res))
'''


@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_scattered_heads_on_triton_backends_are_not_copied():
    """Under the Triton interpreter: scattered sliding-tile and core-set heads go to the kernels with
    a head table (no index_select of q, k, v, no index_copy_ into the output) and match the
    per-head references; the reference backends (the control) copy each subset in and out."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-c", _NO_COPY_WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    res = json.loads(lines[0][len("RESULT "):])
    assert res["triton"]["copies"] == [], res["triton"]["copies"]
    assert sorted(res["reference"]["copies"]) == ["index_copy_"] * 2 + ["index_select"] * 6, res["reference"]["copies"]
    for backend in ("triton", "reference"):
        errs = {h: e for h, e in res[backend].items() if h != "copies"}
        assert max(errs.values()) < 1e-5, (backend, errs)
