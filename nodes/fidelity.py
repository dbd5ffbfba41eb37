"""VORTA Fidelity Check: sample the user's own graph twice on one seed, once dense (the model with
VORTA's patch taken off, on a clone) and once routed (the patched model as given), and report how
far the routed denoised predictions are from the dense ones, step by step, with the time of each.

The routed pass is exactly what a KSampler with the same inputs runs (ComfyUI's comfy.sample.sample
with the same noise), so the routed LATENT can replace that KSampler. The dense pass runs first; the
routed one last, so the Gate Visualizer's 'last run' after this node shows the routed run.
`steps_to_check` < steps stops the dense pass after that many steps (the routed pass always runs
the whole schedule); the PSNR is then of the last checked step's x0.
"""
from __future__ import annotations

import logging
import time

import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io, ui

from .fidelity_data import (FidelityReport, PassClock, StepRow, cosine, psnr, rel_l2, render_plot, summary_text,
                            vorta_state_of, web_payload, without_vorta)

log = logging.getLogger("vorta")

class _Enough(Exception):
    """Raised by the dense pass's callback after its last checked step (stops the sampler)."""


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def _latent_in(model, latent: dict) -> torch.Tensor:
    import comfy.sample

    img = latent["samples"]
    ratio = latent.get("downscale_ratio_spacial")
    if ratio is not None:  # newer ComfyUI (nodes.common_ksampler passes it)
        return comfy.sample.fix_empty_latent_channels(model, img, ratio)
    return comfy.sample.fix_empty_latent_channels(model, img)


def _sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise, on_step):
    """nodes.common_ksampler with our step callback next to ComfyUI's preview / progress one."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent_image = _latent_in(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    preview = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps):
        stop = on_step(step, x0, x, total_steps)
        preview(step, x0, x, total_steps)
        if stop:
            raise _Enough

    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
                               disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


def _sigmas(model, steps, sampler_name, scheduler, denoise) -> list[float] | None:
    try:
        k = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                    scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        return [float(s) for s in k.sigmas.reshape(-1)]
    except Exception:
        log.debug("VORTA fidelity: no sigmas for the table", exc_info=True)
        return None


def fidelity_check(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise=1.0,
                   steps_to_check=0):
    """-> (routed latent dict, FidelityReport)."""
    state = vorta_state_of(model)
    steps, steps_to_check = int(steps), int(steps_to_check or 0)
    if steps_to_check < 0 or steps_to_check > steps:
        raise ValueError(f"VORTA Fidelity Check: steps_to_check is {steps_to_check}; use 0 (all) or 1..{steps} (steps)")
    sigmas = _sigmas(model, steps, sampler_name, scheduler, denoise)
    n_sched = len(sigmas) - 1 if sigmas else steps
    if n_sched < 1:
        raise ValueError(f"VORTA Fidelity Check: denoise {denoise} samples no step; nothing to compare")
    n_check = min(steps_to_check or n_sched, n_sched)
    last = n_check - 1
    args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise)

    dense_x0: dict[int, torch.Tensor] = {}
    dclock = PassClock()

    def dense_step(step, x0, x, total):
        _sync(x0)
        dclock.mark(step)
        with dclock.excluding():
            if step <= last:
                dense_x0[step] = x0.detach().to("cpu", torch.float32, copy=True)
        return step >= last and n_check < total  # the last checked step: stop the dense pass

    dense_model = without_vorta(model)
    dclock.start()
    dense_out = None
    try:
        dense_out = _sample(dense_model, *args, dense_step)
    except _Enough:
        pass
    if not dense_x0:
        raise ValueError("VORTA Fidelity Check: the sampler reported no step (no callback); nothing to compare")

    rows: list[StepRow] = []
    rclock = PassClock()
    routed_last: list[torch.Tensor] = []

    def routed_step(step, x0, x, total):
        _sync(x0)
        rclock.mark(step)
        with rclock.excluding():
            ref = dense_x0.get(step)
            if ref is None or step > last:
                return
            got = x0.detach().to("cpu", torch.float32)
            sigma = sigmas[step] if sigmas and step < len(sigmas) else None
            rows.append(StepRow(int(step), sigma, rel_l2(got, ref), cosine(got, ref)))
            if step == last:
                routed_last.append(got.clone())

    t0 = time.perf_counter()
    rclock.start()
    routed_out = _sample(model, *args, routed_step)
    routed_total = time.perf_counter() - t0

    full = n_check >= n_sched and dense_out is not None
    if full:
        p, peak = psnr(routed_out, dense_out)
    else:
        p, peak = psnr(routed_last[0], dense_x0[last]) if routed_last else (float("nan"), 1.0)
    run = state.last_run
    vorta_summary = ""
    try:
        vorta_summary = "routed run: " + run.summary() if run is not None else ""
    except Exception:
        log.debug("VORTA fidelity: no run summary", exc_info=True)
    setting = (f"seed {seed}, {sampler_name} / {scheduler}, {steps} steps, cfg {cfg:g}, denoise {denoise:g}, "
               f"latent {'x'.join(str(d) for d in routed_out.shape)}")
    notes = []
    if len(rows) < n_check:
        notes.append(f"only {len(rows)} of {n_check} steps could be compared (the sampler called back fewer times)")
    report = FidelityReport(
        rows, n_sched, p, peak, full,
        dense_seconds=dclock.seconds(last), routed_seconds=rclock.seconds(last),
        dense_per_step=dclock.per_step(last), routed_per_step=rclock.per_step(last),
        routed_total_seconds=routed_total, setting=setting, vorta_summary=vorta_summary, notes=notes)
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = routed_out
    return out, report


class VortaFidelityCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VortaFidelityCheck",
            display_name="VORTA Fidelity Check",
            category="model_patches/vorta",
            description=(
                "Samples like a KSampler twice on the same seed: dense (VORTA taken off, on a copy) and routed. Reports "
                "per step the relative L2 error and cosine of the routed denoised prediction against the dense one, the "
                "final latent's PSNR and the time of each pass: the cost of the speed on this prompt and these "
                "weights. Outputs the routed LATENT, so it can stand in for the KSampler."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of VORTA Apply (after any other patch nodes)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed, the same for both passes."),
                io.Int.Input("steps", default=8, min=1, max=200),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Int.Input("steps_to_check", default=0, min=0, max=200,
                             tooltip="0: compare every step. N: stop the dense pass after the first N steps (saves time); "
                                     "the routed pass still runs them all."),
            ],
            outputs=[
                io.Latent.Output(display_name="routed_latent", tooltip="The routed result (what a KSampler would give)."),
                io.String.Output(display_name="report"),
                io.Image.Output(display_name="plot"),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
                steps_to_check=0) -> io.NodeOutput:
        out, report = fidelity_check(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                                     denoise, steps_to_check)
        text = summary_text(report)
        log.info("%s", text)
        img = render_plot(report)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        ui_out = {**ui.PreviewImage(image, cls=cls).as_dict(), "text": (text,), "vorta_fidelity": [web_payload(report)]}
        return io.NodeOutput(out, text, image, ui=ui_out)
