"""The branches' custom ops (``vorta::sliding_tile_attention``, ``vorta::coreset_attention``) on CPU:
``torch.library.opcheck`` (schema and declared mutation, fake implementation, aot dispatch with
dynamic shapes, autograd registration), the registry path through them bit-identical to the plain
torch functions, and a tiny attention block (qkv projection -> routed_attention over a fixed table
of mixed branches -> output projection) under torch.compile: the ops stay opaque nodes of one
graph, no graph breaks, no recompiles across steps, output equal to eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vorta_ops.coreset import CoresetConfig, coreset_attention, coreset_branch, coreset_op
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.router import CORESET, FULL, SLIDING
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_attention, sliding_tile_op, sliding_tile_reference

GRID, PRE, SUF = (2, 3, 4), 1, 2  # 24 grid tokens + 3 extras
L = PRE + math.prod(GRID) + SUF
H, D = 6, 8
SLIDING_CFG = SlidingTileConfig((1, 2, 2), (1, 3, 3))
CORESET_CFG = CoresetConfig((2, 3, 2), 0.5, "qk")
# core-set heads 0, 1 (a run: views of q, k, v, out), sliding-tile 2, 4 and full 3, 5 (scattered)
BRANCHES = [CORESET, CORESET, SLIDING, FULL, SLIDING, FULL]


def qkv(seed=0, B=2, h=H, blhd=True):
    """q, k, v [B, H, L, D]; blhd: [B, L, H, D] memory seen as [B, H, L, D], as ComfyUI hands them."""
    g = torch.Generator().manual_seed(seed)
    if blhd:
        return [torch.randn(B, L, h, D, generator=g).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, h, L, D, generator=g) for _ in range(3)]


def kv_mask(B=2):
    m = torch.ones(B, L, dtype=torch.bool)
    m[1, -2:] = False  # text padding in the suffix
    return m


def sliding_args(q, k, v, out, *, heads=None, mask=None, scale=None, backend="reference"):
    return (q, k, v, out, list(GRID), list(SLIDING_CFG.tile), list(SLIDING_CFG.window), PRE, SUF, mask, scale, heads,
            backend)


def coreset_args(q, k, v, out, *, heads=None, mask=None, scale=None, backend="torch"):
    return (q, k, v, out, list(GRID), list(CORESET_CFG.bucket), CORESET_CFG.keep_ratio, CORESET_CFG.similarity, PRE,
            SUF, mask, scale, heads, backend)


# ---- (a) opcheck ---------------------------------------------------------------------------------

OPCHECK_CASES = {
    "plain": dict(),
    "kv_mask_scale": dict(mask=True, scale=0.3),
    "heads_scattered": dict(heads=[4, 1, 2]),
    "heads_int32_kv_mask": dict(heads=[0, 5], heads_dtype=torch.int32, mask=True),
}


def _opcheck_args(make_args, case, backend):
    q, k, v = qkv(1)
    out = torch.zeros(q.shape[0], L, H, D).transpose(1, 2)  # written in place: [B, L, H, D] underneath
    heads = case.get("heads")
    if heads is not None:
        heads = torch.tensor(heads, dtype=case.get("heads_dtype", torch.int64))
    return make_args(q, k, v, out, heads=heads, mask=kv_mask() if case.get("mask") else None,
                     scale=case.get("scale"), backend=backend)


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_opcheck_sliding_tile(case, backend):
    # eager FlexAttention on the CPU is a higher-order op with no kernel under the dispatch modes
    # of opcheck's schema and fake-tensor checks (a limit of flex, not of the op; CPU flex is only
    # for tests): aot dispatch and autograd registration are checked for it
    utils = ("test_autograd_registration", "test_aot_dispatch_dynamic") if backend == "flex" else None
    torch.library.opcheck(sliding_tile_op, _opcheck_args(sliding_args, OPCHECK_CASES[case], backend),
                          **({} if utils is None else {"test_utils": utils}))


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_coreset(case):
    torch.library.opcheck(coreset_op, _opcheck_args(coreset_args, OPCHECK_CASES[case], "torch"))


def test_op_schemas():
    st = str(torch.ops.vorta.sliding_tile_attention.default._schema)
    cs = str(torch.ops.vorta.coreset_attention.default._schema)
    assert "Tensor(a!) out" in st and st.endswith("-> ()"), st
    assert "Tensor(a!) out" in cs and cs.endswith("-> ()"), cs
    for s in (st, cs):  # only out is written
        assert s.count("(a!)") == 1, s


def test_op_refuses_bad_heads_tensor():
    q, k, v = qkv(2)
    out = torch.empty_like(q)
    for heads, msg in (
        (torch.tensor([[0, 1]]), r"expected heads as a 1-D int32 / int64 tensor of 1 to 6 head indices"),
        (torch.tensor([1.0]), r"expected heads as a 1-D int32 / int64 tensor"),
        (torch.tensor([6]), r"expected head indices in \[0, 6\), got \[6\]"),
        (torch.tensor([2, 2]), r"expected unique head indices, got \[2\] more than once"),
    ):
        with pytest.raises(ValueError, match=msg):
            sliding_tile_op(*sliding_args(q, k, v, out, heads=heads))
        with pytest.raises(ValueError, match=msg):
            coreset_op(*coreset_args(q, k, v, out, heads=heads))
    with pytest.raises(ValueError, match=r"unknown sliding-tile backend 'nope'"):
        sliding_tile_op(*sliding_args(q, k, v, out, backend="nope"))


# ---- the registry through the ops: the plain torch results, bit for bit ------------------------


@pytest.mark.parametrize("blhd", [True, False])
def test_registry_through_ops_is_bit_identical(blhd):
    q, k, v = qkv(3, blhd=blhd)
    m = kv_mask()
    ref = sliding_tile_reference(q, k, v, GRID, SLIDING_CFG, PRE, SUF, kv_mask=m)
    got = sliding_tile_attention(q, k, v, GRID, SLIDING_CFG, PRE, SUF, kv_mask=m)
    assert torch.equal(got, ref)
    assert got.stride() == q.stride()  # allocated like q: a [B, L, H*D] reshape of it stays a view
    ref = coreset_attention(q, k, v, GRID, CORESET_CFG, PRE, SUF, kv_mask=m, scale=0.5)
    assert torch.equal(coreset_branch(q, k, v, GRID, CORESET_CFG, PRE, SUF, kv_mask=m, scale=0.5), ref)
    heads = [4, 0, 3]  # scattered: the op gets a head tensor, the torch paths a gathered copy
    out = torch.full_like(q, float("nan"))
    assert sliding_tile_attention(q, k, v, GRID, SLIDING_CFG, PRE, SUF, out=out, heads=heads) is out
    sub = [x[:, heads] for x in (q, k, v)]
    assert torch.equal(out[:, heads], sliding_tile_reference(*sub, GRID, SLIDING_CFG, PRE, SUF))
    assert out[:, [1, 2, 5]].isnan().all()
    out = torch.full_like(q, float("nan"))
    coreset_branch(q, k, v, GRID, CORESET_CFG, PRE, SUF, out=out, heads=torch.tensor(heads))
    assert torch.equal(out[:, heads], coreset_attention(*sub, GRID, CORESET_CFG, PRE, SUF))
    assert out[:, [1, 2, 5]].isnan().all()


# ---- (b) a tiny attention block under torch.compile ---------------------------------------------


class Block(torch.nn.Module):
    """qkv projection -> routed attention over BRANCHES -> output projection; x: [B, L, H*D]."""

    def __init__(self, cfg: RoutedConfig):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_qkv = torch.nn.Parameter(torch.randn(3 * H * D, H * D, generator=g) / math.sqrt(H * D))
        self.w_out = torch.nn.Parameter(torch.randn(H * D, H * D, generator=g) / math.sqrt(H * D))
        self.cfg = cfg

    def forward(self, x, kv_mask=None):
        B = x.shape[0]
        q, k, v = F.linear(x, self.w_qkv).view(B, L, 3, H, D).unbind(2)  # [B, L, H, D] each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views
        o = routed_attention(q, k, v, BRANCHES, GRID, self.cfg, PRE, SUF, kv_mask=kv_mask)
        return F.linear(o.transpose(1, 2).reshape(B, L, H * D), self.w_out)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and the custom-op nodes in them,
    then hands them to ``inner``."""

    def __init__(self, inner: str):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0
        self.op_nodes: list[str] = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.op_nodes += [str(n.target) for n in gm.graph.nodes
                          if n.op == "call_function" and str(n.target).startswith("vorta.")]
        return self.inner(gm, example_inputs)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("masked", [False, True])
