"""Training-free routing: sampled rows, per-head branch errors, the decision and the stored profile."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vorta_ops import profiling
from vorta_ops.branches import CORESET, FULL, N_BRANCHES, SLIDING
from vorta_ops.coreset import CoresetConfig, coreset_attention
from vorta_ops.demo import synthetic_video_qkv
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.full import full_attention
from vorta_ops.profiling import (
    HeadProfile, _tile_ok, branch_costs, chunk_heads, decide_from_errors, profile_heads, sample_rows,
)
from vorta_ops.sliding_tile import SlidingTileConfig, sliding_tile_mask, sliding_tile_reference

GRID = (4, 8, 8)
L = 4 * 8 * 8
D = 32
# tiles of 1x2x2 and a 3x3x3 window: a query sees 27 of 64 tiles; buckets of 2x2x2 divide the grid
CFG = RoutedConfig(SlidingTileConfig((1, 2, 2)), CoresetConfig((2, 2, 2)))
TAU = 0.1


def _positions():
    t, h, w = torch.meshgrid(torch.arange(4), torch.arange(8), torch.arange(8), indexing="ij")
    return torch.stack((t, h, w), -1).reshape(-1, 3).float()  # [L, 3]


def planted_heads(seed=0):
    """q, k, v [1, 4, L, D]: head 0 local (scores -2 * squared 3D distance), head 1 redundant and
    long-range (every 2x2x2 core-set bucket holds one repeated token, diffuse scores), head 2
    random, head 3 local again with other values."""
    g = torch.Generator().manual_seed(seed)
    p = _positions()
    q, k, v = (torch.zeros(4, L, D) for _ in range(3))
    # q.k * D**-0.5 = 2 * (2 p.p' - |p'|^2) = -2 |p - p'|^2 + (a constant per query row)
    a = (2.0 * D ** 0.5) ** 0.5
    for h in (0, 3):
        q[h, :, :3], q[h, :, 3] = a * 2 * p, -a
        k[h, :, :3], k[h, :, 3] = a * p, a * (p * p).sum(-1)
        v[h] = torch.randn(L, D, generator=g)
    bucket = ((p[:, 0] // 2) * 16 + (p[:, 1] // 2) * 4 + p[:, 2] // 2).long()  # [L] bucket of each token
    per_bucket = lambda std: (torch.randn(32, D, generator=g) * std)[bucket]  # noqa: E731
    q[1] = per_bucket(0.7) + 1e-3 * torch.randn(L, D, generator=g)
    k[1] = per_bucket(0.7) + 1e-3 * torch.randn(L, D, generator=g)
    v[1] = per_bucket(1.0) + 1e-3 * torch.randn(L, D, generator=g)
    q[2], k[2], v[2] = (torch.randn(L, D, generator=g) * s for s in (1.5, 1.5, 1.0))
    return q[None], k[None], v[None]


# ---- sample_rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,r", [((4, 8, 8), 64), ((5, 7, 3), 23), ((3, 1, 9), 4), ((2, 4, 4), 5)])
def test_sample_rows_cover_every_frame_spread_over_h_and_w(grid, r):
    T, Hg, Wg = grid
    rows = sample_rows(grid, r, n_prefix=3, seed=1)
    assert rows.dtype == torch.long and rows.numel() == r
    assert rows.unique().numel() == r and bool((rows[1:] > rows[:-1]).all())  # distinct, sorted
    pos = rows - 3
    assert int(pos.min()) >= 0 and int(pos.max()) < T * Hg * Wg
    t, h, w = pos // (Hg * Wg), pos // Wg % Hg, pos % Wg
    counts = torch.bincount(t, minlength=T)
    assert int(counts.min()) >= r // T and int(counts.max()) <= -(-r // T)  # an equal share per frame
    if r // T >= 4:  # spread inside every frame: more than one h and more than one w
        for f in range(T):
            assert len(set(h[t == f].tolist())) >= min(Hg, 2) and len(set(w[t == f].tolist())) >= min(Wg, 2), f
    if grid == GRID:  # 16 rows a frame: every quadrant of every frame has some
        quadrant = t * 4 + (h >= 4).long() * 2 + (w >= 4).long()
        assert torch.bincount(quadrant, minlength=16).min() >= 2


def test_sample_rows_deterministic_and_seeded_without_the_global_rng():
    state = torch.random.get_rng_state()
    a = sample_rows(GRID, 64, seed=5)
    torch.manual_seed(1234)  # the global RNG plays no part
    assert torch.equal(a, sample_rows(GRID, 64, seed=5))
    assert torch.equal(torch.random.get_rng_state(), torch.random.get_rng_state())
    assert not torch.equal(a, sample_rows(GRID, 64, seed=6))
    torch.random.set_rng_state(state)


def test_sample_rows_limits():
    assert torch.equal(sample_rows(GRID, 10_000, n_prefix=2), torch.arange(L) + 2)  # more rows than tokens: all
    for bad in (3, 0, -1, 2.5, True):  # fewer rows than frames cannot cover every frame
        with pytest.raises(ValueError):
            sample_rows(GRID, bad)


# ---- profile_heads -----------------------------------------------------------------------------


def _errors_from_outputs(outs, dense, rows):
    """[H] relative errors of [B, H, L, D] outputs against dense on rows (max over the batch)."""
    d = (outs[:, :, rows] - dense[:, :, rows]).double().flatten(2).norm(dim=-1)
    return (d / dense[:, :, rows].double().flatten(2).norm(dim=-1)).amax(0)


CASES = {
    "plain": dict(cfg=CFG, n_prefix=0, n_suffix=0, mask=False),
    "extras, key mask, qk": dict(
        cfg=RoutedConfig(SlidingTileConfig((2, 2, 4)), CoresetConfig((2, 3, 2), 0.5, "qk")), n_prefix=3, n_suffix=5,
        mask=True,
    ),
}


@pytest.mark.parametrize("method", ["exact", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_profile_equals_the_branches_own_outputs_on_the_rows(case, method):
    """The profiler's row-only core-set and sliding tile give what the branches give at those rows,
    by explicit fp32 score matrices ("exact") and by fused attention ("sdpa", fp32 inputs here)."""
    c = CASES[case]
    cfg, npre, nsuf = c["cfg"], c["n_prefix"], c["n_suffix"]
    q, k, v = synthetic_video_qkv(GRID, heads=4, head_dim=D, batch=2, seed=3)
    g = torch.Generator().manual_seed(0)
    extra = lambda n: torch.randn(2, 4, n, D, generator=g)  # noqa: E731
    q, k, v = (torch.cat((extra(npre), x, extra(nsuf)), 2) for x in (q, k, v))
    n = q.shape[2]
    kv_mask = None
    if c["mask"]:
        kv_mask = torch.ones(2, n, dtype=torch.bool)
        kv_mask[1, -2:] = False  # padded text tokens of sample 1
    rows = sample_rows(GRID, 48, n_prefix=npre, seed=2)
    e = profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, method=method)
    assert e.dtype == torch.float32 and e.shape == (4, N_BRANCHES)
    dense = full_attention(q, k, v, kv_mask=kv_mask)
    core = coreset_attention(q, k, v, GRID, cfg.coreset, npre, nsuf, kv_mask=kv_mask)
    tile = sliding_tile_reference(q, k, v, GRID, cfg.sliding, npre, nsuf, kv_mask=kv_mask)
    assert torch.equal(e[:, FULL], torch.zeros(4))
    torch.testing.assert_close(e[:, CORESET].double(), _errors_from_outputs(core, dense, rows), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(e[:, SLIDING].double(), _errors_from_outputs(tile, dense, rows), atol=2e-5, rtol=1e-4)
    assert float(e[:, 1:].min()) > 1e-4 and float(e[:, 1:].max()) > 0.1  # the branches do differ from dense


@pytest.mark.parametrize("key_block", [None, 24])
@pytest.mark.parametrize("case", list(CASES))
def test_heads_in_chunks_give_what_one_head_at_a_time_gives(case, key_block, monkeypatch):
    """5 heads in chunks of 1, 2 (a short last chunk) and 5 == each head profiled on its own;
    key_block 24: the products by v blocked by keys (with a remainder), as at video sizes."""
    if key_block:
        monkeypatch.setattr(profiling, "PV_KEY_BLOCK", key_block)
    c = CASES[case]
    cfg, npre, nsuf = c["cfg"], c["n_prefix"], c["n_suffix"]
    H = 5
    q, k, v = synthetic_video_qkv(GRID, heads=H, head_dim=D, batch=2, seed=5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    extra = lambda n: torch.randn(2, H, n, D, generator=g).bfloat16()  # noqa: E731
    q, k, v = (torch.cat((extra(npre), x, extra(nsuf)), 2) for x in (q, k, v))
    kv_mask = None
    if c["mask"]:
        kv_mask = torch.ones(2, q.shape[2], dtype=torch.bool)
        kv_mask[0, :2] = False
    rows = sample_rows(GRID, 40, n_prefix=npre, seed=4)
    one_by_one = torch.cat([
        profile_heads(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], GRID, cfg, rows, npre, nsuf, kv_mask)
        for h in range(H)
    ])
    assert float(one_by_one[:, 1:].min()) > 1e-4  # non-trivial errors to compare
    for chunk in (1, 2, H, None):
        e = profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, heads_per_chunk=chunk)
        torch.testing.assert_close(e, one_by_one, rtol=1e-6, atol=0, msg=f"heads_per_chunk={chunk}")
    with pytest.raises(ValueError, match="heads_per_chunk"):
        profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, heads_per_chunk=0)


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_method_in_bf16_is_close_to_exact_and_decides_alike(case):
    """bf16 inputs: the fused-attention errors sit within 0.02 of the exact ones (the outputs'
    rounding), the planted heads' decisions are the same, and the sdpa chunks agree."""
    c = CASES[case]
    cfg, npre, nsuf = c["cfg"], c["n_prefix"], c["n_suffix"]
    q, k, v = (x.bfloat16() for x in planted_heads())
    g = torch.Generator().manual_seed(2)
    extra = lambda n: torch.randn(1, 4, n, D, generator=g).bfloat16()  # noqa: E731
    q, k, v = (torch.cat((extra(npre), x, extra(nsuf)), 2) for x in (q, k, v))
    kv_mask = None
    if c["mask"]:
        kv_mask = torch.ones(1, q.shape[2], dtype=torch.bool)
        kv_mask[0, -2:] = False
    rows = sample_rows(GRID, 64, n_prefix=npre, seed=1)
    exact = profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, method="exact")
    fused = profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, method="sdpa")
    assert float((fused - exact).abs().max()) < 0.02, (fused, exact)
    costs = branch_costs(cfg, GRID)
    assert torch.equal(decide_from_errors(fused, TAU, costs), decide_from_errors(exact, TAU, costs))
    for chunk in (1, 3):
        torch.testing.assert_close(
            profile_heads(q, k, v, GRID, cfg, rows, npre, nsuf, kv_mask, method="sdpa", heads_per_chunk=chunk), fused,
            atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="method"):
        profile_heads(q, k, v, GRID, cfg, rows, method="fast")


