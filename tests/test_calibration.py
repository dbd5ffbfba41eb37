"""VORTA Calibration Report, the computation (nodes/calibration_data.py, no ComfyUI): confusion,
agreement, shares, the tau sweep on stored errors, unmeasured heads and steps, and reading a patched
model's last run (small fakes)."""
import json
import math
import types

import pytest
import torch

from nodes import calibration_data as C
from nodes import patch as P
from nodes.training_free import TrainingFreeProvider
from test_nodes_patch import router_for
from test_nodes_training_free import sample
from test_profiling import TAU

SIGMAS = (1.0, 0.75, 0.5, 0.25, 0.0)  # 4 steps
from vorta_ops.profiling import decide_from_errors
from vorta_ops.router import CORESET, FULL, SLIDING


def step(i, official, executed, errors, forced=None):
    return C.CalibrationStep(i, 1.0 - i / 10, 1000 - 100 * i, torch.as_tensor(executed), torch.as_tensor(official),
                             torch.as_tensor(errors, dtype=torch.float32), forced)


# ---- counting -------------------------------------------------------------------------------------


def test_confusion_rows_official_columns_training_free():
    official = torch.tensor([[FULL, CORESET, SLIDING], [SLIDING, SLIDING, CORESET]])
    free = torch.tensor([[FULL, SLIDING, SLIDING], [CORESET, SLIDING, FULL]])
    conf = C.confusion(official, free)
    expect = torch.zeros(3, 3, dtype=torch.long)
    for o, f in zip(official.reshape(-1).tolist(), free.reshape(-1).tolist()):
        expect[o, f] += 1
    assert conf.tolist() == expect.tolist()
    assert conf[CORESET, SLIDING] == 1 and conf[SLIDING, CORESET] == 1  # not transposed
    assert int(conf.sum()) == 6 and C.agreement(conf) == pytest.approx(3 / 6)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    masked = C.confusion(official, free, mask)
    assert int(masked.sum()) == 3 and masked.trace() == 3 and C.agreement(masked) == 1.0
    o, f = C.shares(conf)
    assert o.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6]) and f.tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    assert C.mix_distance(o, f) == pytest.approx(1 / 6)
    assert C.mix_distance([1, 0, 0], [0, 0, 1]) == 1.0


def test_empty_and_bad_tables():
    conf = C.confusion(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    assert int(conf.sum()) == 0 and math.isnan(C.agreement(conf))
    assert all(math.isnan(x) for x in C.shares(conf)[0].tolist())
    with pytest.raises(ValueError, match="branch ids outside"):
        C.confusion(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="different sizes"):
        C.confusion(torch.zeros(2, 2), torch.zeros(2, 3))


def test_compared_cells_leave_out_unmeasured_and_forced_heads():
    e = torch.rand(2, 3, 3)
    e[0, 1, 1:] = float("nan")  # unmeasured head
    e[1, 2, 1] = float("nan")  # one branch unmeasured: still compared (NaN never passes)
    forced = torch.zeros(2, 3, dtype=torch.bool)
    forced[1, 0] = True
    m = C.compared_cells(e, forced)
    assert m.tolist() == [[True, False, True], [False, True, True]]


# ---- the tau sweep ------------------------------------------------------------------------------


def planted(seed=0, blocks=4, heads=8, steps=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(blocks, heads, 3, generator=g) * 2 for _ in range(steps)]


COSTS = torch.tensor([1.0, 0.25, 0.1], dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.37, 0.8, 1.5])
def test_sweep_finds_the_tau_of_a_planted_official_mix(tau):
    errs = planted()
    steps = [step(i, decide_from_errors(e, tau, COSTS), decide_from_errors(e, 0.1, COSTS), e) for i, e in enumerate(errs)]
    sweep = C.sweep_tau(steps, COSTS)
    best = sweep["best"]
    assert best["distance"] == 0.0 and best["agreement"] == 1.0
    assert sweep["best_agreement"]["tau"] == best["tau"]
    lo, hi = best["tau_range"]
    assert lo <= tau <= hi + C.TAU_STEP  # the grid tau at or just below the planted one decides the same
    for r in sweep["plateaus"]:  # every other plateau is further from the planted mix, or agrees less
        assert r["distance"] > 0 or r["tau_from"] == lo or r["agreement"] < 1.0


