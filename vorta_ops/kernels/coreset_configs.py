"""Launch parameters of the core-set kernels (``coreset_kernels.py``): fixed sizes, no autotuning
(the kernels are memory-bound gathers; these were picked on the H100 and are the knobs to tune).
"""
from __future__ import annotations

import triton

__all__ = ["TOKENS_PER_PROGRAM", "REST_BLOCK", "EXPAND_BLOCK_L", "select_gather_meta", "EXPAND_NUM_WARPS"]

TOKENS_PER_PROGRAM = 64  # tokens (NBK buckets x GP padded bucket slots) per select/gather program
REST_BLOCK = 32  # always-kept rows per rest program
EXPAND_BLOCK_L = 64  # output rows per expand program
EXPAND_NUM_WARPS = 4


def select_gather_meta(bucket_size: int, head_dim: int) -> dict:
    """GP (bucket padded to a power of two), NBK (buckets per program), BLOCK_D and num_warps of
    ``_select_gather_kernel``: 8 warps once a program's [NBK, GP, BLOCK_D] block reaches 8192
    elements (the pairwise ranking holds NBK * GP * GP more in registers)."""
    gp = triton.next_power_of_2(bucket_size)
    nbk = max(1, TOKENS_PER_PROGRAM // gp)
    block_d = triton.next_power_of_2(head_dim)
    return dict(GP=gp, NBK=nbk, BLOCK_D=block_d, num_warps=8 if gp * nbk * block_d >= 8192 else 4)