def test_weighted_sum_blocked_by_keys_is_the_product(monkeypatch):
    g = torch.Generator().manual_seed(0)
    p, v = torch.rand(2, 3, 5, 100, generator=g), torch.randn(2, 3, 100, 8, generator=g)
    for block, n in ((10, 100), (30, 100), (30, 90), (60, 100)):  # 10 blocks; 3 + remainder; 3 whole; 1 (no split)
        monkeypatch.setattr(profiling, "PV_KEY_BLOCK", block)
        pn, vn = p[..., :n], v[..., :n, :]
        torch.testing.assert_close(profiling._weighted_sum(pn, vn), (pn.double() @ vn.double()).float())


def test_chunk_heads_fits_the_budget():
    per_head = 4 * 2 * 72_000 * (3 * 256 + 2 * 128)  # B 2, Wan-14B 720p, r 256, D 128
    assert chunk_heads(2, 72_000, 128, 256, budget=4 * per_head) == 4
    assert chunk_heads(2, 72_000, 128, 256, budget=4 * per_head - 1) == 3
    assert chunk_heads(2, 72_000, 128, 256, budget=1) == 1  # never below one head
    assert chunk_heads(2, 32_760, 128, 64) > chunk_heads(2, 32_760, 128, 256) > chunk_heads(2, 72_000, 128, 256)