def test_sweep_matches_the_mix_not_the_heads():
    """An official table with the planted mix on other heads: the sweep still finds the tau (distance
    0) and says the heads disagree."""
    tau = 0.6
    errs = planted(1)
    official = []
    for e in errs:
        t = decide_from_errors(e, tau, COSTS)
        official.append(t.reshape(-1).roll(5).reshape(t.shape))  # same mix, other heads
    steps = [step(i, o, torch.zeros_like(o), e) for i, (o, e) in enumerate(zip(official, errs))]
    sweep = C.sweep_tau(steps, COSTS)
    best = sweep["best"]
    assert best["distance"] == 0.0 and best["agreement"] < 1.0
    mix = C.shares(C.confusion(torch.stack(official), decide_from_errors(torch.stack(errs), best["tau"], COSTS)))[1]
    assert mix.tolist() == pytest.approx(C.shares(C.confusion(torch.stack(official), torch.stack(official)))[0].tolist())
    # the most agreeing tau is reported too, and agrees at least as well
    assert sweep["best_agreement"]["agreement"] >= best["agreement"]
    assert max(r["agreement"] for r in sweep["plateaus"]) == sweep["best_agreement"]["agreement"]


def test_sweep_over_given_taus_and_ties_to_the_lower_tau():
    e = torch.tensor([[[0.0, 0.5, 0.9]]])  # one head: core-set passes from 0.5, sliding tile (cheaper) from 0.9
    s = [step(0, torch.tensor([[CORESET]]), torch.tensor([[FULL]]), e)]
    sweep = C.sweep_tau(s, COSTS, taus=[0.0, 0.2, 0.5, 0.7, 0.9, 2.0])
    assert sweep["best"]["tau"] == 0.5 and sweep["best"]["tau_range"] == [0.5, 0.7]
    assert [(r["tau_from"], r["tau_to"]) for r in sweep["plateaus"]] == [(0.0, 0.2), (0.5, 0.7), (0.9, 2.0)]
    with pytest.raises(ValueError, match="no compared steps"):
        C.sweep_tau([C.CalibrationStep(0, 1.0, 1000.0, torch.zeros(1, 1))], COSTS)


def test_sweep_hysteresis_keeps_the_previous_spans_sparse_branch():
    """Two spans (distinct errors, in schedule order): the second one's sliding tile error is just
    above tau; with the router's hysteresis (margin) it keeps the first span's sliding tile."""
    first = torch.tensor([[[0.0, 0.5, 0.05]]])
    second = torch.tensor([[[0.0, 0.5, 0.105]]])
    steps = [step(0, torch.tensor([[SLIDING]]), torch.tensor([[SLIDING]]), first),
             step(1, torch.tensor([[SLIDING]]), torch.tensor([[SLIDING]]), first),
             step(2, torch.tensor([[SLIDING]]), torch.tensor([[SLIDING]]), second)]
    plain = C.sweep_tau(steps, COSTS, taus=[0.1])["best"]
    kept = C.sweep_tau(steps, COSTS, taus=[0.1], margin=0.1)["best"]
    assert plain["confusion"][SLIDING].tolist() == [1, 0, 2]  # the second span falls back to full
    assert kept["confusion"][SLIDING].tolist() == [0, 0, 3] and kept["agreement"] == 1.0
    r = C.build_report(steps, COSTS, 0.1, margin=0.1)
    assert r["executed_differs"] == 0 and r["hysteresis"] == 0.1
    assert C.build_report(steps, COSTS, 0.1)["executed_differs"] == 1


def test_tau_grid_stops_where_every_error_passes():
    assert C.tau_grid([torch.tensor([0.031, float("nan"), 0.02])]) == [0.0, 0.01, 0.02, 0.03, 0.04]
    assert C.tau_grid([torch.tensor([float("inf"), 50.0])])[-1] == C.TAU_MAX
    assert C.tau_grid([torch.tensor([float("nan")])]) == [0.0]


# ---- the report -------------------------------------------------------------------------------------


def test_report_counts_only_measured_routed_cells_of_compared_steps():
    e = torch.tensor([[[0.0, 0.2, 0.05], [0.0, 0.05, 0.9]], [[0.0, 0.9, 0.9], [0.0, float("nan"), float("nan")]]])
    forced = torch.tensor([[True, True], [False, False]])  # block 0 dense
    tau = 0.1
    free = decide_from_errors(e, tau, COSTS).long()
    free[0] = FULL  # as executed: block 0 dense
    official = torch.tensor([[CORESET, CORESET], [FULL, SLIDING]])
    steps = [C.CalibrationStep(0, 1.0, 1000.0, torch.full((2, 2), FULL), why="warm-up"),
             C.CalibrationStep(1, 0.8, 800.0, free, official, e, forced),
             C.CalibrationStep(2, 0.6, 600.0, free, official.flip(1), e, forced)]
    r = C.build_report(steps, COSTS, tau)
    # block 0 forced, head (1, 1) unmeasured: one cell per compared step
    assert r["cells"] == 2 and r["compared_steps"] == [1, 2]
    assert [s["compared"] for s in r["steps"]] == [False, True, True] and r["steps"][0]["why"] == "warm-up"
    # (1, 0): errors 0.9 / 0.9 -> full; official full at step 1, sliding tile at step 2
    assert [s["agreement"] for s in r["steps"][1:]] == [1.0, 0.0]
    assert r["confusion"]["matrix"] == [[1, 0, 0], [0, 0, 0], [1, 0, 0]] and r["agreement"] == 0.5
    assert r["executed_differs"] == 0
    json.dumps(r, allow_nan=False)
    text = C.summary_text(r)
    assert "compared 2 steps (1-2), 2 cells" in text and "agreement 50.0%" in text
    # an executed table that is not what its errors decide is reported
    bad = C.CalibrationStep(1, 0.8, 800.0, torch.full((2, 2), CORESET), official, e, forced)
    assert C.build_report([bad], COSTS, tau)["executed_differs"] == 1
    with pytest.raises(ValueError, match="no step"):
        C.build_report(steps[:1], COSTS, tau)


