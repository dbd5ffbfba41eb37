"""The training-free router through the patch (small fakes, no ComfyUI): it measures the first step
of each span of the denoising (that step routes each block by its own errors once measured), routes
the span's other steps by those errors, keeps block 0 and the warm-up dense, and a rerun measures
nothing. Spans are cut at quantiles of the sampler's steps; at 8 steps or fewer every step is its
own span and the last one is dense. Measurements persist on disk under a key of the weights'
fingerprint, grid, sigmas, CFG and branch settings, and can be saved as a router file."""
import pytest
import torch
import torch.nn.functional as F

from nodes import patch as P
from nodes.training_free import TrainingFreeProvider
from test_nodes_patch import FakePatcher, WanModel
from test_profiling import TAU, planted_heads
from vorta_ops.dispatch import routed_attention
from vorta_ops.router import CORESET, FULL, SLIDING

H, D = 4, 32


def dense_backend(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    if not skip_reshape:
        B, L, _ = q.shape
        q, k, v = (x.view(B, L, heads, -1).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


OPTIONS = P.VortaOptions(tile="1,2,2", window=(3, 3, 3), bucket=(2, 2, 2))


SIGMAS10 = tuple(round(1.0 - i / 10, 2) for i in range(11))  # 10 steps of a flow schedule (percent = 1 - sigma)


def sample(provider, sigmas=SIGMAS10, dm=None, options=OPTIONS, weights=None, fail_at=None, uncond=None,
           fingerprint=None, cfg_scale=None):
    """One sampling run of a 2-block fake Wan on the planted heads (latent 4x16x16 -> grid 4x8x8);
    returns the run and the outputs per (step, block). fail_at: (sigma, block) where the model
    call raises (a cancel mid-step). uncond: q, k, v of a second model call per step (cond and
    uncond sent as separate calls)."""
    dm = dm if dm is not None else WanModel(heads=H)
    _, state = P.apply_vorta(FakePatcher(dm), provider, options)
    run = state.new_run(percent_of=lambda s: 1.0 - s)  # a flow schedule: percent = 1 - sigma
    run.weights = weights
    run.fingerprint, run.cfg_scale = fingerprint, cfg_scale
    q, k, v = planted_heads()
    flat = [x.transpose(1, 2).reshape(1, -1, H * D) for x in (q, k, v)]
    outs = {}

    class Exec:
        class_obj = dm

        def __init__(self, qkv=None):
            self.qkv = qkv if qkv is not None else flat

        def __call__(self, x, timestep, context, clip_fea, tdc, to):
            flat = self.qkv
            for block in range(len(dm.blocks)):
                if fail_at == (to["sigmas"].item(), block):
                    raise RuntimeError("cancelled")
                to[P.BLOCK_KEY] = block
                outs[(to["sigmas"].item(), block)] = P.vorta_attention_override(
                    state, dense_backend, *flat, heads=H, transformer_options=to)
            return x

    ss = torch.tensor(sigmas)
    for s in sigmas[:-1]:
        to = {P.STATE_KEY: run, "sigmas": torch.tensor([s]), "sample_sigmas": ss}
        P.diffusion_model_wrapper(Exec(), torch.zeros(1, 16, 4, 16, 16), torch.tensor([s * 1000]), None, None, None, to)
        if uncond is not None:
            second = [x.transpose(1, 2).reshape(1, -1, H * D) for x in uncond]
            P.diffusion_model_wrapper(Exec(second), torch.zeros(1, 16, 4, 16, 16), torch.tensor([s * 1000]), None, None, None, to)
    run.close_profile()  # as the OUTER_SAMPLE wrapper does when the run ends normally
    return state, run, outs


def test_measures_span_starts_routes_them_by_their_own_errors_and_the_rest_of_each_span():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    state, run, outs = sample(prov)
    tables = [run.steps[i].table for i in range(10)]
    assert prov.profiled_calls == 2 * 2  # 2 blocks at each of the 2 span starts (steps 0 and 5: quantiles of 10 steps)
    assert run.measured_calls == 2
    for i in range(10):
        assert bool((tables[i][0] == FULL).all())  # block 0 stays dense
        # planted: heads 0 and 3 local -> sliding tile, head 1 redundant -> core-set, head 2 random -> full
        assert tables[i][1].tolist() == [SLIDING, CORESET, FULL, SLIDING], i
    q, k, v = planted_heads()
    cfg = state.routed_config((4, 8, 8))
    ref = routed_attention(q, k, v, tables[1][1], (4, 8, 8), cfg, full_fn=F.scaled_dot_product_attention)
    for sigma in (1.0, 0.9, 0.5):  # the measured steps 0 and 5 route like the others
        out = next(o for (sg, b), o in outs.items() if b == 1 and abs(sg - sigma) < 1e-6)
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(1, -1, H * D))
    assert run.summary().count("sliding_tile") == 1 and "full 62.5%" in run.summary()  # 5/8 of the head-calls
    # every routed step can say why (the gate view): the measured ones too, once their measurement closed
    assert all(r.scores is not None and r.scores[0] == "error" for r in run.steps.values())
    torch.testing.assert_close(run.steps[0].scores[1], run.steps[1].scores[1])


def test_spans_at_quantiles_of_the_schedule_and_distilled_schedules():
    from nodes.training_free import spans_of_schedule

    uneven = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.99)  # 12 steps, crowded at the ends
    assert spans_of_schedule(uneven, True, 0.1, 3) == [(3, 5), (6, 8), (9, 11)]  # equal step counts, not percents
    assert spans_of_schedule(uneven, True, 0.0, 5) == [(0, 2), (3, 5), (6, 7), (8, 9), (10, 11)]
    four = (0.0, 0.25, 0.5, 0.75)
    assert spans_of_schedule(four, True, 0.1, 4) == [(1, 1), (2, 2)]  # warm-up step 0, last step dense
    assert spans_of_schedule(four, False, 0.1, 4) == [(1, 1), (2, 2), (3, 3)]  # a first half: its last step is no end
    assert spans_of_schedule(four, True, 0.1, 1) == [(1, 1), (2, 2)]  # bins do not apply to distilled schedules
    # a 6-step half of a 12-step schedule split over two samplers is no distilled schedule (found in review)
    half = (0.0, 0.083, 0.167, 0.25, 0.333, 0.417)
    assert spans_of_schedule(half, False, 0.1, 2, total_steps=12) == [(2, 3), (4, 5)]
    assert spans_of_schedule(half, False, 0.1, 2) == [(2, 2), (3, 3), (4, 4), (5, 5)]