@pytest.mark.parametrize("grid,tile,window,n_prefix,n_suffix", [
    ((4, 8, 8), (1, 2, 2), (3, 3, 3), 0, 0),
    ((4, 8, 8), (2, 2, 4), (3, 3, 3), 3, 5),  # extras on both sides
    ((5, 7, 3), (2, 3, 2), (5, 3, 3), 2, 1),  # ragged tiles; fewer tiles than the window on t and w
    ((2, 4, 4), (1, 1, 1), (1, 3, 5), 0, 4),
])
def test_row_tile_mask_is_sliding_tile_mask(grid, tile, window, n_prefix, n_suffix):
    cfg = SlidingTileConfig(tile, window)
    L = n_prefix + grid[0] * grid[1] * grid[2] + n_suffix
    every_row = torch.arange(L)  # grid rows and extra rows
    assert torch.equal(_tile_ok(grid, cfg, n_prefix, n_suffix, every_row),
                       sliding_tile_mask(grid, cfg, n_prefix, n_suffix, None, every_row))


def test_profile_takes_the_worst_sample_of_the_batch():
    q, k, v = planted_heads()
    rows = sample_rows(GRID, 64)
    e_local = profile_heads(q, k, v, GRID, CFG, rows)
    qr, kr, vr = planted_heads(seed=1)
    both = [torch.cat((x, y[:, [2, 2, 2, 2]]), 0) for x, y in zip((q, k, v), (qr, kr, vr))]  # sample 1: random heads
    e_both = profile_heads(*both, GRID, CFG, rows)
    e_rand = profile_heads(*(x[1:] for x in both), GRID, CFG, rows)
    assert torch.equal(e_both, torch.maximum(e_local, e_rand))