def test_block_compiles_as_one_graph_without_recompiles(inner, masked):
    from torch._dynamo.utils import counters

    block = Block(RoutedConfig(SLIDING_CFG, CORESET_CFG)).eval()
    mask = kv_mask() if masked else None
    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend(inner)
    compiled = torch.compile(block, backend=backend)
    with torch.no_grad():
        for step in range(3):  # three "denoising steps": new inputs, same shapes
            x = torch.randn(2, L, H * D, generator=torch.Generator().manual_seed(10 + step))
            torch.testing.assert_close(compiled(x, mask), block(x, mask), atol=0, rtol=0)
    breaks = dict(counters["graph_break"])
    unique = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert breaks == {}, f"graph breaks: {breaks}"
    assert backend.graphs == 1 and unique == 1, f"{backend.graphs} graphs compiled, {unique} unique: recompiled"
    # the branches are opaque ops in that graph: sliding tile and core-set once each
    assert sorted(backend.op_nodes) == ["vorta.coreset_attention.default", "vorta.sliding_tile_attention.default"], \
        backend.op_nodes


def test_block_compiles_fullgraph():
    """fullgraph=True: any graph break would raise."""
    block = Block(RoutedConfig(SLIDING_CFG, CORESET_CFG)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, L, H * D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, kv_mask()), block(x, kv_mask()), atol=0, rtol=0)
    torch._dynamo.reset()


