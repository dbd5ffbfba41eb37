"""VORTA Calibration Report, the computation (no ComfyUI import): the training-free router's tables
against an official (trained) router's on the same steps of one sampling run.

What is compared: per step of the patched model's last run that was routed from measured errors
(not the warm-up, not a step that was being measured: those ran dense with nothing decided), the
training-free table as executed against the official router's table at the same timestep (its
argmax with the official tau_sparse rule). Only the routed part is compared: cells forced dense
whatever a router says (VORTA Apply's dense blocks and dense start/end steps, the training-free
router's dense block 0) and heads with no measured error are left out, for both tables alike.

Reported: a 3x3 confusion matrix (rows: the official branch, columns: the training-free branch, in
branch-table order), agreement per step and overall, each side's branch shares, and the
training-free tau whose branch mix comes closest to the official mix. The errors, not the
decisions, are stored by the router, so the tau sweep re-decides from them
(vorta_ops.profiling.decide_from_errors) with no new measurement.

``collect_steps`` reads a patched model's state (nodes.patch, which imports no ComfyUI either);
the node (nodes/calibration.py) adds versions and writes the JSON.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vorta_ops.branches import BRANCH_LABELS, BRANCH_NAMES, FULL, N_BRANCHES
from vorta_ops.profiling import branch_costs, decide_from_errors

__all__ = [
    "FORMAT", "TAU_STEP", "TAU_MAX", "CalibrationStep", "confusion", "agreement", "shares", "mix_distance",
    "compared_cells", "tau_grid", "sweep_tau", "build_report", "summary_text", "collect_steps",
    "router_setting",
]

FORMAT = 1  # the report's "format"; bump when fields change meaning
TAU_STEP = 0.01  # the sweep's grid step
TAU_MAX = 10.0  # the largest tau the VORTA Training-Free Router node takes


@dataclass
class CalibrationStep:
    """One step of a sampling run, both routers' tables for it.

    executed  int [blocks, heads]: the training-free table as the step ran
    official  int [blocks, heads]: the official router's table at the same timestep (None when
              the step is not compared)
    errors    float [blocks, heads, N_BRANCHES]: the measured errors the executed table was decided
              from (None: none, e.g. warm-up or the measured step itself)
    forced    bool [blocks, heads]: cells forced dense whatever a router says (left out)
    why       why the step is not compared ("" when it is)"""

    step: int | None
    sigma: float
    timestep: float
    executed: torch.Tensor
    official: torch.Tensor | None = None
    errors: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    why: str = ""

    @property
    def compared(self) -> bool:
        return self.errors is not None and self.official is not None and not self.why


# ---- counting ----------------------------------------------------------------------------------


def confusion(official, free, mask=None) -> torch.Tensor:
    """int64 [N_BRANCHES, N_BRANCHES]: cell counts, rows the official branch, columns the
    training-free branch (branch ids). mask: bool of the tables' shape, True = counted."""
    o = torch.as_tensor(official).long().reshape(-1)
    f = torch.as_tensor(free).long().reshape(-1)
    if o.shape != f.shape:
        raise ValueError(f"tables of different sizes: official {tuple(torch.as_tensor(official).shape)}, "
                         f"training-free {tuple(torch.as_tensor(free).shape)}")
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        if m.shape != o.shape:
            raise ValueError(f"mask of {m.numel()} cells for tables of {o.numel()}")
        o, f = o[m], f[m]
    for name, t in (("official", o), ("training-free", f)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= N_BRANCHES):
            raise ValueError(f"{name} table holds branch ids outside 0..{N_BRANCHES - 1}")
    return torch.bincount(o * N_BRANCHES + f, minlength=N_BRANCHES * N_BRANCHES).view(N_BRANCHES, N_BRANCHES)


def agreement(conf: torch.Tensor) -> float:
    """Share of counted cells where both routers chose the same branch; NaN when none is counted."""
    total = int(conf.sum())
    return float(conf.trace()) / total if total else float("nan")