def test_a_split_schedule_knows_its_whole_length():
    """The first half of a 12-step schedule (sigmas 1 .. 0.5) is no distilled schedule: 2 spans over it."""
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    _, run, _ = sample(prov, sigmas=tuple(round(1.0 - i / 12, 4) for i in range(7)))
    assert run.measured_calls == 2 and run.last_context.total_steps == 12


def test_a_distilled_schedule_measures_every_step_and_keeps_the_last_dense():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.1, bins=2, rows=64)
    _, run, _ = sample(prov, sigmas=(1.0, 0.75, 0.5, 0.25, 0.0))
    assert run.measured_calls == 2 and prov.profiled_calls == 2 * 2  # steps 1 and 2, each its own span
    assert bool((run.steps[0].table == FULL).all()) and bool((run.steps[3].table == FULL).all())
    assert run.steps[1].table[1].tolist() == run.steps[2].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]


def test_rerun_of_the_same_model_measures_nothing():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    dm = WanModel(heads=H)
    _, state = P.apply_vorta(FakePatcher(dm), prov, P.VortaOptions(tile="1,2,2", window=(3, 3, 3), bucket=(2, 2, 2)))
    q, k, v = planted_heads()
    flat = [x.transpose(1, 2).reshape(1, -1, H * D) for x in (q, k, v)]

    class Exec:
        class_obj = dm

        def __call__(self, x, timestep, context, clip_fea, tdc, to):
            for block in range(2):
                to[P.BLOCK_KEY] = block
                P.vorta_attention_override(state, dense_backend, *flat, heads=H, transformer_options=to)
            return x

    def one_run():
        run = state.new_run(percent_of=lambda s: 1.0 - s)
        ss = torch.tensor([1.0, 0.5, 0.0])
        for s in (1.0, 0.5):
            to = {P.STATE_KEY: run, "sigmas": torch.tensor([s]), "sample_sigmas": ss}
            P.diffusion_model_wrapper(Exec(), torch.zeros(1, 16, 4, 16, 16), torch.tensor([s * 1000]), None, None, None, to)
        run.close_profile()
        return run

    first = one_run()
    measured = prov.profiled_calls
    second = one_run()
    assert measured == 2 and prov.profiled_calls == measured  # the rerun measured nothing
    assert first.measured_calls == 1 and second.measured_calls == 0
    for run in (first, second):  # step 0 (its own span: 2 steps are a distilled schedule) routes; the last is dense
        assert run.steps[0].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]
        assert bool((run.steps[1].table == FULL).all())