def test_head_tensor_plan_compiles_without_breaks_or_recompiles():
    """Dispatch-free routing with a per-step plan of head-index tensors (graph inputs, wrapped in
    HeadTable: trusted, never read back): one graph, no breaks, no recompile while the group
    sizes stay (the heads themselves change every step)."""
    from torch._dynamo.utils import counters

    from vorta_ops._backends import HeadTable, run_on_heads
    from vorta_ops.full import full_attention

    def layer(x, sliding, coreset, full):
        B = x.shape[0]
        q, k, v = (t.transpose(1, 2) for t in x.view(B, L, 3, H, D).unbind(2))
        out = torch.empty_like(q)
        sliding_tile_attention(q, k, v, GRID, SLIDING_CFG, PRE, SUF, out=out, heads=HeadTable(sliding))
        coreset_branch(q, k, v, GRID, CORESET_CFG, PRE, SUF, out=out, heads=HeadTable(coreset))
        return run_on_heads(full_attention, q, k, v, heads=HeadTable(full), out=out, who="full attention")

    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend("aot_eager")
    compiled = torch.compile(layer, backend=backend)
    plans = [([2, 4], [0, 1], [3, 5]), ([0, 5], [2, 3], [1, 4]), ([3, 1], [5, 0], [2, 4])]
    for step, plan in enumerate(plans):
        x = torch.randn(2, L, 3 * H * D, generator=torch.Generator().manual_seed(step))
        idx = [torch.tensor(h) for h in plan]
        torch.testing.assert_close(compiled(x, *idx), layer(x, *idx), atol=0, rtol=0)
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    assert breaks == {} and backend.graphs == 1, (breaks, backend.graphs)
    assert len(backend.op_nodes) == 2, backend.op_nodes