def shares(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(official, training-free) branch shares [N_BRANCHES] float64 of a confusion matrix (NaN when empty)."""
    c = conf.double()
    total = float(c.sum())
    if not total:
        nan = torch.full((N_BRANCHES,), float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    return c.sum(1) / total, c.sum(0) / total


def mix_distance(a, b) -> float:
    """Total variation distance of two branch mixes: half the L1 distance, 0 (same mix) .. 1."""
    return 0.5 * float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().sum())


def compared_cells(errors: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """bool [blocks, heads]: the cells compared on a step routed from ``errors`` [blocks, heads,
    N_BRANCHES]: a head with at least one measured sparse error (not NaN) that is not forced dense."""
    measured = ~torch.isnan(torch.as_tensor(errors, dtype=torch.float32)[..., 1:]).all(-1)
    return measured if forced is None else measured & ~torch.as_tensor(forced, dtype=torch.bool)


# ---- the tau sweep ---------------------------------------------------------------------------------


def tau_grid(errors, step: float = TAU_STEP, tau_max: float = TAU_MAX) -> list[float]:
    """0, step, 2*step, ... up to the first grid point at which every finite error passes (nothing
    changes above it), at most tau_max."""
    finite = [e[torch.isfinite(e)] for e in (torch.as_tensor(x, dtype=torch.float64) for x in errors)]
    top = max((float(e.max()) for e in finite if e.numel()), default=0.0)
    n = min(math.ceil(min(top, tau_max) / step - 1e-9), round(tau_max / step))
    return [round(i * step, 10) for i in range(n + 1)]


def _unique(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Distinct tensors (steps of one span share their errors) and each input's index among them."""
    uniq, index = [], []
    for t in tensors:
        for i, u in enumerate(uniq):
            if u is t or (u.shape == t.shape and torch.equal(torch.nan_to_num(u, nan=-1.0), torch.nan_to_num(t, nan=-1.0))):
                index.append(i)
                break
        else:
            uniq.append(t)
            index.append(len(uniq) - 1)
    return uniq, index


def _decide_spans(uniq: list[torch.Tensor], tau: float, costs, margin: float) -> torch.Tensor:
    """int8 [U, blocks, heads]: each distinct errors tensor (a span, in schedule order) decided at tau;
    with margin > 0, a span's decision keeps the previous span's sparse branch while its error is
    within tau * (1 + margin) (the training-free router's hysteresis)."""
    if margin <= 0:
        return decide_from_errors(torch.stack(uniq), tau, costs)
    out, prev = [], None
    for e in uniq:
        prev = decide_from_errors(e, tau, costs, prev=prev, margin=margin)
        out.append(prev)
    return torch.stack(out)


def sweep_tau(steps: list[CalibrationStep], costs, taus=None, margin: float = 0.0) -> dict:
    """Re-decide the compared steps from their errors at each tau of ``taus`` (default
    ``tau_grid``) and find the tau whose training-free branch mix (over the compared cells) is
    closest to the official mix over the same cells (total variation distance); ties go to the
    higher agreement, then the lower tau. Steps that share their errors (one span) share the
    decision; margin: the router's hysteresis between consecutive spans (0: none).

    Returns {"official_shares", "best": {tau, tau_range, shares, distance, agreement, confusion},
    "best_agreement": {tau, tau_range, agreement, distance} (the tau agreeing most, head by head),
    "plateaus": [{tau_from, tau_to, shares, distance, agreement}], "taus"}: the sweep with
    consecutive taus that give the same decisions merged (decisions change only at error values)."""
    steps = [s for s in steps if s.compared]
    if not steps:
        raise ValueError("no compared steps to sweep tau over")
    errors = [s.errors.to(torch.float32) for s in steps]
    masks = torch.stack([compared_cells(s.errors, s.forced) for s in steps])  # [S, B, H]
    official = torch.stack([s.official.long() for s in steps])
    target, _ = shares(confusion(official, official, masks))
    uniq, index = _unique(errors)
    if taus is None:
        taus = tau_grid([u[..., 1:][compared_cells(u)] for u in uniq])
    taus = sorted(float(t) for t in taus)
    if not taus or taus[0] < 0:
        raise ValueError("taus must be a non-empty list of values >= 0")
    idx = torch.tensor(index)
    rows, prev_tables = [], None
    for tau in taus:
        free = _decide_spans(uniq, tau, costs, margin).long()[idx]  # [S, B, H]
        if prev_tables is not None and torch.equal(free[masks], prev_tables):
            rows[-1]["tau_to"] = tau
            continue
        prev_tables = free[masks]
        conf = confusion(official, free, masks)
        mix = shares(conf)[1]
        rows.append({"tau_from": tau, "tau_to": tau, "shares": mix, "distance": mix_distance(mix, target),
                     "agreement": agreement(conf), "confusion": conf})
    best = min(rows, key=lambda r: (round(r["distance"], 12), -r["agreement"], r["tau_from"]))
    agrees = min(rows, key=lambda r: (-r["agreement"], round(r["distance"], 12), r["tau_from"]))
    return {
        "official_shares": target,
        "best": {"tau": best["tau_from"], "tau_range": [best["tau_from"], best["tau_to"]], "shares": best["shares"],
                 "distance": best["distance"], "agreement": best["agreement"], "confusion": best["confusion"]},
        "best_agreement": {"tau": agrees["tau_from"], "tau_range": [agrees["tau_from"], agrees["tau_to"]],
                           "agreement": agrees["agreement"], "distance": agrees["distance"]},
        "plateaus": [{k: v for k, v in r.items() if k != "confusion"} for r in rows],
        "taus": taus,
    }


# ---- the report --------------------------------------------------------------------------------------


def _shares_dict(sh: torch.Tensor) -> dict:
    return {n: (float(v) if math.isfinite(float(v)) else None) for n, v in zip(BRANCH_NAMES, sh.tolist())}


def _num(x: float):
    return float(x) if math.isfinite(float(x)) else None


def build_report(steps: list[CalibrationStep], costs, tau: float, taus=None, margin: float = 0.0) -> dict:
    """The comparison part of the report (plain JSON data): per step, overall, and the tau sweep.

    tau: the training-free router's own tau (the executed tables' threshold); margin: its
    hysteresis. The report counts the compared cells where the executed table differs from the
    sweep's re-decision of its errors at that tau ("executed_differs"; 0 but for the hysteresis of
    a run's first measurement, which routes its own step without it)."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    per_step, total = [], torch.zeros(N_BRANCHES, N_BRANCHES, dtype=torch.long)
    differs = 0
    for s in steps:
        row = {"step": s.step, "sigma": _num(s.sigma), "timestep": _num(s.timestep), "compared": s.compared}
        if not s.compared:
            row["why"] = s.why or "no measured errors"
            per_step.append(row)
            continue
        mask = compared_cells(s.errors, s.forced)
        conf = confusion(s.official, s.executed, mask)
        total += conf
        o, f = shares(conf)
        row.update({"cells": int(conf.sum()), "agreement": _num(agreement(conf)), "official": _shares_dict(o),
                    "training_free": _shares_dict(f)})
        per_step.append(row)
    compared = [s for s in steps if s.compared]
    if not compared:
        raise ValueError("no step of the run was routed from measured errors")
    o, f = shares(total)
    if math.isfinite(float(tau)):  # the executed tables against the sweep's model of them at the router's tau
        uniq, index = _unique([c.errors.to(torch.float32) for c in compared])
        redecided = _decide_spans(uniq, float(tau), costs, margin).long()
        for c, i in zip(compared, index):
            differs += int(((redecided[i] != c.executed.long()) & compared_cells(c.errors, c.forced)).sum())
    sweep = sweep_tau(compared, costs, taus, margin)
    best = sweep["best"]
    return {
        "branches": list(BRANCH_NAMES),
        "compared_steps": [s.step for s in compared],
        "cells": int(total.sum()),
        "confusion": {"rows": "official", "columns": "training-free", "matrix": total.tolist()},
        "agreement": _num(agreement(total)),
        "shares": {"official": _shares_dict(o), "training_free": _shares_dict(f)},
        "tau": float(tau),
        "hysteresis": float(margin),
        "executed_differs": differs,
        "tau_match": {
            "tau": best["tau"], "tau_range": best["tau_range"], "shares": _shares_dict(best["shares"]),
            "distance": best["distance"], "agreement": _num(best["agreement"]),
            "confusion": best["confusion"].tolist(),
        },
        "tau_best_agreement": {k: _num(v) if isinstance(v, float) else v for k, v in sweep["best_agreement"].items()},
        "tau_sweep": {
            "step": (sweep["taus"][1] - sweep["taus"][0]) if len(sweep["taus"]) > 1 else None,
            "max": sweep["taus"][-1],
            "plateaus": [{"tau_from": r["tau_from"], "tau_to": r["tau_to"], "shares": _shares_dict(r["shares"]),
                          "distance": r["distance"], "agreement": _num(r["agreement"])} for r in sweep["plateaus"]],
        },
        "steps": per_step,
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _mix(sh: dict) -> str:
    return ", ".join(f"{label} {_pct(sh[n])}" for n, label in zip(BRANCH_NAMES, BRANCH_LABELS))


def _steps_text(steps: list) -> str:
    """0, 1, 2, 5, 6 -> "0-2, 5-6" (step indices; None where a step had none)."""
    out, run = [], []
    for k in steps:
        if run and isinstance(k, int) and isinstance(run[-1], int) and k == run[-1] + 1:
            run.append(k)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [k]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _per_step(steps: list[dict], most: int = 10) -> str:
    """Each compared step's agreement, or for a long run its range (the JSON has every step)."""
    if len(steps) <= most:
        return ", ".join(f"{s['step']}: {_pct(s['agreement'])}" for s in steps)
    lo = min(steps, key=lambda s: s["agreement"])
    hi = max(steps, key=lambda s: s["agreement"])
    return f"lowest {_pct(lo['agreement'])} (step {lo['step']}), highest {_pct(hi['agreement'])} (step {hi['step']})"


def summary_text(report: dict) -> str:
    """A few human-readable lines of a report (build_report's keys, plus "official_router" /
    "training_free" descriptions and "file" when the node adds them)."""
    steps = [s for s in report["steps"] if s["compared"]]
    skipped = len(report["steps"]) - len(steps)
    m = report["tau_match"]
    lo, hi = m["tau_range"]
    lines = [
        f"VORTA calibration: training-free (tau {report['tau']:g}) vs official router"
        + (f" ({report['official_router']['describe']})" if "official_router" in report else ""),
        f"compared {len(steps)} steps (" + _steps_text([s["step"] for s in steps]) + f"), {report['cells']} cells"
        + (f"; {skipped} steps not compared (warm-up / measured / skipped)" if skipped else ""),
        f"agreement {_pct(report['agreement'])}; per step: " + _per_step(steps),
        f"official mix:      {_mix(report['shares']['official'])}",
        f"training-free mix: {_mix(report['shares']['training_free'])}",
        f"closest tau {m['tau']:g}" + (f" (same decisions up to {hi:g})" if hi != lo else "")
        + f": {_mix(m['shares'])}; mix distance {m['distance']:.3f}, agreement {_pct(m['agreement'])}",
        f"most agreeing tau {report['tau_best_agreement']['tau']:g}: agreement "
        f"{_pct(report['tau_best_agreement']['agreement'])}, mix distance {report['tau_best_agreement']['distance']:.3f}",
        "confusion (rows official, columns training-free; " + " / ".join(BRANCH_LABELS) + "): "
        + "; ".join(" ".join(str(v) for v in row) for row in report["confusion"]["matrix"]),
    ]
    if report.get("executed_differs"):
        lines.append(f"note: {report['executed_differs']} compared cells ran otherwise than the sweep decides them at "
                     f"tau {report['tau']:g} (a first measurement routes its own step without hysteresis)")
    if "file" in report:
        lines.append(f"saved {report['file']}")
    return "\n".join(lines)


# ---- reading a patched model ---------------------------------------------------------------------------


def _model_dtype_device(model, dm):
    dtype = model.model.get_dtype() if hasattr(model.model, "get_dtype") else torch.float32
    if getattr(model.model, "manual_cast_dtype", None) is not None:
        dtype = model.model.manual_cast_dtype
    try:
        device = next(dm.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    return dtype, device


def router_setting(provider, name: str, default=None):
    """A measuring router's setting (tau, dense_block0, hysteresis): on the provider, or on the
    saved measured table a loaded one reads."""
    if hasattr(provider, name):
        return getattr(provider, name)
    return getattr(getattr(provider, "measured", None), name, default)


def _step_context(state, run, rec, dm, dtype, device, grid):
    """The context the step was routed with, rebuilt after the run: the run's last context (it holds
    the sampler's schedule) moved to this step, or one made from the state where there is none."""
    import dataclasses

    last = getattr(run, "last_context", None)
    percent = run.percent_of(rec.sigma) if run.percent_of is not None else None
    schedule = getattr(last, "schedule", None)
    if percent is None and schedule is not None and rec.step is not None and rec.step < len(schedule):
        percent = schedule[rec.step]
    if last is not None and dataclasses.is_dataclass(last):
        fields = {f.name for f in dataclasses.fields(last)}
        changes = {"timestep": rec.timestep, "sigma": rec.sigma, "percent": percent}
        if "step" in fields:
            changes["step"] = rec.step
        return dataclasses.replace(last, **changes), percent
    return state.step_context(dm, rec.timestep, dtype, device, rec.sigma, percent, grid, run.weights), percent


def collect_steps(model, official_router):
    """Both routers' tables for every step of a patched model's last run.

    model: a ModelPatcher patched by VORTA Apply with a measuring router (the training-free
    router), after it sampled. official_router: what the Router Loader gives (a RouterSet) or a
    file-router provider. Returns (steps [CalibrationStep], costs [N_BRANCHES], context dict:
    state, run, provider, official provider, grid, cfg). A ValueError says what to connect
    otherwise.

    A step's errors: those its record kept (StepRecord.scores), else the router's measured errors
    for the step's context (a step that was being measured had none when it was recorded). A step
    that ran dense while it was measured (its table all full where its errors decide some sparse
    branch) is not compared: nothing was decided there."""
    from vorta_ops.router import RouterSet

    from .patch import STATE_KEY, VortaState
    from .providers import FileRouterProvider

    state = model.model_options.get("transformer_options", {}).get(STATE_KEY)
    if not isinstance(state, VortaState):
        raise ValueError("the model is not patched by VORTA Apply: connect the MODEL output of VORTA Apply "
                         "(with the VORTA Training-Free Router as its router)")
    provider = state.provider
    if not hasattr(provider, "measured_errors"):
        raise ValueError(f"the model is patched with {provider.describe()}, not a measuring router: connect "
                         f"the VORTA Training-Free Router to VORTA Apply to calibrate it against the official router")
    if isinstance(official_router, RouterSet):
        official = FileRouterProvider(official_router, state.options.tau_sparse)
    elif isinstance(official_router, FileRouterProvider):
        official = official_router
    else:
        raise ValueError("official_router must be a router file from VORTA Router Loader (an official router.pt or "
                         f"a trained .safetensors), got {getattr(official_router, 'kind', type(official_router).__name__)}")
    try:
        official.check_fits(state.spec)
    except ValueError as e:
        raise ValueError(f"official router: {e}") from None
    run = state.last_run
    if run is None or not run.steps:
        raise ValueError("the patched model has not sampled yet: connect the sampler's LATENT output to this node's "
                         "'latent' input so it runs after the sampler")
    grids = {p.grid for p in run.plans.values()}
    if not grids:
        raise ValueError("no step of the last run was set up for routing (see the log's VORTA warnings)")
    if len(grids) > 1:
        raise ValueError(f"the last run sampled several latent sizes {sorted(grids)}; calibrate one size per run")
    (grid,) = grids
    cfg = state.routed_config(grid)
    costs = branch_costs(cfg, grid)
    tau = router_setting(provider, "tau", float("nan"))
    dm = model.model.diffusion_model
    dtype, device = _model_dtype_device(model, dm)
    forced_blocks = set(state.options.dense_blocks)
    if router_setting(provider, "dense_block0", False):
        forced_blocks.add(0)
    steps = []
    for rec in sorted(run.steps.values(), key=lambda r: -r.sigma):
        s = CalibrationStep(rec.step, rec.sigma, rec.timestep, rec.table.long())
        steps.append(s)
        ctx, percent = _step_context(state, run, rec, dm, dtype, device, grid)
        scores = getattr(rec, "scores", None)
        errors = scores[1] if scores is not None and scores[0] == "error" else None
        if errors is None and rec.calls:
            try:
                errors = provider.measured_errors(ctx)
            except Exception:  # a context the router cannot place: no errors for this step
                errors = None
        if not rec.calls:
            s.why = "no attention ran (a cache reused the step)"
            continue
        if errors is None:
            s.why = "no measured errors (warm-up, or a step the router runs dense)"
            continue
        if state.is_dense_step(percent):
            s.why = "dense step (VORTA Apply's dense start / end)"
            continue
        errors = errors.detach().to("cpu", torch.float32)
        forced = torch.zeros(rec.table.shape, dtype=torch.bool)
        for b in forced_blocks:
            forced[b] = True
        cells = compared_cells(errors, forced)
        if not bool(cells.any()):
            s.why = "every head forced dense or unmeasured"
            continue
        if math.isfinite(tau):
            decided = decide_from_errors(errors, tau, costs)
            if bool((s.executed[cells] == FULL).all()) and bool((decided[cells] != FULL).any()):
                s.why = "measured (it ran dense while its heads were measured)"
                continue
        s.errors, s.forced = errors, forced
        s.official = official.table(ctx).long()
    if not any(s.compared for s in steps):
        raise ValueError(
            "the last run has no step routed from measured errors (every step was warm-up or being measured): "
            "sample more steps than the Training-Free Router's spans (bins), or lower its warm-up")
    return steps, costs, {"state": state, "run": run, "provider": provider, "official": official, "grid": grid,
                          "cfg": cfg, "tau": tau, "hysteresis": float(router_setting(provider, "hysteresis", 0.0) or 0.0)}
