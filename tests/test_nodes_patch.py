"""The patch logic against small fakes (no ComfyUI needed)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from nodes import patch as P
from nodes.models import CallLayout, UnsupportedModelError, check_router_fits, inspect_model, token_grid
from vorta_ops.dispatch import routed_attention
from vorta_ops.plan import RoutingPlan
from vorta_ops.router import CORESET, FULL, SLIDING, RouterSet


class WanModel(torch.nn.Module):  # same class name as ComfyUI's, which is what detection keys on
    def __init__(self, dim=256, heads=2, blocks=2, freq_dim=32):
        super().__init__()
        self.dim, self.num_heads, self.freq_dim, self.patch_size = dim, heads, freq_dim, (1, 2, 2)
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))
        self.time_embedding = torch.nn.Linear(freq_dim, dim)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        return x


class FluxLike(torch.nn.Module):
    patch_size = (2, 2)


class FakeModel:
    def __init__(self, dm):
        self.diffusion_model = dm


class FakePatcher:
    def __init__(self, dm, model_options=None):
        self.model = FakeModel(dm)
        self.model_options = model_options or {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        c = FakePatcher(self.model.diffusion_model, copy.deepcopy(self.model_options))
        c.wrappers = copy.deepcopy(self.wrappers)
        return c

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def set_model_patch_replace(self, patch, name, block_name, number):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault(name, {})[(block_name, number)] = patch


def router_for(table, embed=256):
    blocks, heads = len(table), len(table[0])
    b = torch.zeros(blocks, heads, 3)
    for i, row in enumerate(table):
        for j, br in enumerate(row):
            b[i, j, br] = 10.0
    return RouterSet("wan", torch.zeros(blocks, heads * 3, embed), b.reshape(blocks, heads * 3))


def test_apply_patches_a_clone_and_leaves_the_model_as_it_was():
    def earlier(func, *a, **k):
        return func(*a, **k)

    m = FakePatcher(WanModel(), {"transformer_options": {"optimized_attention_override": earlier}})
    before = copy.deepcopy(m.model_options)
    patched, state = P.apply_vorta(m, router_for([[1, 2], [2, 1]]), P.VortaOptions())
    assert m.model_options["transformer_options"].keys() == before["transformer_options"].keys()
    assert m.wrappers == {}
    to = patched.model_options["transformer_options"]
    assert to[P.STATE_KEY] is state and state.prev_override is earlier
    assert to[P.OVERRIDE_KEY].vorta_state is state
    assert set(patched.wrappers) == {P.OUTER_SAMPLE, P.DIFFUSION_MODEL}
    assert set(to["patches_replace"]["dit"]) == {("double_block", 0), ("double_block", 1)}
    # applying VORTA twice chains to the original override, not to the first VORTA
    again, s2 = P.apply_vorta(patched, router_for([[0, 0], [0, 0]]), P.VortaOptions())
    assert s2.prev_override is earlier


def test_unsupported_model_and_mismatched_router_fail_before_any_change():
    with pytest.raises(UnsupportedModelError, match=r"does not support FluxLike models; supported: Wan 2.1 / 2.2"):
        P.apply_vorta(FakePatcher(FluxLike()), router_for([[0]]), P.VortaOptions())
    m = FakePatcher(WanModel())
    with pytest.raises(ValueError, match=r"blocks: router 3, model 2; heads: router 1, model 2"):
        P.apply_vorta(m, router_for([[0], [0], [0]]), P.VortaOptions())
    with pytest.raises(ValueError, match=r"embed dim: router 128, model 256"):
        check_router_fits(router_for([[0, 0], [0, 0]], embed=128), inspect_model(WanModel()))
    with pytest.raises(ValueError, match=r"dense blocks \[5\] out of range: the model has blocks 0..1"):
        P.apply_vorta(m, router_for([[0, 0], [0, 0]]), P.VortaOptions(dense_blocks=frozenset({5})))
    assert m.model_options == {"transformer_options": {}} and m.wrappers == {}


@pytest.mark.parametrize(
    "fn,arg,msg",
    [
        (P.parse_triple, "3,3", r"window must be three positive integers like '3,3,3', got '3,3'"),
        (P.parse_triple, "a,b,c", "three positive integers"),
        (P.parse_blocks, "1,x", "dense blocks must be block numbers"),
    ],
)
def test_option_parsing_errors(fn, arg, msg):
    with pytest.raises(ValueError, match=msg):
        fn(arg, "window") if fn is P.parse_triple else fn(arg)


def test_options_validate_and_dense_overrides():
    assert P.parse_blocks("0, 2-4") == {0, 2, 3, 4}
    with pytest.raises(ValueError, match="window must be odd"):
        P.VortaOptions(window=(2, 3, 3))
    with pytest.raises(ValueError, match=r"dense_start must be a fraction"):
        P.VortaOptions(dense_start=1.5)
    with pytest.raises(ValueError, match="tile must be three"):
        P.VortaOptions(tile="big")
    spec = inspect_model(WanModel())
    st = P.VortaState(router_for([[1, 2], [2, 1]]), spec, P.VortaOptions(dense_start=0.2, dense_end=0.1, dense_blocks=frozenset({1})))
    table = torch.tensor([[1, 2], [2, 1]], dtype=torch.int8)
    got = [st.apply_overrides(table, s / 10) for s in range(10)]  # sampling percent of each step
    for s in (0, 1, 9):  # first 20%, last 10%
        assert torch.all(got[s] == FULL)
    for s in range(2, 9):
        assert got[s].tolist() == [[1, 2], [0, 0]]
    assert P.VortaOptions(tile="auto").tile_for(spec, (21, 30, 52)) == (7, 10, 9)
    assert P.VortaOptions(tile="4,8,8").tile_for(spec, (1, 1, 1)) == (4, 8, 8)


def _run_with_forward(table, grid=(2, 4, 6), n_prefix=0, rest="before"):
    spec = inspect_model(WanModel())
    state = P.VortaState(router_for(table), spec, P.VortaOptions(tile="1,2,2", window=(1, 3, 1), bucket=(2, 2, 2)))
    run = state.new_run()
    t = torch.tensor(table, dtype=torch.int8)
    cfg = state.options.routed_config(spec, grid)
    run.steps[0] = P.StepRecord(0, 1.0, 1000.0, t)
    run.last_plan = plan = RoutingPlan(t, grid, cfg)
    to = {P.STATE_KEY: run, P.FORWARD_KEY: P.ForwardInfo(plan, CallLayout(n_prefix, 0, rest), 0)}
    return state, run, to, cfg


def test_override_routes_self_attention_and_passes_the_rest():
    state, run, to, cfg = _run_with_forward([[CORESET, SLIDING], [FULL, SLIDING]])
    seen = []

    def backend(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        seen.append((tuple(q.shape), skip_reshape))
        if not skip_reshape:
            B, L, _ = q.shape
            q, k, v = (x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, 2 * 16, generator=g) for _ in range(3))
    heads4 = lambda x: x.view(2, 48, 2, 16).transpose(1, 2)
    for block, table_row in ((0, [CORESET, SLIDING]), (1, [FULL, SLIDING])):
        to[P.BLOCK_KEY] = block
        out = P.vorta_attention_override(state, backend, q, k, v, heads=2, transformer_options=to)
        ref = routed_attention(heads4(q), heads4(k), heads4(v), table_row, (2, 4, 6), cfg,
                               full_fn=lambda a, b, c: F.scaled_dot_product_attention(a, b, c))
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 48, 32))
    assert seen == [((2, 1, 48, 16), True)]  # block 1's full head went to the backend, alone
    # cross-attention (other key length) goes to the backend untouched
    kc = torch.randn(2, 8, 32)
    seen.clear()
    P.vorta_attention_override(state, backend, q, kc, kc, heads=2, transformer_options=to)
    assert seen == [((2, 48, 32), False)]
    assert run.steps[0].head_calls == {"full": 1, "coreset": 1, "sliding_tile": 2}
    assert run.steps[0].calls == 2


def test_only_calls_inside_our_block_patches_are_video_attention(caplog):
    """A self-attention call outside a transformer block (HunyuanVideo's text refiner, even with
    more tokens than the video and a stale block_index) is passed on, not routed, not warned about."""
    state, run, to, _ = _run_with_forward([[CORESET, CORESET], [CORESET, CORESET]])
    to["block_index"] = 1  # ComfyUI's own key: not where the call comes from
    calls = []
    q = torch.randn(1, 60, 32)  # more tokens than the 48-token video
    with caplog.at_level(logging.WARNING, logger="vorta"):
        P.vorta_attention_override(state, lambda *a, **k: calls.append(1) or q, q, q, q, heads=2, transformer_options=to)
    assert calls == [1] and run.steps[0].calls == 0 and not caplog.records
    to[P.BLOCK_KEY] = 0  # the same call inside block 0: routed (12 extra tokens, attended densely)
    P.vorta_attention_override(state, lambda *a, **k: calls.append(1) or q, q, q, q, heads=2, transformer_options=to)
    assert calls == [1] and run.steps[0].head_calls["coreset"] == 2
    # a second self-attention-shaped call in the same block (e.g. Wan cross-attention on 512 text
    # tokens when the video has 512 tokens too) is not the block's self-attention: passed on
    P.vorta_attention_override(state, lambda *a, **k: calls.append(1) or q, q, q, q, heads=2, transformer_options=to)
    assert calls == [1, 1] and run.steps[0].calls == 1


def test_all_full_blocks_count_in_the_summary():
    """Every video self-attention call counts: all-full blocks (and dense steps) are full head-calls."""
    state, run, to, _ = _run_with_forward([[FULL, FULL], [CORESET, SLIDING]])
    q = torch.randn(1, 48, 32)
    for block in (0, 1):
        to[P.BLOCK_KEY] = block
        P.vorta_attention_override(state, lambda *a, **k: q, q, q, q, heads=2, transformer_options=to)
    assert run.head_calls() == {"full": 2, "coreset": 1, "sliding_tile": 1}
    assert "full 50.0%, coreset 25.0%, sliding_tile 25.0%" in run.summary()
    share = P._relative_work(run, run.head_calls())
    sliding = run.last_plan.relative_work() * 4 - 2 - 0.25  # the plan's own cost of the sliding head
    assert share == pytest.approx((2 + 0.25 + sliding) / 4)


def test_state_survives_deep_copies_of_model_options():
    """ComfyUI 0.3.64 clones deep-copy model_options: the copy must still route (issue: a patch
    node after Apply turned routing off)."""
    m = FakePatcher(WanModel())
    patched, state = P.apply_vorta(m, router_for([[1, 2], [2, 1]]), P.VortaOptions())
    after = patched.clone().clone()  # e.g. ModelSamplingSD3, then a LoRA loader
    to = after.model_options["transformer_options"]
    assert to[P.STATE_KEY] is state and to[P.OVERRIDE_KEY].vorta_state is state
    run = state.new_run()
    assert copy.deepcopy({"r": run})["r"] is run


def test_an_override_that_chains_back_to_vorta_does_not_loop():
    """A node after Apply whose override chains to the one it found (ours): VORTA, re-installed
    first, hands it non-routed calls; its call back to VORTA goes to the backend."""
    state, run, to, _ = _run_with_forward([[CORESET, CORESET], [CORESET, CORESET]])
    ours = P._bound_override(state)
    seen = []

    def theirs(func, *a, **k):
        seen.append("theirs")
        return ours(func, *a, **k)

    run.prev_override = theirs
    backend_calls = []
    q, kc = torch.randn(1, 48, 32), torch.randn(1, 8, 32)
    out = ours(lambda *a, **k: backend_calls.append(1) or q, q, kc, kc, heads=2, transformer_options=to)
    assert out is q and seen == ["theirs"] and backend_calls == [1]


def test_kernel_error_falls_back_to_dense_and_logs_once(caplog, monkeypatch):
    state, run, to, _ = _run_with_forward([[CORESET, SLIDING], [CORESET, SLIDING]])
    to[P.BLOCK_KEY] = 0

    def boom(*a, **k):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(RoutingPlan, "run", boom)
    q = torch.randn(1, 48, 32)
    dense_out = torch.full_like(q, 7.0)
    with caplog.at_level(logging.WARNING, logger="vorta"):
        for _ in range(3):
            to[P.BLOCK_KEY] = 0  # each call as the first of its block
            out = P.vorta_attention_override(state, lambda *a, **k: dense_out, q, q, q, heads=2, transformer_options=to)
            assert out is dense_out
    assert sum("routed attention failed (RuntimeError: no kernel)" in r.message for r in caplog.records) == 1
    assert run.steps[0].fallbacks == 3
    assert "3 calls fell back to dense" in run.summary()


def test_key_masks_and_grid():
    assert P._key_mask(None, 2, 5) is None
    add = torch.zeros(1, 1, 5)
    add[..., 3:] = -torch.finfo(torch.float32).max
    assert P._key_mask(add, 2, 5).tolist() == [[True, True, True, False, False]] * 2
    assert P._key_mask(torch.zeros(5, 5), 1, 5) == "unsupported"
    spec = inspect_model(WanModel())
    assert token_grid(spec, (1, 16, 3, 9, 13)) == (3, 5, 7)  # padded to the patch


def test_diffusion_wrapper_sets_grid_step_and_table_once_per_step():
    dm = WanModel()
    m = FakePatcher(dm)
    patched, state = P.apply_vorta(m, router_for([[1, 2], [2, 1]]), P.VortaOptions(tile="1,2,2"))
    run = state.new_run()
    sample_sigmas = torch.tensor([1.0, 0.5, 0.0])
    seen = []

    class Exec:
        class_obj = dm

        def __call__(self, x, timestep, context, clip_fea, tdc, to):
            seen.append(to[P.FORWARD_KEY])
            return x

    for sigma in (1.0, 1.0, 0.5):  # e.g. cond and uncond as two calls, then the next step
        to = {P.STATE_KEY: run, "sigmas": torch.tensor([sigma]), "sample_sigmas": sample_sigmas}
        x = torch.zeros(2, 16, 3, 8, 12)
        P.diffusion_model_wrapper(Exec(), x, torch.tensor([sigma * 1000] * 2), None, None, None, to)
        assert P.FORWARD_KEY not in to
    assert [f.step for f in seen] == [0, 0, 1]
    assert seen[0].grid == (3, 4, 6) and seen[0].n_grid == 72
    assert seen[0].table.tolist() == [[1, 2], [2, 1]]
    assert len(run.tables) == 2 and sorted(run.steps) == [0, 1]


def test_routing_setup_failure_runs_dense_and_says_so(caplog):
    dm = WanModel()
    patched, state = P.apply_vorta(FakePatcher(dm), router_for([[1, 2], [2, 1]]), P.VortaOptions())
    run = state.new_run()

    def broken_table(*a, **k):
        raise RuntimeError("no embedding")

    state.provider.table = broken_table
    seen = []

    class Exec:
        class_obj = dm

        def __call__(self, x, timestep, context, clip_fea, tdc, to):
            seen.append(P.FORWARD_KEY in to)
            return x

    to = {P.STATE_KEY: run, "sigmas": torch.tensor([1.0]), "sample_sigmas": torch.tensor([1.0, 0.0])}
    with caplog.at_level(logging.WARNING, logger="vorta"):
        for _ in range(2):
            P.diffusion_model_wrapper(Exec(), torch.zeros(1, 16, 2, 4, 4), torch.tensor([1000.0]), None, None, None, to)
    assert seen == [False, False]  # the model ran, unrouted
    assert sum("could not set up routing" in r.message for r in caplog.records) == 1


def test_a_model_called_outside_a_sampling_run_says_it_runs_dense(caplog):
    dm = WanModel()
    _, state = P.apply_vorta(FakePatcher(dm), router_for([[1, 2], [2, 1]]), P.VortaOptions())

    class Exec:
        class_obj = dm

        def __call__(self, *a, **k):
            return "ran"

    to = {P.STATE_KEY: state, "sigmas": torch.tensor([1.0])}
    with caplog.at_level(logging.WARNING, logger="vorta"):
        for _ in range(3):
            assert P.diffusion_model_wrapper(Exec(), torch.zeros(1, 16, 2, 4, 4), torch.tensor([1000.0]), None, None, None, to) == "ran"
    assert sum("outside a ComfyUI sampling run" in r.message for r in caplog.records) == 1


def test_key_mask_made_once_per_mask_object_and_again_after_a_change():
    mask = torch.zeros(1, 1, 1, 6)
    mask[..., 4:] = -torch.finfo(torch.float32).max
    first = P._key_mask(mask, 2, 6)
    assert first.tolist() == [[True] * 4 + [False] * 2] * 2
    assert P._key_mask(mask, 2, 6) is first  # every block of a model call: the same object
    mask[..., 3] = -torch.finfo(torch.float32).max  # changed in place: made again
    again = P._key_mask(mask, 2, 6)
    assert again is not first and again.tolist() == [[True] * 3 + [False] * 3] * 2
    assert P._key_mask(mask.clone(), 2, 6) is not again  # another object: its own


def test_precision_fp8_where_it_cannot_run_says_so_once_and_routes_in_bf16(caplog, monkeypatch):
    """precision fp8 on a device without FP8 tensor cores (here the CPU): one warning naming what it
    needs, and every step routes with the bf16 configuration (same plan config as precision bf16)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="precision must be one of bf16, fp8, got 'fp4'"):
        P.VortaOptions(precision="fp4")
    assert P.build_options("official", "3,3,3", "2,3,2", 0.5, "auto", 0, 0, "", 0.3, "fp8").precision == "fp8"
    dm = WanModel()
    plans = {}
    for precision in ("fp8", "bf16"):
        _, state = P.apply_vorta(FakePatcher(dm), router_for([[1, 2], [2, 1]]), P.VortaOptions(tile="1,2,2", precision=precision))
        run = state.new_run()
        seen = []

        class Exec:
            class_obj = dm

            def __call__(self, x, timestep, context, clip_fea, tdc, to):
                seen.append(to[P.FORWARD_KEY].plan.cfg)
                return x

        with caplog.at_level(logging.WARNING, logger="vorta"):
            for sigma in (1.0, 0.5):
                to = {P.STATE_KEY: run, "sigmas": torch.tensor([sigma]), "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
                P.diffusion_model_wrapper(Exec(), torch.zeros(1, 16, 3, 8, 12), torch.tensor([sigma * 1000]), None, None,
                                          None, to)
        plans[precision] = seen
    warned = [r.message for r in caplog.records if "precision fp8" in r.message]
    assert len(warned) == 1 and "need" in warned[0], warned  # what it needs: an sm_89+ GPU, or triton
    assert "run in bf16 instead" in warned[0], warned
    assert plans["fp8"] == plans["bf16"] and all(c.precision == "bf16" for c in plans["fp8"])


def test_sample_sigmas_are_read_back_once_per_tensor_and_version():
    """_step_of and _schedule_of ask for the schedule on every model call; its host copy is made once
    per tensor (again after an in-place change), not once per call."""
    sample = torch.tensor([1.0, 0.5, 0.25, 0.0])
    first = P._host_sigmas(sample)
    assert P._host_sigmas(sample) is first and first == (1.0, 0.5, 0.25, 0.0)
    assert P._step_of({"sigmas": torch.tensor([0.5]), "sample_sigmas": sample})[:2] == (1, 3)
    sample[1] = 0.75
    assert P._host_sigmas(sample) == (1.0, 0.75, 0.25, 0.0)
    assert P._step_of({"sigmas": torch.tensor([0.0]), "sample_sigmas": sample})[:2] == (2, 3)  # last step index is n - 1


def test_masks_and_schedules_made_under_inference_mode_are_cached_too():
    """ComfyUI samples under torch.inference_mode: its attention masks and sigmas are inference
    tensors, which have no version counter. The caches keyed on them still work (by object): found
    by CI, where every sampling run fell back to dense with "Inference tensors do not track version
    counter" once the sigmas were cached."""
    from vorta_ops._backends import tensor_version

    with torch.inference_mode():
        sample = torch.tensor([1.0, 0.5, 0.0])
        add = torch.zeros(1, 1, 5)
        add[..., 3:] = -torch.finfo(torch.float32).max
    assert tensor_version(sample) is None and tensor_version(torch.zeros(1)) == 0
    first = P._host_sigmas(sample)
    assert first == (1.0, 0.5, 0.0) and P._host_sigmas(sample) is first
    assert P._step_of({"sigmas": torch.tensor([0.5]), "sample_sigmas": sample})[:2] == (1, 2)
    keep = P._key_mask(add, 2, 5)
    assert keep.tolist() == [[True, True, True, False, False]] * 2 and P._key_mask(add, 2, 5) is keep
