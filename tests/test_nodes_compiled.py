"""VORTA's attention override under torch.compile (nodes/compiled.py), on a small stand-in for a
ComfyUI video model (no ComfyUI needed): the model's forward runs through the DIFFUSION_MODEL
wrapper, its blocks through "dit" block patches, its attention through a wrapper that hands calls
to transformer_options' optimized_attention_override, as ComfyUI's wrap_attn does. The real
TorchCompileModel run is in tests/test_comfyui_graphs.py.

Compiled over several steps whose routing tables differ: the result equals the eager run, the
summary counts equal the eager counts, the only graph break is the per-model-call set-up, each
attention call is one vorta::comfy_attention node, and nothing recompiles.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from nodes import patch as P
from nodes.models import inspect_model
from nodes.providers import SharedOnCopy
from vorta_ops.router import CORESET, FULL, SLIDING

HEADS, DIM, BLOCKS = 2, 32, 3
GRID = (2, 4, 6)
# one table per step: the routing changes every step (a training-free or file router does)
TABLES = {
    0: [[SLIDING, CORESET], [CORESET, SLIDING], [FULL, SLIDING]],
    1: [[CORESET, CORESET], [SLIDING, FULL], [SLIDING, SLIDING]],
    2: [[FULL, FULL], [SLIDING, CORESET], [CORESET, FULL]],
}


def comfy_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch, reduced: [B, L, H*D] in and out."""
    B = q.shape[0]
    if not skip_reshape:
        q, k, v = (x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(B, -1, heads * out.shape[-1])


def optimized_attention(q, k, v, heads, **kwargs):
    """As ComfyUI's wrap_attn: the override, when transformer_options has one, gets the call."""
    to = kwargs.get("transformer_options")
    if "_inside_attn_wrapper" not in kwargs and to is not None and "optimized_attention_override" in to:
        return to["optimized_attention_override"](comfy_attention, q, k, v, heads, _inside_attn_wrapper=True, **kwargs)
    return comfy_attention(q, k, v, heads, **kwargs)


class Block(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.qkv = torch.nn.Parameter(torch.randn(DIM, 3 * DIM, generator=g) / DIM ** 0.5)
        self.kv_ctx = torch.nn.Parameter(torch.randn(DIM, 2 * DIM, generator=g) / DIM ** 0.5)

    def forward(self, x, context, transformer_options):
        q, k, v = (x @ self.qkv).chunk(3, -1)
        x = x + optimized_attention(q, k, v, heads=HEADS, transformer_options=transformer_options)
        kc, vc = (context @ self.kv_ctx).chunk(2, -1)  # cross-attention: not routed
        return x + optimized_attention(x, kc, vc, heads=HEADS, transformer_options=transformer_options)


class WanModel(torch.nn.Module):  # ComfyUI's class name: what detection keys on
    def __init__(self):
        super().__init__()
        self.dim, self.num_heads, self.freq_dim, self.patch_size = DIM, HEADS, 16, (1, 2, 2)
        self.blocks = torch.nn.ModuleList(Block(i) for i in range(BLOCKS))
        self.time_embedding = torch.nn.Linear(16, DIM)
        self.wrappers = []

    def forward(self, x, timestep, context, transformer_options):
        fn = self._forward
        for w in reversed(self.wrappers):  # ComfyUI's WrapperExecutor, reduced
            fn = functools.partial(w, _Executor(fn, self))
        return fn(x, timestep, context, transformer_options=transformer_options)

    def _forward(self, x, timestep, context, transformer_options={}):
        B, C, T, Hl, Wl = x.shape
        h = x.permute(0, 2, 3, 4, 1).reshape(B, -1, C)[:, :: 4].repeat(1, 1, DIM // C)  # "patch embedding": 48 tokens
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            if ("double_block", i) in replace:
                def original(args, block=block):
                    return {"img": block(args["img"], args["txt"], args["transformer_options"])}
                h = replace[("double_block", i)]({"img": h, "txt": context, "transformer_options": transformer_options},
                                                 {"original_block": original})["img"]
            else:
                h = block(h, context, transformer_options)
        return h


class _Executor:
    def __init__(self, inner, obj):
        self.inner, self.class_obj = inner, obj

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class StepTables(SharedOnCopy):
    """A router whose table changes with the step (keyed by timestep)."""

    kind, blocks, heads = "test", BLOCKS, HEADS

    def describe(self):
        return "per-step test router"

    def check_fits(self, spec):
        pass

    def table(self, ctx):
        return torch.tensor(TABLES[round(3 * (1 - ctx.timestep / 1000))], dtype=torch.int8)

    def probabilities(self, ctx):
        return None


class Patched:
    """Apply's clone, sampled the way ComfyUI's sampler calls it (OUTER_SAMPLE run, then model calls)."""

    def __init__(self, dm):
        from tests.test_nodes_patch import FakePatcher

        self.patcher, self.state = P.apply_vorta(FakePatcher(dm), StepTables(),
                                                 P.VortaOptions(tile="1,2,2", window=(1, 3, 1), bucket=(2, 2, 2)))
        self.to = self.patcher.model_options["transformer_options"]
        dm.wrappers = [w for fns in self.patcher.wrappers.get(P.DIFFUSION_MODEL, {}).values() for w in fns]

    def sample(self, forward, steps=3, seed=0, device="cpu"):
        run = self.state.new_run()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 8, 2, 8, 12, generator=g).to(device)
        ctx = torch.randn(2, 5, DIM, generator=g).to(device)
        sample = torch.tensor([1.0 - s / steps for s in range(steps + 1)])
        outs = []
        for s in range(steps):
            to = dict(self.to, **{P.STATE_KEY: run, "sigmas": sample[s:s + 1], "sample_sigmas": sample})
            outs.append(forward(x, torch.full((2,), float(sample[s]) * 1000, device=device), ctx, to))
        setattr(self.state, P.STASH_ATTR, None)  # as the OUTER_SAMPLE wrapper does when the run ends
        return outs, run


class CountingBackend:
    """Counts graphs and vorta::comfy_attention nodes, then hands the graph to `inner` (aot_eager
    on the CPU; inductor on a GPU, as TorchCompileModel uses it)."""

    def __init__(self, inner):
        self.graphs = 0
        self.op_nodes = 0
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.op_nodes += sum(1 for n in gm.graph.nodes if "comfy_attention" in str(n.target))
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_routes_like_eager_without_breaks_or_recompiles(device):
    """On a GPU the branches run the Triton kernels and the graph goes through inductor."""
    from torch._dynamo.utils import counters

    dm = WanModel().eval().to(device)
    assert inspect_model(dm).blocks == BLOCKS
    patched = Patched(dm)
    with torch.no_grad():
        eager, eager_run = patched.sample(dm, device=device)
        torch._dynamo.reset()
        counters.clear()
        backend = CountingBackend("inductor" if device == "cuda" else "aot_eager")
        compiled = torch.compile(dm, backend=backend)
        got, run = patched.sample(compiled, device=device)
    breaks = dict(counters["graph_break"])
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    torch._dynamo.reset()
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the steps really routed differently, and compiled counted what eager counted
    assert [r.table.tolist() for r in run.steps.values()] == [TABLES[s] for s in range(3)]
    assert {s: r.head_calls for s, r in run.steps.items()} == {s: r.head_calls for s, r in eager_run.steps.items()}
    assert run.head_calls()["sliding_tile"] > 0 and run.head_calls()["coreset"] > 0
    # one break: the model call's set-up (reads the step); every attention call is one op node
    assert len(breaks) == 1 and all("_setup_call" in k or "disable" in k for k in breaks), breaks
    assert recompiles == 0, dict(counters["recompiles"])
    assert backend.op_nodes == 2 * BLOCKS, backend.op_nodes
    assert backend.graphs == 1, backend.graphs  # the blocks after the set-up, traced once for all steps
