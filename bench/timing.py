"""CUDA-event timing shared by the benches (not used at run time)."""
from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() on the current CUDA stream, in ms, after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