def test_warmup_and_tau_zero_stay_dense():
    prov = TrainingFreeProvider(tau=0.0, warmup=0.3, bins=1, rows=64)
    _, run, _ = sample(prov)
    assert all(bool((run.steps[i].table == FULL).all()) for i in range(4))
    assert prov.bin_of(0.2) is None and prov.bin_of(0.3) == 0 and prov.bin_of(0.99) == 0
    with pytest.raises(ValueError, match="warmup"):
        TrainingFreeProvider(warmup=1.0)


def test_measurements_belong_to_their_model():
    """Another model object (e.g. the other Wan 2.2 expert on the same node) is measured afresh, and a
    model's measurements go when the model goes."""
    import gc

    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    sample(prov)
    sample(prov)
    assert prov.profiled_calls == 2 * 4
    gc.collect()
    assert len(prov.errors) == 0  # both fake models are gone, and their entries with them


def test_a_measuring_call_cut_short_is_measured_again():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64)
    dm = WanModel(heads=H)
    with pytest.raises(RuntimeError, match="cancelled"):
        sample(prov, dm=dm, fail_at=(1.0, 1))  # block 0 measured, then the step was cancelled
    assert prov.profiled_calls == 1 and not any(prov.errors.get(dm, {}))  # nothing kept
    _, run, _ = sample(prov, dm=dm)
    assert prov.profiled_calls == 1 + 2 and run.steps[1].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]


def test_other_branch_settings_or_weights_are_measured_afresh():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64)
    dm = WanModel(heads=H)
    sample(prov, dm=dm, weights="base")
    assert prov.profiled_calls == 2
    sample(prov, dm=dm, weights="base")
    assert prov.profiled_calls == 2  # same weights, grid, settings: nothing measured
    sample(prov, dm=dm, weights="with a LoRA")
    assert prov.profiled_calls == 4
    sample(prov, dm=dm, weights="base", options=P.VortaOptions(tile="1,2,2", window=(1, 3, 3), bucket=(2, 2, 2)))
    assert prov.profiled_calls == 6


def test_one_router_node_feeds_models_of_two_sizes():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64)
    _, run_a, _ = sample(prov, dm=WanModel(heads=H, blocks=2))
    _, run_b, _ = sample(prov, dm=WanModel(heads=H, blocks=3))
    assert tuple(run_a.steps[1].table.shape) == (2, H) and tuple(run_b.steps[1].table.shape) == (3, H)
    assert run_b.steps[1].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]


def test_a_run_that_only_measured_says_so(caplog):
    """tau 0: the measured steps pass no head, so nothing routes: one warning that says so."""
    import logging

    prov = TrainingFreeProvider(tau=0.0, warmup=0.0, bins=4, rows=64)
    with caplog.at_level(logging.WARNING, logger="vorta"):
        _, run, _ = sample(prov, sigmas=(1.0, 0.5, 0.0))
        run.check_routed()
    assert sum("measured 1 steps and routed none" in r.message for r in caplog.records) == 1


def test_cond_and_uncond_in_separate_calls_are_both_measured():
    """A head must be close on every model call of the measured step: here the second call's head 0
    is random, so head 0 goes full although the first call's head 0 is local."""
    q, k, v = planted_heads()
    g = torch.Generator().manual_seed(5)
    uq, uk, uv = (x.clone() for x in (q, k, v))
    for x, s in ((uq, 1.5), (uk, 1.5), (uv, 1.0)):
        x[:, 0] = torch.randn(x[:, 0].shape, generator=g) * s
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    _, run, _ = sample(prov, uncond=(uq, uk, uv))
    assert prov.profiled_calls == 2 * 2 * 2  # 2 calls x 2 blocks at each of the 2 span starts
    assert run.measured_calls == 2  # steps
    assert run.steps[1].table[1].tolist() == [FULL, CORESET, FULL, SLIDING]


# ---- on disk: the measurement cache and saved measured routers ------------------------------------

def test_a_new_session_with_the_same_key_measures_nothing(tmp_path):
    """A new provider (a restarted ComfyUI) and a new model object with the same fingerprint, sigmas,
    CFG and settings find the measurements on disk and route every step as the first run did."""
    first = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64, cache_dir=tmp_path)
    _, run1, _ = sample(first, fingerprint="abc", cfg_scale=5.0)
    assert first.profiled_calls == 4 and first.cache.writes == 2 and len(list(tmp_path.iterdir())) == 1
    again = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64, cache_dir=tmp_path)
    _, run2, _ = sample(again, fingerprint="abc", cfg_scale=5.0)
    assert again.profiled_calls == 0 and run2.measured_calls == 0 and again.loaded_spans == 2
    assert [r.table.tolist() for r in run2.steps.values()] == [r.table.tolist() for r in run1.steps.values()]