def test_planted_heads_route_local_to_tile_redundant_to_coreset_random_to_full():
    q, k, v = planted_heads()
    rows = sample_rows(GRID, L // 4, seed=0)
    e = profile_heads(q, k, v, GRID, CFG, rows)
    assert float(e[0, SLIDING]) < 0.01 and float(e[0, CORESET]) > 0.3, e  # local head
    assert float(e[1, CORESET]) < 0.01 and float(e[1, SLIDING]) > 0.3, e  # redundant long-range head
    assert float(e[2, 1:].min()) > 0.3, e  # random head: no sparse branch is close
    want = torch.tensor([SLIDING, CORESET, FULL, SLIDING], dtype=torch.int8)
    assert torch.equal(decide_from_errors(e, TAU, branch_costs(CFG, GRID)), want)
    assert torch.equal(decide_from_errors(e, TAU), want)  # default costs: sparse before full


def test_tau_zero_routes_all_full_and_is_bit_identical_to_dense():
    q, k, v = planted_heads()
    e = profile_heads(q, k, v, GRID, CFG, sample_rows(GRID, 64))
    table = decide_from_errors(e, 0.0, branch_costs(CFG, GRID))
    assert torch.equal(table, torch.full((4,), FULL, dtype=torch.int8))
    assert torch.equal(routed_attention(q, k, v, table, GRID, CFG), full_attention(q, k, v))
    exact = e.clone()
    exact[1, CORESET] = 0.0  # a sparse branch that is exact passes even tau = 0
    assert decide_from_errors(exact, 0.0).tolist() == [FULL, CORESET, FULL, FULL]


def test_same_inputs_same_profile_and_table_other_seed_other_rows():
    q, k, v = synthetic_video_qkv(GRID, heads=4, head_dim=D)
    r1, r2 = sample_rows(GRID, 64, seed=7), sample_rows(GRID, 64, seed=7)
    e1, e2 = profile_heads(q, k, v, GRID, CFG, r1), profile_heads(q, k, v, GRID, CFG, r2)
    assert torch.equal(e1, e2)
    assert torch.equal(decide_from_errors(e1, 0.2), decide_from_errors(e2, 0.2))
    r3 = sample_rows(GRID, 64, seed=8)
    assert not torch.equal(r1, r3)
    assert not torch.equal(e1, profile_heads(q, k, v, GRID, CFG, r3))


def test_sampled_errors_agree_with_all_rows_at_a_quarter_of_the_rows():
    """The sample is honest: r = L/4 stratified rows give nearly the error over every row."""
    q, k, v = synthetic_video_qkv(GRID, heads=8, head_dim=D, seed=1)
    truth = profile_heads(q, k, v, GRID, CFG, torch.arange(L))
    for seed in range(3):
        est = profile_heads(q, k, v, GRID, CFG, sample_rows(GRID, L // 4, seed=seed))
        dev = (est - truth).abs()
        assert float(dev.max()) < 0.05 and bool((dev <= 0.2 * truth + 1e-3).all()), (seed, est, truth)


def test_profile_refuses_bad_inputs():
    q, k, v = planted_heads()
    rows = sample_rows(GRID, 64)
    with pytest.raises(ValueError, match="sequence length"):
        profile_heads(q, k, v, (4, 8, 9), CFG, rows)
    with pytest.raises(ValueError, match="rows"):
        profile_heads(q, k, v, GRID, CFG, torch.tensor([L]))
    with pytest.raises(ValueError, match="kv_mask"):
        profile_heads(q, k, v, GRID, CFG, rows, kv_mask=torch.ones(1, L))


# ---- decide_from_errors ------------------------------------------------------------------------


def test_decision_takes_the_cheapest_passing_branch():
    e = torch.tensor([[0.0, 0.05, 0.02]])  # both sparse branches pass tau 0.1
    assert decide_from_errors(e, 0.1, [1.0, 0.25, 0.4]).tolist() == [CORESET]
    assert decide_from_errors(e, 0.1, [1.0, 0.4, 0.25]).tolist() == [SLIDING]
    assert decide_from_errors(e, 0.1, [1.0, 0.3, 0.3]).tolist() == [SLIDING]  # equal cost: lower error
    assert decide_from_errors(e, 0.03, [1.0, 0.25, 0.4]).tolist() == [SLIDING]  # the cheaper one fails
    assert decide_from_errors(e, 0.01, [1.0, 0.25, 0.4]).tolist() == [FULL]
    assert decide_from_errors(torch.tensor([[0.0, float("nan"), 0.5]]), 1.0).tolist() == [SLIDING]  # NaN fails


def test_hysteresis_keeps_the_previous_sparse_branch_within_the_margin():
    e = torch.tensor([[0.0, 0.105, 0.01], [0.0, 0.13, 0.01], [0.0, 0.5, 0.5]])
    costs = [1.0, 0.25, 0.4]
    assert decide_from_errors(e, 0.1, costs).tolist() == [SLIDING, SLIDING, FULL]
    prev = torch.tensor([CORESET, FULL, FULL])  # a full head is not held: it leaves full once a branch passes
    assert decide_from_errors(e, 0.1, costs, prev=prev, margin=0.1).tolist() == [CORESET, SLIDING, FULL]
    assert decide_from_errors(e, 0.1, costs, prev=prev, margin=0.0).tolist() == [SLIDING, SLIDING, FULL]
    with pytest.raises(ValueError):
        decide_from_errors(e, 0.1, costs, prev=torch.tensor([0, 1]))


_errs = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12)


@given(_errs, st.floats(0, 1), st.floats(0, 1), st.sampled_from([None, (1.0, 0.25, 0.4), (1.0, 0.5, 0.3)]),
       st.integers(0, 2 ** 16))
def test_full_heads_never_increase_with_tau(pairs, t1, t2, costs, seed):
    lo, hi = sorted((t1, t2))
    e = torch.tensor([[0.0, a, b] for a, b in pairs])
    prev = torch.randint(0, N_BRANCHES, (len(pairs),), generator=torch.Generator().manual_seed(seed))
    for p in (None, prev):
        at_lo, at_hi = decide_from_errors(e, lo, costs, prev=p), decide_from_errors(e, hi, costs, prev=p)
        assert int((at_hi == FULL).sum()) <= int((at_lo == FULL).sum())
        assert not bool(((at_lo != FULL) & (at_hi == FULL)).any())  # no head goes back to full
        chosen = e.gather(1, at_lo.long()[:, None])[:, 0]  # every pick passes tau (or its margin)
        assert bool((chosen <= lo * (1.1 if p is not None else 1.0) + 1e-12).all())


def test_decide_refuses_bad_arguments():
    e = torch.zeros(2, N_BRANCHES)
    for kw in (dict(tau=-0.1), dict(tau=float("nan")), dict(tau=0.1, costs=[1.0, 0.5])):
        with pytest.raises(ValueError):
            decide_from_errors(e, **kw)
    with pytest.raises(ValueError):
        decide_from_errors(torch.zeros(2, 2), 0.1)


# ---- HeadProfile -------------------------------------------------------------------------------


def test_stored_profile_rethresholds_like_a_fresh_profile():
    q, k, v = synthetic_video_qkv(GRID, heads=8, head_dim=D, seed=4)
    qp, kp, vp = planted_heads()
    blocks = [(q, k, v), (qp.repeat(1, 2, 1, 1), kp.repeat(1, 2, 1, 1), vp.repeat(1, 2, 1, 1))]
    rows = sample_rows(GRID, 64, seed=3)
    prof = HeadProfile.build([profile_heads(*b, GRID, CFG, rows) for b in blocks], GRID, CFG, rows.numel(), 3)
    stored = HeadProfile.from_dict(json.loads(json.dumps(prof.to_dict(), allow_nan=False)))
    assert torch.equal(stored.errors, prof.errors)
    assert stored.grid == GRID and stored.n_rows == 64 and stored.seed == 3
    assert stored.routed_config.sliding == CFG.sliding and stored.routed_config.coreset == CFG.coreset
    tables = []
    for tau in (0.0, 0.05, 0.1, 0.2, 0.4, 1.0):
        fresh = torch.stack([
            decide_from_errors(profile_heads(*b, GRID, CFG, sample_rows(GRID, 64, seed=3)), tau, branch_costs(CFG, GRID))
            for b in blocks
        ])
        assert stored.table(tau).shape == (2, 8)
        assert torch.equal(stored.table(tau), fresh), tau
        tables.append(fresh)
    assert len({t.numpy().tobytes() for t in tables}) >= 3  # the taus do route differently


def test_profile_dict_is_json_safe_and_checked():
    e = torch.tensor([[[0.0, float("nan"), 0.01]]])
    prof = HeadProfile.build(e, GRID, CFG, 64, 0)
    d = json.loads(json.dumps(prof.to_dict(), allow_nan=False))
    assert d["errors"] == [[[0.0, None, pytest.approx(0.01)]]]
    back = HeadProfile.from_dict(d)
    assert torch.isnan(back.errors[0, 0, CORESET]) and back.table(1.0).tolist() == [[SLIDING]]
    assert back.costs == tuple(branch_costs(CFG, GRID).tolist())
    with pytest.raises(ValueError, match="format"):
        HeadProfile.from_dict({**d, "format": 99})
    with pytest.raises(ValueError, match="branches"):
        HeadProfile.from_dict({**d, "branches": ["full", "sliding_tile", "coreset"]})


# ---- speed mode: decide_for_budget -------------------------------------------------------------


def _work_and_sq_error(choice, errors, costs):
    c = [1.0 if b == FULL else costs[b] for b in range(len(costs))]
    work = sum(c[int(b)] for b in choice)
    err = sum(float(errors[h, int(b)]) ** 2 if int(b) != FULL else 0.0 for h, b in enumerate(choice))
    return work, err


@pytest.mark.parametrize("seed", range(12))
def test_budget_decision_is_optimal_for_the_work_it_reaches(seed):
    """Against every assignment of 5 heads to 3 branches: the greedy choice meets the budget when it
    can, and no assignment with at most the same work has a smaller summed squared error."""
    import itertools

    from vorta_ops.profiling import decide_for_budget

    g = torch.Generator().manual_seed(seed)
    errors = torch.rand(5, 3, generator=g) * 1.5
    errors[:, FULL] = 0.0
    errors[int(torch.randint(5, (1,), generator=g)), CORESET] = float("nan")  # an unmeasured branch is never used
    costs = [1.0, 0.5, 0.22]
    for budget in (1.0, 0.8, 0.6, 0.45, 0.3, 0.22):
        choice = decide_for_budget(errors, budget, costs)
        work, err = _work_and_sq_error(choice.tolist(), errors.nan_to_num(float("inf")), costs)
        best = {}
        for combo in itertools.product(range(3), repeat=5):
            w, e = _work_and_sq_error(combo, errors.nan_to_num(float("inf")), costs)
            best.setdefault(round(w, 9), e)
            best[round(w, 9)] = min(best[round(w, 9)], e)
        feasible = [w for w, e in best.items() if w <= budget * 5 + 1e-9 and e < float("inf")]
        if feasible:
            assert work <= budget * 5 + 1e-9, (budget, choice.tolist())
        assert err <= min(e for w, e in best.items() if w <= work + 1e-9) + 1e-9, (budget, choice.tolist())


def test_budget_decision_monotone_with_floor_and_fixed_heads():
    from vorta_ops.profiling import decide_for_budget

    g = torch.Generator().manual_seed(3)
    errors = torch.rand(4, 8, 3, generator=g)
    errors[..., FULL] = 0.0
    costs = [1.0, 0.5, 0.2]
    last = -1.0
    for budget in (1.0, 0.9, 0.7, 0.5, 0.3, 0.2):  # a smaller budget never lowers the error
        ch = decide_for_budget(errors, budget, costs)
        err = float(errors.gather(-1, ch.long()[..., None]).pow(2).sum())
        assert err >= last - 1e-12
        last = err
    fixed = torch.zeros(4, 8, dtype=torch.bool)
    fixed[0] = True
    ch = decide_for_budget(errors, 0.2, costs, max_error=0.5, fixed=fixed)
    assert bool((ch[0] == FULL).all())
    used = errors.gather(-1, ch.long()[..., None])[..., 0]
    assert float(used.max()) <= 0.5  # the floor holds even when the budget is out of reach
    with pytest.raises(ValueError, match="budget"):
        decide_for_budget(errors, -0.1, costs)
