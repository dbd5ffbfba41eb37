"""Host work per routed attention call, GPU idle between kernels, and routing set-up per step
(GPU only; a benchmark, not a test).

- host_us_per_call: the CPU time one call costs. The GPU is first given a long queue of work (a
  chain of large matmuls), then N calls are issued back to back; since their kernels only queue
  behind that work, the wall time until the N-th call returns to Python, over N, is the host
  (Python + launch) work per call, with no waiting on the GPU in it.
- idle_pct: N calls back to back on an idle GPU; the profiler's summed kernel time against the wall
  time: the share of the wall time the GPU had nothing to run (launch gaps the host causes).
- setup_us_per_step: what each denoising step pays once: the router's table and the RoutingPlan.

Three ways to call the same routed layer: "dispatch" (routed_attention: head groups made on every
call, as the override did before the plan), "plan" (RoutingPlan.run with groups made once per
step) and "override" (the whole ComfyUI attention override as a model call reaches it: block
lookup, token layout, masks, plan.run, record keeping). A fourth row replays the plan's kernels
from a CUDA graph: no host work at all, so its idle share is the floor set by the GPU itself.

    python -m bench.overhead            # writes bench/results/overhead-<gpu>.{json,md}
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from bench.attention import branch_mix, save_results
from nodes import patch as P
from nodes.models import CallLayout, inspect_model
from vorta_ops.coreset import CoresetConfig
from vorta_ops.dispatch import RoutedConfig, routed_attention
from vorta_ops.plan import RoutingPlan
from vorta_ops.router import RouterSet
from vorta_ops.sliding_tile import WAN_TILE, SlidingTileConfig

PROFILE = False
SHAPES = {  # name: (grid, heads, blocks, embed dim)
    "wan1.3b-480p": ((21, 30, 52), 12, 30, 1536),
    "wan14b-720p": ((20, 45, 80), 40, 40, 5120),
}


class WanModel(torch.nn.Module):
    """Stand-in with the attributes model detection reads (no weights that matter)."""

    def __init__(self, dim, heads, blocks, freq_dim=256):
        super().__init__()
        self.dim, self.num_heads, self.freq_dim, self.patch_size = dim, heads, freq_dim, (1, 2, 2)
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))
        self.time_embedding = torch.nn.Linear(freq_dim, dim)


def dense_backend(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    """ComfyUI's attention function signature, on SDPA."""
    if not skip_reshape:
        B, L, _ = q.shape
        q, k, v = (x.view(B, L, heads, -1).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])