# ---- reading a patched model's last run ------------------------------------------------------------


def patched(state, dm):
    return types.SimpleNamespace(model_options={"transformer_options": {P.STATE_KEY: state}},
                                 model=types.SimpleNamespace(diffusion_model=dm))


OFFICIAL = [[CORESET, SLIDING, FULL, CORESET], [SLIDING, SLIDING, CORESET, FULL]]


def test_collect_steps_from_a_training_free_run():
    """The steps compared are exactly those the router routed (a sparse branch in block 1); block 0
    (dense by the training-free router) is left out; counts match a recomputation from the run."""
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    state, run, _ = sample(prov, SIGMAS)
    state.last_run = run
    model = patched(state, next(iter(prov.errors.keys())))  # the fake Wan it sampled
    steps, costs, ctx = C.collect_steps(model, router_for(OFFICIAL))
    assert [s.step for s in steps] == [0, 1, 2, 3]
    routed = [i for i in range(4) if bool((run.steps[i].table[1] != FULL).any())]
    assert routed and [s.step for s in steps if s.compared] == routed
    for i in routed:  # the planted heads (test_nodes_training_free): local, redundant, random, local
        assert run.steps[i].table[1].tolist() == [SLIDING, CORESET, FULL, SLIDING]
        assert bool((run.steps[i].table[0] == FULL).all())
    r = C.build_report(steps, costs, prov.tau, margin=ctx["hysteresis"])
    assert r["cells"] == len(routed) * 4  # block 1's 4 heads per routed step
    executed = [SLIDING, CORESET, FULL, SLIDING]
    agree = sum(a == b for a, b in zip(OFFICIAL[1], executed)) / 4
    assert [s["agreement"] for s in r["steps"] if s["compared"]] == [agree] * len(routed)
    expect = torch.zeros(3, 3, dtype=torch.long)
    for o, f in zip(OFFICIAL[1], executed):
        expect[o, f] += len(routed)
    assert r["confusion"]["matrix"] == expect.tolist() and r["agreement"] == agree
    assert r["executed_differs"] == 0
    # the sweep at the router's own tau gives the executed mix
    own = [p for p in r["tau_sweep"]["plateaus"] if p["tau_from"] <= TAU <= p["tau_to"]]
    assert own and own[0]["shares"] == r["shares"]["training_free"]


def test_collect_steps_says_what_to_connect():
    prov = TrainingFreeProvider(tau=TAU, warmup=0.0, bins=2, rows=64)
    state, run, _ = sample(prov, SIGMAS)
    dm = next(iter(prov.errors.keys()))
    with pytest.raises(ValueError, match="not patched by VORTA Apply"):
        C.collect_steps(patched(None, dm), router_for(OFFICIAL))
    with pytest.raises(ValueError, match="has not sampled yet"):
        C.collect_steps(patched(state, dm), router_for(OFFICIAL))
    state.last_run = run
    with pytest.raises(ValueError, match=r"official router: .*heads: router 2, model 4"):
        C.collect_steps(patched(state, dm), router_for([[0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="must be a router file"):
        C.collect_steps(patched(state, dm), prov)
    # a run that never left the warm-up: nothing measured, nothing routed
    prov4 = TrainingFreeProvider(tau=TAU, warmup=0.9, bins=2, rows=64)
    state4, run4, _ = sample(prov4, SIGMAS)
    state4.last_run = run4
    with pytest.raises(ValueError, match="no step routed from measured errors"):
        C.collect_steps(patched(state4, dm), router_for(OFFICIAL))
    # a model patched with a file router
    file_state, file_run, _ = sample(router_for(OFFICIAL), SIGMAS)
    file_state.last_run = file_run
    with pytest.raises(ValueError, match="not a measuring router"):
        C.collect_steps(patched(file_state, dm), router_for(OFFICIAL))