@pytest.mark.parametrize("change", ["fingerprint", "cfg_scale", "sigmas", "branches", "rows", "seed", "grid"])
def test_each_cache_key_field_invalidates(tmp_path, change):
    base = dict(fingerprint="abc", cfg_scale=5.0, sigmas=SIGMAS10, options=OPTIONS)
    sample(TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64, cache_dir=tmp_path), **base)
    kw, prov_kw = dict(base), dict(tau=TAU, warmup=0.0, bins=1, rows=64, cache_dir=tmp_path)
    if change == "fingerprint":
        kw["fingerprint"] = "abd"
    elif change == "cfg_scale":
        kw["cfg_scale"] = 6.0
    elif change == "sigmas":
        kw["sigmas"] = tuple(round(1.0 - i / 10, 2) for i in range(10)) + (0.05, 0.0)  # one step more at the end
    elif change == "branches":
        kw["options"] = P.VortaOptions(tile="1,2,2", window=(1, 3, 3), bucket=(2, 2, 2))
    elif change in ("rows", "seed"):
        prov_kw[change] = 65 if change == "rows" else 1
    prov = TrainingFreeProvider(**prov_kw)
    if change == "grid":
        prov2 = TrainingFreeProvider(**prov_kw)
        key = lambda grid: prov2.disk_key(_ctx(grid))
        assert key((4, 8, 8)) != key((4, 8, 6)) and key((4, 8, 8)) == key((4, 8, 8))
        return
    sample(prov, **kw)
    assert prov.profiled_calls == 2 and prov.loaded_spans == 0, change  # measured afresh


def _ctx(grid):
    from nodes.models import inspect_model
    from nodes.providers import StepContext

    spec = inspect_model(WanModel(heads=H))
    st = P.VortaState(TrainingFreeProvider(), spec, OPTIONS)
    return StepContext(None, spec, 500.0, grid=grid, cfg=st.routed_config(grid), sigmas=SIGMAS10, fingerprint="abc",
                       cfg_scale=5.0)


def test_an_unreadable_cache_entry_is_measured_again(tmp_path):
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64, cache_dir=tmp_path)
    sample(prov, fingerprint="abc")
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"not safetensors")
    again = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64, cache_dir=tmp_path)
    sample(again, fingerprint="abc")
    assert again.profiled_calls == 2  # measured, and the entry rewritten
    third = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64, cache_dir=tmp_path)
    sample(third, fingerprint="abc")
    assert third.profiled_calls == 0


def test_saved_measured_router_loads_and_routes_like_the_measuring_run(tmp_path):
    from nodes.providers import as_provider
    from vorta_ops.measured import MeasuredTable, save_measured
    from vorta_ops.router_io import RouterFileError, load_router

    prov = TrainingFreeProvider(tau=TAU, warmup=0.2, bins=2, rows=64)
    state, run, _ = sample(prov)
    table = prov.export(run.last_context)
    assert isinstance(table, MeasuredTable) and len(table.spans) == 2 and table.tau == TAU
    path = save_measured(table, tmp_path / "measured.safetensors")
    with pytest.raises(RouterFileError, match="already exists"):
        save_measured(table, path)  # never overwritten
    loaded = load_router(path)
    assert isinstance(loaded, MeasuredTable) and loaded.spans == table.spans
    torch.testing.assert_close(loaded.errors, table.errors, equal_nan=True)
    # routed by the file, a new model object gets the tables the measuring run used (measured steps included)
    _, run2, _ = sample(as_provider(loaded))
    assert run2.measured_calls == 0
    assert [r.table.tolist() for r in run2.steps.values()] == [r.table.tolist() for r in run.steps.values()]
    from nodes.models import inspect_model

    with pytest.raises(ValueError, match="does not fit the model"):
        as_provider(loaded).check_fits(inspect_model(WanModel(heads=H, blocks=3)))


def test_a_measured_router_at_other_branch_settings_warns_once(tmp_path, caplog):
    import logging

    from nodes.providers import as_provider
    from vorta_ops.measured import save_measured
    from vorta_ops.router_io import load_router

    prov = TrainingFreeProvider(tau=TAU, warmup=0.2, bins=2, rows=64)
    _, run, _ = sample(prov)
    path = save_measured(prov.export(run.last_context), tmp_path / "m.safetensors")
    with caplog.at_level(logging.WARNING, logger="vorta"):
        sample(as_provider(load_router(path)))
        assert not [r for r in caplog.records if "may not hold" in r.message]
        other = P.VortaOptions(tile="1,2,2", window=(1, 3, 3), bucket=(2, 2, 2))
        sample(as_provider(load_router(path)), options=other)
    assert sum("other branch settings" in r.message for r in caplog.records) == 1


