"""VORTA Gate Visualizer: per block x head branch choices by step, as an IMAGE and a summary.

"predicted": computed from the router and the schedule (routing depends only on the timestep).
"last run": what the patched model actually executed in its latest sampling run.
"""
from __future__ import annotations

from typing import NamedTuple

import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io, ui

from vorta_ops.router import FULL
from vorta_ops.viz import render_decisions, step_label as _label

from .gate_data import summarize, web_payload
from .models import inspect_model
from .providers import as_provider
from .patch import STATE_KEY, VortaOptions, VortaState, sampling_percent, step_scores
from .router_loader import Router

MODES = ("predicted", "last run")


class GateView(NamedTuple):
    """What the gate view shows: the tables, and why (where the router can say)."""
    tables: torch.Tensor  # int8 [steps, blocks, heads]
    labels: list
    title: str
    score_kind: str | None = None  # "probability" (file router), "error" (training-free) or None
    scores: list | None = None  # per step: float [blocks, heads, branches] or None
    tau: float | None = None  # the training-free router's error threshold


def _score_kind(scores) -> str | None:
    kinds = {s[0] for s in scores if s is not None}
    return kinds.pop() if len(kinds) == 1 else None


def _split(scores: list) -> tuple[str | None, list | None]:
    """[(kind, tensor) or None per step] -> (kind, [tensor or None per step]); a run whose steps
    disagree on the kind (it cannot happen with one provider) shows no scores."""
    kind = _score_kind(scores)
    if kind is None:
        return None, None
    return kind, [s[1] if s is not None and s[0] == kind else None for s in scores]


def gate_tables(model, router=None, sigmas=None, steps=20, scheduler="simple", mode="predicted"):
    """-> (tables int8 [steps, blocks, heads], labels, title). gate_view has the scores too."""
    v = gate_view(model, router, sigmas, steps, scheduler, mode)
    return v.tables, v.labels, v.title


