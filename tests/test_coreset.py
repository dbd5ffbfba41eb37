import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import extras, grids, qkv
from vorta_ops.coreset import CoresetConfig, bucket_index, coreset_attention, coreset_reference
from vorta_ops.full import full_attention

buckets = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=20)
@given(grids, buckets, st.sampled_from([0.25, 0.5, 0.75]), st.sampled_from(["q", "qk"]), extras, extras, st.integers(0, 2**16))
def test_equals_loop_reference(grid, bucket, keep, sim, pre, suf, seed):
    cfg = CoresetConfig(bucket, keep, sim)
    L = pre + grid[0] * grid[1] * grid[2] + suf
    q, k, v = qkv(2, 2, L, 8, seed)
    torch.testing.assert_close(
        coreset_attention(q, k, v, grid, cfg, pre, suf), coreset_reference(q, k, v, grid, cfg, pre, suf),
        atol=1e-10, rtol=1e-10,
    )


def test_kv_mask_equals_reference():
    grid, cfg, suf = (2, 3, 4), CoresetConfig(), 3
    L = 24 + suf
    q, k, v = qkv(2, 2, L, 8, 1)
    m = torch.ones(2, L, dtype=torch.bool)
    m[0, -2:] = False
    torch.testing.assert_close(
        coreset_attention(q, k, v, grid, cfg, 0, suf, kv_mask=m),
        coreset_reference(q, k, v, grid, cfg, 0, suf, kv_mask=m), atol=1e-10, rtol=1e-10,
    )


def test_official_keep_count_and_dropped_tokens_copy_their_centre():
    cfg = CoresetConfig()  # (2,3,2) buckets, keep 0.5 -> centre + 5 least similar of 12
    assert cfg.bucket_size == 12 and cfg.n_keep == 6
    grid = (2, 3, 4)
    q, k, v = qkv(1, 1, 24, 8, 3)
    out = coreset_attention(q, k, v, grid, cfg)
    bi = bucket_index(grid, cfg.bucket)
    for b in range(bi.centre.numel()):
        c = int(bi.centre[b])
        members = [int(m) for m in bi.margin[b]]
        same = [m for m in members if torch.equal(out[0, 0, m], out[0, 0, c])]
        assert len(same) == 12 - 6  # exactly the dropped ones carry the centre's output


def test_keep_all_is_dense_attention():
    grid = (3, 4, 5)
    q, k, v = qkv(1, 3, 60, 8, 4)
    out = coreset_attention(q, k, v, grid, CoresetConfig((2, 2, 2), 1.0))
    torch.testing.assert_close(out, full_attention(q, k, v), atol=1e-10, rtol=1e-10)


def test_remainder_tokens_are_kept():
    bi = bucket_index((3, 4, 5), (2, 3, 2), 1, 2)
    covered = set(bi.centre.tolist()) | set(bi.margin.flatten().tolist())
    assert covered.isdisjoint(bi.rest.tolist())
    assert len(covered) + bi.rest.numel() == 1 + 60 + 2
    assert bi.centre.numel() == 1 * 1 * 2


def test_bad_config_and_shapes():
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        CoresetConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="similarity must be one of"):
        CoresetConfig(similarity="v")
    q = torch.zeros(1, 1, 7, 4)
    with pytest.raises(ValueError, match=r"shape \[B, H, 8, D\]"):
        coreset_attention(q, q, q, (2, 2, 2))
