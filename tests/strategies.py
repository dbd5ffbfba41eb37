"""Shared hypothesis strategies: small odd grids, tiles, extra tokens."""
import torch
from hypothesis import strategies as st

dims = st.integers(1, 7)
grids = st.tuples(st.integers(1, 5), dims, dims)
tiles = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
windows = st.tuples(*[st.sampled_from([1, 3, 5])] * 3)
extras = st.integers(0, 4)


def qkv(B, H, L, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))