def busy_gpu(ms: float, device) -> None:
    """Queue about `ms` of GPU work and return at once: a few long matmuls (few launches, so the
    launch queue never fills and throttles the calls measured after them)."""
    a = torch.randn(16384, 16384, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    b = a @ a
    torch.cuda.synchronize()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(min(int(ms / one) + 1, 100)):
        b = a @ b


def host_us(fn, n: int, device, repeats: int = 7) -> float:
    """Median over `repeats` rounds of n calls (host timings vary from round to round)."""
    return statistics.median(_host_round(fn, n, device) for _ in range(repeats))


def _host_round(fn, n: int, device) -> float:
    fn()
    torch.cuda.synchronize()
    busy_gpu(400.0, device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    done = torch.cuda.Event()
    done.record()
    if done.query():  # the queue ran dry: the calls may have waited for their kernels
        raise RuntimeError("the GPU finished before the calls were issued: raise busy_gpu's time")
    torch.cuda.synchronize()
    return host


def idle_pct(fn, n: int) -> tuple[float, float]:
    """(idle %, wall ms per call) over n back-to-back calls on an idle GPU."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy_us = sum(e.self_device_time_total for e in prof.key_averages())
    return max(0.0, 100.0 * (1.0 - busy_us / (wall * 1e6))), wall / n * 1e3


def run_shape(name: str, n: int) -> list[dict]:
    grid, H, blocks, dim = SHAPES[name]
    dev = torch.device("cuda")
    L, D = math.prod(grid), 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, L, H * D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    heads4 = lambda x: x.view(1, L, H, D).transpose(1, 2)
    qh, kh, vh = heads4(q), heads4(k), heads4(v)
    cfg = RoutedConfig(SlidingTileConfig(WAN_TILE, (3, 3, 3)), CoresetConfig((2, 3, 2), 0.5, "q"))
    row = branch_mix(H, 0.0, scattered=True)  # half sliding tile, half core-set, heads scattered
    table = torch.tensor([row] * blocks, dtype=torch.int8)

    dm = WanModel(dim, H, blocks).to(dev, torch.bfloat16)
    spec = inspect_model(dm)
    router = RouterSet("wan", torch.zeros(blocks, H * 3, dim), torch.zeros(blocks, H * 3))
    state = P.VortaState(router, spec, P.VortaOptions(tile="official"))
    run = state.new_run()
    plan = RoutingPlan.for_step(run.plans, table, grid, cfg)
    run.steps[0] = P.StepRecord(0, 1.0, 1000.0, table)
    to = {P.STATE_KEY: run, P.FORWARD_KEY: P.ForwardInfo(plan, CallLayout(0, 0, "none"), 0)}

    def dispatch():
        routed_attention(qh, kh, vh, row, grid, cfg)

    def via_plan():
        plan.run(3, qh, kh, vh)

    def override():
        to[P.BLOCK_KEY] = 3
        P.vorta_attention_override(state, dense_backend, q, k, v, heads=H, transformer_options=to)

    def setup():  # once per step: the router's table and the plan (a new table each time: no cache hit)
        t = state.table_for(dm, 500.0, torch.bfloat16, dev)
        RoutingPlan.for_step({}, t, grid, cfg).groups

    if PROFILE:  # where the host time of one override call goes (cProfile, GPU kept busy)
        import cProfile
        import pstats

        override()
        torch.cuda.synchronize()
        busy_gpu(400.0, dev)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            override()
        pr.disable()
        torch.cuda.synchronize()
        print(f"--- {name}: cProfile of {n} override calls (tottime) ---")
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    # the same call's kernels replayed from a CUDA graph: no host work between them, so its idle
    # share is the GPU's own gap between back-to-back kernels (the floor no host-side work reaches)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            via_plan()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        via_plan()
    rows = []
    for what, fn in (("dispatch", dispatch), ("plan", via_plan), ("override", override), ("cuda graph replay", graph.replay)):
        host = host_us(fn, n, dev)
        idle, wall_ms = idle_pct(fn, n)
        rows.append({"shape": name, "path": what, "grid": list(grid), "heads": H, "batch": 1,
                     "host_us_per_call": round(host, 1), "idle_pct": round(idle, 2), "ms_per_call": round(wall_ms, 3)})
    setup()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        setup()
    torch.cuda.synchronize()
    setup_us = (time.perf_counter() - t0) / 50 * 1e6
    t = state.table_for(dm, 500.0, torch.bfloat16, dev)
    t0 = time.perf_counter()
    for _ in range(50):
        RoutingPlan.for_step({}, t, grid, cfg).groups
    plan_us = (time.perf_counter() - t0) / 50 * 1e6
    step_ms = next(r for r in rows if r["path"] == "override")["ms_per_call"] * blocks  # every block's self-attention, at the override's rate
    rows.append({"shape": name, "path": "router+plan per step", "grid": list(grid), "heads": H, "batch": 1,
                 "setup_us_per_step": round(setup_us, 1), "plan_build_us": round(plan_us, 1), "share_of_attention_step_pct": round(100 * setup_us / 1e3 / step_ms, 3)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the override's host work per shape")
    a = ap.parse_args(argv)
    global PROFILE
    PROFILE = a.profile
    rows = []
    for name in a.shapes.split(","):
        rows += run_shape(name, a.calls)
        for r in rows[-5:]:
            print(r)
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    md = [f"# Host work per routed attention call ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"{platform.python_version()})", "",
          "Half sliding-tile / half core-set heads, scattered; official Wan tiles (5,9,8), window (3,3,3); "
          "core-set bucket (2,3,2) keep 0.5; batch 1, bf16, head dim 128. `bench/overhead.py` says how each column is measured.",
          "", "| shape | path | host µs / call | GPU idle % | ms / call |", "|---|---|---|---|---|"]
    for r in rows:
        if "host_us_per_call" in r:
            md.append(f"| {r['shape']} | {r['path']} | {r['host_us_per_call']} | {r['idle_pct']} | {r['ms_per_call']} |")
    for name in dict.fromkeys(r["shape"] for r in rows):
        by = {r["path"]: r for r in rows if r["shape"] == name and "idle_pct" in r}
        if "cuda graph replay" in by and "override" in by:
            g, o = by["cuda graph replay"], by["override"]
            md += ["", f"{name}: the CUDA graph replay issues the same kernels with no host work between them and leaves "
                       f"the GPU idle {g['idle_pct']}% of the time; through the override it is {o['idle_pct']}%. The idle "
                       f"share is the GPU's own gap between the call's kernels, not waiting for the host, whose "
                       f"{o['host_us_per_call']} µs per call stay hidden behind {o['ms_per_call']} ms of kernels."]
    md += ["", "| shape | router + plan per step (µs) | of which plan building (µs) | share of the step's attention time |",
           "|---|---|---|---|"]
    for r in rows:
        if "setup_us_per_step" in r:
            md.append(f"| {r['shape']} | {r['setup_us_per_step']} | {r['plan_build_us']} | {r['share_of_attention_step_pct']}% |")
    save_results("overhead", rows, meta, md)


if __name__ == "__main__":
    main()
