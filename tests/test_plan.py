"""RoutingPlan: one plan per (table, grid, configs), equal to routed dispatch, and its data views."""
import pytest
import torch
import torch.nn.functional as F

from vorta_ops.coreset import CoresetConfig, _loop_select, coreset_reference
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.plan import RoutingPlan, reference_layer, sliding_key_share
from vorta_ops.router import CORESET, FULL, SLIDING
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_mask

GRID = (2, 4, 6)
CFG = RoutedConfig(SlidingTileConfig((1, 2, 3), (1, 3, 1)), CoresetConfig((2, 2, 2), 0.5, "q"), "reference", "torch")
TABLE = torch.tensor([[CORESET, SLIDING, FULL, SLIDING], [FULL, FULL, FULL, FULL], [SLIDING, CORESET, CORESET, SLIDING]],
                     dtype=torch.int8)


def qkv(L=48, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(3)]


def test_plan_runs_exactly_what_routed_dispatch_runs():
    plan = RoutingPlan(TABLE, GRID, CFG)
    q, k, v = qkv(L=48 + 5, seed=1)
    for block in range(3):
        a = plan.run(block, q, k, v, n_prefix=3, n_suffix=2)
        b = routed_attention(q, k, v, TABLE[block], GRID, CFG, 3, 2)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, reference_layer(plan, block, q, k, v, 3, 2))
    assert plan.all_full == (False, True, False)
    assert plan.groups[0] == {FULL: [2], CORESET: [0], SLIDING: [1, 3]}


def test_plans_are_built_once_per_content():
    cache = {}
    a = RoutingPlan.for_step(cache, TABLE.clone(), GRID, CFG)
    assert RoutingPlan.for_step(cache, TABLE.clone(), list(GRID), CFG) is a
    other = TABLE.clone()
    other[0, 0] = FULL
    assert RoutingPlan.for_step(cache, other, GRID, CFG) is not a
    assert RoutingPlan.for_step(cache, TABLE, (2, 4, 7), CFG) is not a
    assert len(cache) == 3


def test_sparsity_and_work_count_every_head():
    plan = RoutingPlan(TABLE, GRID, CFG)
    assert plan.sparsity() == {"full": 5 / 12, "coreset": 3 / 12, "sliding_tile": 4 / 12}
    share = sliding_key_share(CFG, GRID)
    assert share == pytest.approx(1 / 2 * 1 * 1 / 2)  # tiles per axis (2, 2, 2), window (1, 3, 1)
    assert plan.relative_work() == pytest.approx((5 * 1.0 + 3 * 0.25 + 4 * share) / 12)
    text = plan.describe()
    assert "full 41.7%, coreset 25.0%, sliding_tile 33.3%" in text and "grid (2, 4, 6)" in text


def test_to_dense_masks():
    plan = RoutingPlan(TABLE, GRID, CFG)
    assert plan.to_dense(1, 0).all()
    assert torch.equal(plan.to_dense(0, 1, 3, 2), sliding_tile_mask(GRID, CFG.sliding, 3, 2))
    q, k, v = qkv(seed=2)
    with pytest.raises(ValueError, match="pass q"):
        plan.to_dense(0, 0)
    mask = plan.to_dense(0, 0, q=q[0, 0])
    # on the core-set's own rows, attention under the mask is the core-set output; a dropped row's
    # mask is its centre's
    keep, centre_of = _loop_select(q[0, 0], GRID, CFG.coreset, 0, 0)
    masked = F.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], attn_mask=mask)
    ref = coreset_reference(q[:, :1], k[:, :1], v[:, :1], GRID, CFG.coreset)
    assert len(keep) == 24 and int(mask.any(0).sum()) == 24
    torch.testing.assert_close(masked[0, 0, keep], ref[0, 0, keep])
    assert all(torch.equal(mask[p], mask[c]) for p, c in centre_of.items())
