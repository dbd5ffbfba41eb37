import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import extras, qkv
from vorta_ops.coreset import CoresetConfig, coreset_reference
from vorta_ops.dispatch import RoutedConfig, head_groups, routed_attention
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_reference

small_grids = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


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
    for h, b in enumerate(branches):
        s = slice(h, h + 1)
        if b == 0:
            ref = F.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s], attn_mask=kv_mask[:, None, None])
        elif b == 1:
            ref = coreset_reference(q[:, s], k[:, s], v[:, s], grid, cfg.coreset, pre, suf, kv_mask=kv_mask)
        else:
            ref = sliding_tile_reference(q[:, s], k[:, s], v[:, s], grid, cfg.sliding, pre, suf, kv_mask=kv_mask)
        torch.testing.assert_close(out[:, s], ref, atol=1e-10, rtol=1e-10)


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
