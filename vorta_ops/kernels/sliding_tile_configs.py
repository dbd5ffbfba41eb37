"""Autotune table of the sliding-tile kernel (``sliding_tile_kernel._sta_fwd_kernel``): a short
product of block shapes and pipeline depths, pruned by ``_prune_configs`` (a query block inside one
tile, shared memory that fits the device), keyed on the sequence lengths, head dim and tile.
"""
from __future__ import annotations

import torch
import triton

from .sliding_tile_kernel import _sta_fwd_kernel

__all__ = ["INTERPRET_CONFIG", "TUNE_KEY", "sta_fwd_tuned"]


def _autotune_configs():
    # (BLOCK_M, BLOCK_N, warps): 128-row query blocks on two warpgroups, 64-row ones on one.
    # Left out after offline sm_90 compiles (triton 3.6): BLOCK_M=128 on 4 warps and (64, 128) on
    # 4 warps spill, BLOCK_M=64 on 8 warps splits rows over warpgroups. Stages: 3 prefetches K/V
    # one block ahead, 5 two (the index load takes the other stages); 2 would leave the index load
    # unpipelined and 4 is 3 with more buffers.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w in ((128, 128, 8), (128, 64, 8), (64, 64, 4))
        for s in (3, 5)
    ]


def _smem_limit(t: torch.Tensor) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - best effort
        return 227 * 1024


def _smem_bytes(bm: int, bn: int, stages: int, d: int, elt: int) -> int:
    """Shared memory of one program: Q, the K/V ring and the index ring. K/V sit behind the index
    load (an indirect load), so Triton prefetches them ``(stages - 1) // 2`` blocks ahead and the
    ring holds that + 1 blocks; fp32 inputs (3xTF32 dots) keep a second copy of Q. Matches offline
    sm_90 compiles (triton 3.6) to within 1 KiB."""
    ring = max((stages - 1) // 2, 1) + 1
    q_tiles = 2 if elt == 4 else 1
    return elt * d * (q_tiles * bm + 2 * ring * bn) + 4 * bn * ring + 1024


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_M divides layout.block (a query block stays inside one tile) and
    whose shared memory fits the device."""
    args = {**named_args, **kwargs}
    blk = int(args["LAYOUT_BLOCK"])
    d = int(args["HEAD_DIM"])
    q = args.get("Q")
    elt = q.element_size() if isinstance(q, torch.Tensor) else 2
    limit = _smem_limit(q) if isinstance(q, torch.Tensor) and q.is_cuda else 227 * 1024
    fp8 = bool(args.get("FP8"))
    keep = [
        c for c in configs
        if blk % c.kwargs["BLOCK_M"] == 0 and not (fp8 and c.kwargs["BLOCK_N"] < 32)
        and _smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, d, elt) <= limit
    ]
    if not keep:  # e.g. layout.block of 16/32, or a small-smem GPU: the smallest config that fits
        b = max(x for x in (16, 32, 64) if blk % x == 0)
        keep = [triton.Config({"BLOCK_M": b, "BLOCK_N": b}, num_warps=4, num_stages=3)]
    return keep


TUNE_KEY = ["TILED_LEN", "SEQ_LEN", "HEAD_DIM", "LAYOUT_BLOCK", "TT", "TH", "TW", "HAS_KV", "FP8"]


def _make_tuned():
    kw = dict(configs=_autotune_configs(), key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
    try:  # keep tuning results on disk across processes (newer triton)
        return triton.autotune(**kw, cache_results=True)(_sta_fwd_kernel)
    except TypeError:
        return triton.autotune(**kw)(_sta_fwd_kernel)


sta_fwd_tuned = _make_tuned()

# TRITON_INTERPRET=1: one small fixed config, no autotuning (the interpreter is slow)
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