def test_hysteresis_keeps_a_head_on_its_branch_while_its_error_stays_near_tau():
    from nodes.providers import StepContext
    from nodes.models import inspect_model

    spec = inspect_model(WanModel(heads=H))
    prov = TrainingFreeProvider(tau=0.3, warmup=0.0, bins=2, rows=64, dense_block0=False)
    state = P.VortaState(prov, spec, OPTIONS)
    sched = tuple(i / 10 for i in range(10))
    dm = WanModel(heads=H)
    ctx = lambda step: StepContext(dm, spec, 500.0, grid=(4, 8, 8), cfg=state.routed_config((4, 8, 8)), step=step,
                                   schedule=sched, ends_at_zero=True)
    c0, c5 = ctx(0), ctx(5)
    first = torch.tensor([[[0.0, 0.9, 0.10]] * H] * 2)  # sliding tile clearly within tau
    second = torch.tensor([[[0.0, 0.9, 0.32]] * H] * 2)  # now just above tau, inside tau * 1.1
    store = prov._measured(c0)
    store[prov._key(c0, prov.span_of(c0))] = first
    store[prov._key(c5, prov.span_of(c5))] = second
    assert prov.table(c5).tolist() == [[SLIDING] * H] * 2  # kept: no flicker to full
    prov.hysteresis = 0.0
    assert prov.table(c5).tolist() == [[FULL] * H] * 2  # without hysteresis it would flip


def test_speed_mode_meets_the_target_with_the_least_error():
    """speed mode, target 62% of dense: the routed steps reach it, taking the heads with the smallest
    errors first: the random heads stay full (the local and redundant heads alone reach the target)."""
    from vorta_ops.profiling import branch_costs

    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64, mode="speed", target=0.62, dense_block0=False)
    state, run, _ = sample(prov)
    costs = branch_costs(state.routed_config((4, 8, 8)), (4, 8, 8)).tolist()
    costs[FULL] = 1.0
    for rec in list(run.steps.values())[1:]:
        work = sum(costs[int(b)] for b in rec.table.reshape(-1)) / rec.table.numel()
        assert work <= 0.62 + 1e-9, rec.table.tolist()
        assert rec.table[:, 2].tolist() == [FULL, FULL] and int((rec.table != FULL).sum()) >= 4, rec.table.tolist()
    assert "speed: 62% of dense attention work" in prov.describe()
    with pytest.raises(ValueError, match="mode"):
        TrainingFreeProvider(mode="fast")


def test_in_one_session_the_memory_key_holds_the_disk_keys_fields():
    """Found in review: changing CFG (or the sigmas, or the weights' fingerprint) in one session reused
    the errors measured under the old settings, which a restart would measure afresh."""
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=1, rows=64)
    dm = WanModel(heads=H)
    sample(prov, dm=dm, fingerprint="abc", cfg_scale=5.0)
    assert prov.profiled_calls == 2
    sample(prov, dm=dm, fingerprint="abc", cfg_scale=5.0)
    assert prov.profiled_calls == 2
    for kw in (dict(fingerprint="abc", cfg_scale=1.0), dict(fingerprint="abd", cfg_scale=5.0)):
        before = prov.profiled_calls
        sample(prov, dm=dm, **kw)
        assert prov.profiled_calls == before + 2, kw


def test_speed_mode_with_tau_zero_keeps_every_head_full():
    prov = TrainingFreeProvider(tau=0.0, warmup=0.0, bins=1, rows=64, mode="speed", target=0.3, dense_block0=False)
    _, run, _ = sample(prov)
    assert all(bool((r.table == FULL).all()) for r in run.steps.values())


def test_a_span_with_an_unmeasured_head_loads_back_from_disk(tmp_path):
    from vorta_ops.measured import ErrorCache

    cache = ErrorCache(tmp_path)
    errors = torch.rand(2, H, 3)
    errors[1, 2, 1:] = float("nan")  # one head of block 1 measured nothing; the block has others
    cache.store("key", (0.0, 0.5), errors)
    loaded = cache.load("key")
    assert list(loaded) == [(0.0, 0.5)]
    torch.testing.assert_close(loaded[(0.0, 0.5)], errors, equal_nan=True)
    errors[0, :, 1:] = float("nan")  # a whole block unmeasured: not a span
    cache.store("key2", (0.0, 0.5), errors)
    assert cache.load("key2") == {}
