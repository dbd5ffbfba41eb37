"""The training-free router through the patch (small fakes, no ComfyUI): it measures the first step
of each span of the denoising (running it dense), routes the span's other steps by those errors,
keeps block 0 and the warm-up dense, and a rerun measures nothing."""
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


def sample(provider, sigmas=(1.0, 0.75, 0.5, 0.25, 0.0), dm=None, options=OPTIONS, weights=None, fail_at=None,
           uncond=None):
    """One sampling run of a 2-block fake Wan on the planted heads (latent 4x16x16 -> grid 4x8x8);
    returns the run and the outputs per (step, block). fail_at: (sigma, block) where the model
    call raises (a cancel mid-step). uncond: q, k, v of a second model call per step (cond and
    uncond sent as separate calls)."""
    dm = dm if dm is not None else WanModel(heads=H)
    _, state = P.apply_vorta(FakePatcher(dm), provider, options)
    run = state.new_run(percent_of=lambda s: 1.0 - s)  # a flow schedule: percent = 1 - sigma
    run.weights = weights
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


def test_measures_bin_starts_and_routes_the_rest_of_each_span():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    state, run, outs = sample(prov)
    tables = [run.steps[i].table for i in range(4)]
    assert prov.profiled_calls == 2 * 2  # 2 blocks at each of the 2 bin starts (steps 0 and 2)
    for i in (0, 2):  # measured: dense while measuring
        assert bool((tables[i] == FULL).all())
    for i in (1, 3):
        assert bool((tables[i][0] == FULL).all())  # block 0 stays dense
        # planted: heads 0 and 3 local -> sliding tile, head 1 redundant -> core-set, head 2 random -> full
        assert tables[i][1].tolist() == [SLIDING, CORESET, FULL, SLIDING]
    q, k, v = planted_heads()
    cfg = state.routed_config((4, 8, 8))
    ref = routed_attention(q, k, v, tables[1][1], (4, 8, 8), cfg, full_fn=F.scaled_dot_product_attention)
    torch.testing.assert_close(outs[(0.75, 1)], ref.transpose(1, 2).reshape(1, -1, H * D))


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
    assert measured == 4 and prov.profiled_calls == measured  # the rerun measured nothing
    assert bool((first.steps[0].table == FULL).all())  # the first run measured step 0 (dense)
    assert second.steps[0].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]  # the rerun routes it


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
    """Fewer steps than spans: every step is a span start, measured and dense: one warning."""
    import logging

    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=4, rows=64)
    with caplog.at_level(logging.WARNING, logger="vorta"):
        _, run, _ = sample(prov, sigmas=(1.0, 0.5, 0.0))
        run.check_routed()
    assert sum("measured 2 steps and routed none" in r.message for r in caplog.records) == 1


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