def gate_view(model, router=None, sigmas=None, steps=20, scheduler="simple", mode="predicted") -> GateView:
    """The tables of gate_tables plus, per step, the scores behind them: "last run" from what each
    step recorded (StepRecord.scores), "predicted" from the router for the same step context the
    table is computed from (nodes.patch.step_scores). tau: the training-free router's."""
    state = model.model_options.get("transformer_options", {}).get(STATE_KEY)
    state = state if isinstance(state, VortaState) else None
    if state is None and router is None:
        # VORTA Apply switched off (it hands the model on untouched) or not in the graph: the model
        # runs full attention everywhere. Show that rather than failing the workflow.
        spec = inspect_model(model.model.diffusion_model)
        n = max(sigmas.numel() - 1, 1) if sigmas is not None else steps
        table = torch.full((n, spec.blocks, spec.heads), FULL, dtype=torch.int8)
        return GateView(table, [f"step {i}" for i in range(n)], "VORTA not applied (off or not connected): full attention")
    provider = state.provider if router is None else router
    measuring = hasattr(provider, "profile_request")
    if measuring and mode == "predicted":
        # a training-free router decides while it samples: nothing to predict before a run
        if state is not None and state.last_run is not None and any(r.calls for r in state.last_run.steps.values()):
            mode = "last run"
        else:
            spec = inspect_model(model.model.diffusion_model)
            n = max(sigmas.numel() - 1, 1) if sigmas is not None else steps
            table = torch.full((n, spec.blocks, spec.heads), FULL, dtype=torch.int8)
            return GateView(table, [f"step {i}" for i in range(n)], "training-free router: it decides while sampling (run once)")
    if mode == "last run":
        if state is None or state.last_run is None or not state.last_run.steps:
            raise ValueError(
                "'last run' needs the MODEL output of VORTA Apply after it has sampled: connect the "
                "patched model and the sampler's LATENT (so this node runs after it), or use 'predicted'"
            )
        recs = sorted((r for r in state.last_run.steps.values() if r.calls), key=lambda r: -r.sigma)
        if not recs:
            # the model sampled but no video self-attention reached VORTA (e.g. an override marked
            # as VORTA's replaced it): what ran was dense everywhere; show that, say why
            recs = sorted(state.last_run.steps.values(), key=lambda r: -r.sigma)
            table = torch.full_like(recs[0].table, FULL)
            return GateView(torch.stack([table for _ in recs]), [_label(r.step, r.sigma) for r in recs],
                            "VORTA last run: no video self-attention reached VORTA, all dense (see the log)")
        skipped = sum(1 for r in state.last_run.steps.values() if not r.calls)
        title = "VORTA executed routing" + (f" ({skipped} steps reused from a cache not shown)" if skipped else "")
        kind, scores = _split([getattr(r, "scores", None) for r in recs])
        return GateView(torch.stack([r.table for r in recs]), [_label(r.step, r.sigma) for r in recs], title,
                        kind, scores, _tau(state.provider, kind))
    dm = model.model.diffusion_model
    spec = inspect_model(dm)
    if router is None:
        provider, options = state.provider, state.options
    else:
        options = state.options if state is not None else VortaOptions()
        provider = as_provider(router, options.tau_sparse)
        provider.check_fits(spec)
    ms = model.get_model_object("model_sampling")
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
    sigmas = sigmas.reshape(-1).float().cpu()
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError(f"need at least 2 sigmas (1 step), got {len(sigmas)}")
    vs = VortaState(provider, spec, options)
    dtype = model.model.get_dtype() if hasattr(model.model, "get_dtype") else torch.float32
    if getattr(model.model, "manual_cast_dtype", None) is not None:
        dtype = model.model.manual_cast_dtype
    device = next(dm.parameters()).device
    tables, labels, scores = [], [], []
    for i in range(n):
        sigma = float(sigmas[i])
        t = float(ms.timestep(sigmas[i : i + 1]).reshape(-1)[0])
        pct = sampling_percent(ms, sigma)
        pct = pct if pct is not None else i / n
        ctx = vs.step_context(dm, t, dtype, device, sigma, pct)
        tables.append(vs.apply_overrides(vs.provider.table(ctx), pct))
        scores.append(step_scores(vs.provider, ctx))
        labels.append(_label(i, sigma))
    kind, scores = _split(scores)
    return GateView(torch.stack(tables), labels, "VORTA predicted routing", kind, scores, _tau(vs.provider, kind))


def _tau(provider, kind) -> float | None:
    tau = getattr(provider, "tau", None) if kind == "error" else None
    return float(tau) if isinstance(tau, (int, float)) else None



class VortaGateVisualizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaGateVisualizer",
            display_name="VORTA Gate Visualizer",
            category="model_patches/vorta",
            description="Shows which branch (full / core-set / sliding tile) each block and head uses at each step.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A model patched by VORTA Apply, or the plain model plus a router."),
                io.Combo.Input("mode", options=list(MODES), default="predicted",
                               tooltip="predicted: from router and schedule; last run: what the patched model executed."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Schedule length when no sigmas are connected."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple"),
                Router.Input("router", optional=True),
                io.Sigmas.Input("sigmas", optional=True, tooltip="The sampler's sigmas; overrides steps and scheduler."),
                io.Latent.Input("latent", optional=True, tooltip="Connect the sampler's output so 'last run' runs after it."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, mode, **_):
        return float("nan") if mode == "last run" else None  # last run changes with every sampling

    @classmethod
    def execute(cls, model, mode, steps, scheduler, router=None, sigmas=None, latent=None) -> io.NodeOutput:
        v = gate_view(model, router, sigmas, steps, scheduler, mode)
        img = render_decisions(v.tables, v.labels, title=v.title)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        text = summarize(v.tables, v.labels, v.score_kind, v.scores)
        payload = web_payload(v.tables, v.labels, v.score_kind, v.scores, v.tau)
        ui_out = {**ui.PreviewImage(image, cls=cls).as_dict(), "text": (text,), "vorta_gates": [payload]}
        return io.NodeOutput(image, text, ui=ui_out)
