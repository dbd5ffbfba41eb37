"""VORTA Fidelity Check, the part without ComfyUI: how far a routed run is from the dense run on the
same seed (per step relative L2 and cosine of the denoised prediction x0, PSNR of the final latent),
the time of each pass, the text report and the plot (Pillow, like vorta_ops.viz).

Definitions (also printed in the report):
  relative L2   ||routed - dense|| / ||dense||   (0 when equal; inf when dense is all zero and routed not)
  cosine        <routed, dense> / (||routed|| ||dense||)   (1 when equal, also for two zero tensors)
  PSNR          10 log10(peak^2 / mean((routed - dense)^2)) with peak = max - min of the dense latent
                (1 when the dense latent is constant); inf when the two are equal
All are computed in float64 over every element (batch, channels, frames, height, width).

without_vorta: the dense model of the check, a clone of the patched ModelPatcher with VORTA's patch
taken off (nodes.patch imports no ComfyUI either).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont

from .patch import BLOCK_KEY, DIFFUSION_MODEL, FORWARD_KEY, OUTER_SAMPLE, OVERRIDE_KEY, STATE_KEY, WRAPPER_KEY, VortaState

__all__ = ["FidelityReport", "PassClock", "PlotLayout", "StepRow", "cosine", "layout_plot", "psnr", "rel_l2",
           "render_plot", "summary_text", "vorta_state_of", "web_payload", "without_vorta"]


NOT_PATCHED = ("VORTA Fidelity Check: this model carries no VORTA patch; connect the MODEL output of VORTA Apply "
               "(with enabled on)")


def vorta_state_of(model) -> VortaState:
    """The VortaState a model patched by VORTA Apply carries; ValueError(NOT_PATCHED) otherwise."""
    opts = getattr(model, "model_options", None)
    to = opts.get("transformer_options", {}) if isinstance(opts, dict) else {}
    state = to.get(STATE_KEY) if isinstance(to, dict) else None
    if not isinstance(state, VortaState):
        raise ValueError(NOT_PATCHED)
    return state


def without_vorta(model):
    """A clone of a VORTA-patched ModelPatcher with VORTA's patch taken off: no state, VORTA's
    attention override replaced by the one it chained to (or none), its wrappers removed, its block
    patches removed (a block patch another node set before Apply is put back). The model given is
    not changed. An override that a node after Apply set stays (it is not VORTA's); VORTA's own
    override, if such a node chains to it, finds no VORTA run and hands every call on unrouted."""
    state = vorta_state_of(model)
    m = model.clone()
    to = dict(m.model_options.get("transformer_options", {}))
    for key in (STATE_KEY, FORWARD_KEY, BLOCK_KEY):
        to.pop(key, None)
    override = to.get(OVERRIDE_KEY)
    if getattr(override, "vorta_state", None) is state:
        if state.prev_override is None:
            to.pop(OVERRIDE_KEY)
        else:
            to[OVERRIDE_KEY] = state.prev_override
    replace = to.get("patches_replace")
    if isinstance(replace, dict) and isinstance(replace.get("dit"), dict):
        dit = {}
        for k, fn in replace["dit"].items():
            if getattr(fn, "vorta_index", None) is None:
                dit[k] = fn
            elif getattr(fn, "vorta_previous", None) is not None:
                dit[k] = fn.vorta_previous
        replace = {k: v for k, v in replace.items() if k != "dit"}
        if dit:
            replace["dit"] = dit
        if replace:
            to["patches_replace"] = replace
        else:
            to.pop("patches_replace")
    m.model_options = dict(m.model_options)
    m.model_options["transformer_options"] = to
    for kind in (OUTER_SAMPLE, DIFFUSION_MODEL):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return m


def _pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"cannot compare latents of shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    return x.detach().reshape(-1).to("cpu", torch.float64), ref.detach().reshape(-1).to("cpu", torch.float64)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||: 0 for equal tensors, inf when ref is zero and x is not."""
    a, b = _pair(x, ref)
    diff = float(torch.linalg.vector_norm(a - b))
    if diff == 0.0:
        return 0.0
    norm = float(torch.linalg.vector_norm(b))
    return diff / norm if norm > 0 else math.inf


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors: 1 for equal tensors (two zero tensors too), 0
    when exactly one of them is zero."""
    a, b = _pair(x, ref)
    if torch.equal(a, b):
        return 1.0
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(torch.dot(a, b)) / (na * nb)))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB of x against ref, the peak used): peak = max - min of ref (1 if ref is constant);
    inf when x equals ref."""
    a, b = _pair(x, ref)
    peak = float(b.max() - b.min()) if b.numel() else 0.0
    if not peak > 0:
        peak = 1.0
    mse = float(torch.mean((a - b) ** 2)) if a.numel() else 0.0
    if mse == 0.0:
        return math.inf, peak
    if not math.isfinite(mse):
        return -math.inf if mse == math.inf else math.nan, peak
    return 10.0 * math.log10(peak * peak / mse), peak


class PassClock:
    """Time of one sampling pass, read at each step callback, with the time spent inside the
    callbacks (copies, comparisons, previews) taken out. marks[step] = seconds from the start of the
    pass to the callback of that step (that step's model calls included)."""

    def __init__(self, now=time.perf_counter):
        self.now = now
        self.t0: float | None = None
        self.excluded = 0.0
        self.marks: dict[int, float] = {}

    def start(self) -> None:
        self.t0, self.excluded, self.marks = self.now(), 0.0, {}

    def mark(self, step: int) -> None:
        self.marks[int(step)] = self.now() - self.t0 - self.excluded

    @contextmanager
    def excluding(self):
        t = self.now()
        try:
            yield
        finally:
            self.excluded += self.now() - t

    def seconds(self, upto: int) -> float | None:
        """Time to the callback of step `upto` (steps 0..upto, the first step's warm-up included)."""
        return self.marks.get(upto)

    def per_step(self, upto: int) -> float | None:
        """Mean time of steps 1..upto (from callback 0 to callback `upto`): no model loading, no
        first-step warm-up. None with fewer than two steps."""
        if upto < 1 or 0 not in self.marks or upto not in self.marks:
            return None
        return (self.marks[upto] - self.marks[0]) / upto


@dataclass
class StepRow:
    step: int
    sigma: float | None
    rel_l2: float
    cosine: float


@dataclass
class FidelityReport:
    rows: list[StepRow]
    steps: int  # the sampler's steps
    psnr: float
    peak: float
    final_is_output: bool  # PSNR of the final latents (all steps checked) or of the last checked step's x0
    dense_seconds: float | None = None  # to the last checked step's callback
    routed_seconds: float | None = None
    dense_per_step: float | None = None  # steps 1..last checked
    routed_per_step: float | None = None
    routed_total_seconds: float | None = None  # the whole routed pass
    setting: str = ""  # seed, sampler, scheduler, cfg, ... as one line
    vorta_summary: str = ""  # the routed run's head-call shares (VortaRun.summary)
    notes: list[str] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return len(self.rows)

    @property
    def time_ratio(self) -> float | None:
        """Routed time / dense time for the checked steps (per step from step 1 on when there are
        two or more checked steps, else the totals)."""
        for r, d in ((self.routed_per_step, self.dense_per_step), (self.routed_seconds, self.dense_seconds)):
            if r is not None and d is not None and d > 0:
                return r / d
        return None

    @property
    def time_basis(self) -> str:
        if self.routed_per_step is not None and self.dense_per_step is not None and self.dense_per_step > 0:
            return "per step from step 1 on (no model loading, no first-step warm-up)"
        return "total of the checked steps (model loading and warm-up included)"


def _num(v: float, fmt: str) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def psnr_text(report: FidelityReport) -> str:
    what = ("final latent" if report.final_is_output
            else f"predicted clean latent (x0) at step {report.rows[-1].step} (the last checked step)")
    if math.isinf(report.psnr) and report.psnr > 0:
        return f"PSNR of the {what}: inf (routed equals dense)"
    return f"PSNR of the {what}: {_num(report.psnr, '.2f')} dB (peak = max - min of the dense latent = {report.peak:.4g})"


def summary_text(report: FidelityReport) -> str:
    """The node's STRING output: setting, per-step table, PSNR, times."""
    lines = [f"VORTA fidelity check: routed vs dense on the same seed, {report.checked} of {report.steps} steps checked"]
    if report.setting:
        lines.append(report.setting)
    lines.append("For this prompt, these weights, this size and this seed only: another prompt or resolution can differ.")
    lines.append("")
    lines.append(f"{'step':>4}  {'sigma':>9}  {'rel L2 (x0)':>12}  {'cosine (x0)':>12}")
    for r in report.rows:
        sig = _num(r.sigma, ".4f") if r.sigma is not None else "-"
        rel = "0" if r.rel_l2 == 0 else _num(r.rel_l2, ".4e")
        cos = "1" if r.cosine == 1.0 else _num(r.cosine, ".8f")
        lines.append(f"{r.step:>4}  {sig:>9}  {rel:>12}  {cos:>12}")
    finite = [r.rel_l2 for r in report.rows if math.isfinite(r.rel_l2)]
    if finite:
        worst = max(report.rows, key=lambda r: r.rel_l2 if math.isfinite(r.rel_l2) else -1)
        lines.append(f"mean rel L2 {sum(finite) / len(finite):.4g}, worst {worst.rel_l2:.4g} at step {worst.step}; "
                     f"lowest cosine {min(r.cosine for r in report.rows):.8g}")
    lines.append("")
    lines.append(psnr_text(report))
    t = f"time of the {report.checked} checked steps: dense {_secs(report.dense_seconds)}, routed {_secs(report.routed_seconds)}"
    if report.dense_per_step is not None and report.routed_per_step is not None:
        t += f"; per step from step 1 on: dense {_secs(report.dense_per_step)}, routed {_secs(report.routed_per_step)}"
    lines.append(t)
    ratio = report.time_ratio
    if ratio is not None and ratio > 0:
        lines.append(f"routed / dense time: {ratio:.3f} ({1 / ratio:.2f}x speed-up), {report.time_basis}")
    if report.routed_total_seconds is not None and report.checked < report.steps:
        lines.append(f"the routed pass ran all {report.steps} steps (its LATENT is the full result) in "
                     f"{_secs(report.routed_total_seconds)}; the dense pass stopped after step {report.rows[-1].step}")
    if report.vorta_summary:
        lines.append(report.vorta_summary)
    lines.extend(report.notes)
    lines.append("x0 = the sampler's denoised prediction at each step; rel L2 = ||routed - dense|| / ||dense||.")
    return "\n".join(lines)


def _json_num(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None if v is None else str(v)  # "inf" / "-inf" / "nan": valid JSON for every client
    return float(v)


def web_payload(report: FidelityReport) -> dict:
    """The numbers of the report as plain JSON (non-finite values as strings)."""
    return {
        "steps": [r.step for r in report.rows],
        "sigmas": [_json_num(r.sigma) for r in report.rows],
        "rel_l2": [_json_num(r.rel_l2) for r in report.rows],
        "cosine": [_json_num(r.cosine) for r in report.rows],
        "psnr": _json_num(report.psnr),
        "peak": _json_num(report.peak),
        "final_is_output": report.final_is_output,
        "dense_seconds": _json_num(report.dense_seconds),
        "routed_seconds": _json_num(report.routed_seconds),
        "time_ratio": _json_num(report.time_ratio),
        "total_steps": report.steps,
    }


# ---- plot ------------------------------------------------------------------------------------

_BG, _FG, _MUTED, _GRID = (255, 255, 255), (20, 20, 20), (100, 100, 100), (222, 222, 222)
_LINE_COLOURS = ((200, 60, 40), (40, 100, 200))  # rel L2, cosine
_W, _PANEL_H, _MARGIN, _GAP = 640, 170, 12, 22
_SIZE_TITLE, _SIZE_TEXT, _SIZE_TICK = 16, 12, 11
_MAX_X_TICKS = 12


@dataclass
class TextBox:
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: every inked pixel of the text
    kind: str  # title | subtitle | panel_title | y_tick | x_tick | x_label
    xy: tuple[float, float] = (0.0, 0.0)  # where it is drawn (Pillow's default anchor)


@dataclass
class Panel:
    box: tuple[int, int, int, int]  # the plotting area x0, y0, x1, y1
    title: str
    lo: float
    hi: float
    y_ticks: list[tuple[float, int]]  # (value, y pixel)
    x_ticks: list[tuple[int, int]]  # (step, x pixel)
    points: list[tuple[int, float, float]]  # (step, x pixel, y pixel) of every finite value
    colour: tuple[int, int, int]


@dataclass
class PlotLayout:
    width: int
    height: int
    panels: list[Panel]
    texts: list[TextBox]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


_DRAW = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _text_box(font, x: float, y: float, s: str) -> tuple[int, int, int, int]:
    b = _DRAW.textbbox((x, y), s, font=font)
    return int(math.floor(b[0])), int(math.floor(b[1])), int(math.ceil(b[2])), int(math.ceil(b[3]))


def _tb(font, x: float, y: float, s: str, kind: str) -> TextBox:
    return TextBox(s, _text_box(font, x, y, s), kind, (x, y))


def _text_h(font) -> int:
    b = _DRAW.textbbox((0, 0), "Ag0.9", font=font)
    return int(math.ceil(b[3]))


def _nice_step(span: float, n: int = 4) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _axis(lo: float, hi: float) -> tuple[float, float, list[float], float]:
    """A range with round ticks that holds [lo, hi] (lo < hi)."""
    step = _nice_step(hi - lo)
    a, b = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    if b <= a:
        b = a + step
    n = int(round((b - a) / step))
    return a, b, [a + i * step for i in range(n + 1)], step


def _tick_text(v: float, step: float) -> str:
    if step >= 1:
        return f"{v:.0f}"
    if step < 1e-4 and abs(v) < 1e-3:  # tiny errors: scientific
        return "0" if v == 0 else f"{v:.1e}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1  # 2.5, 0.25 ...
    return f"{v:.{decimals}f}"


def _range_of(values: list[float], kind: str) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if kind == "rel_l2":
        hi = max(vals, default=0.0)
        return 0.0, hi * 1.1 if hi > 0 else 1e-6
    lo = min(vals, default=1.0)
    hi = max(vals, default=1.0)
    if hi >= lo and hi - lo < 1e-9:  # all equal (typically all 1)
        return min(lo, 1.0) - 1e-6, max(hi, 1.0)
    pad = (hi - lo) * 0.1
    return lo - pad, min(1.0, hi + pad) if hi < 1.0 else hi


def _panel_axis(values: list[float], kind: str):
    """(lo, hi, ticks, tick step) of a panel; cosine never shows ticks above 1 it cannot reach."""
    lo, hi, ticks, tstep = _axis(*_range_of(values, kind))
    if kind == "cosine" and hi > 1.0 and lo < 1.0 and max((v for v in values if math.isfinite(v)), default=1.0) <= 1.0:
        hi = 1.0
        ticks = [t for t in ticks if t <= 1.0 + 1e-12]
    return lo, hi, ticks, tstep


_PANELS = (("rel_l2", "relative L2 error of x0 (0 = identical)", _LINE_COLOURS[0]),
           ("cosine", "cosine similarity of x0 (1 = identical)", _LINE_COLOURS[1]))


def layout_plot(report: FidelityReport, width: int = _W) -> PlotLayout:
    """Where everything of the plot goes (pixels); render_plot paints it."""
    ft, fx, fk = _font(_SIZE_TITLE), _font(_SIZE_TEXT), _font(_SIZE_TICK)
    texts: list[TextBox] = []
    y = _MARGIN
    title = "VORTA fidelity: routed vs dense, same seed (this prompt and weights)"
    texts.append(_tb(ft, _MARGIN, y, title, "title"))
    y = texts[-1].box[3] + 4
    ratio = report.time_ratio
    where = "final latent" if report.final_is_output else (f"x0 at step {report.rows[-1].step}" if report.rows else "-")
    peak_db = "inf" if math.isinf(report.psnr) and report.psnr > 0 else _num(report.psnr, ".2f") + " dB"
    sub = (f"PSNR {peak_db} ({where})   |   routed/dense time {f'{ratio:.3f}' if ratio else '-'}"
           f"   |   {report.checked} of {report.steps} steps checked")
    texts.append(_tb(fx, _MARGIN, y, sub, "subtitle"))
    y = texts[-1].box[3] + 10
    steps = [r.step for r in report.rows]
    axes = []
    for kind, _, _ in _PANELS:
        values = [getattr(r, kind) for r in report.rows]
        lo, hi, ticks, tstep = _panel_axis(values, kind)
        axes.append((values, lo, hi, [(t, _tick_text(t, tstep)) for t in ticks]))
    tick_w = max(_DRAW.textlength(s, font=fk) for _, _, _, ticks in axes for _, s in ticks)
    x0 = int(_MARGIN + tick_w + 8)
    x1 = max(width - _MARGIN - 8, x0 + 60)
    th_k = _text_h(fk)

    def xpx(i):
        n = len(steps)
        return (x0 + x1) / 2 if n <= 1 else x0 + 10 + (x1 - x0 - 20) * i / (n - 1)

    panels: list[Panel] = []
    for (kind, name, colour), (values, lo, hi, ticks) in zip(_PANELS, axes):
        texts.append(_tb(fx, x0, y, name, "panel_title"))
        top = texts[-1].box[3] + 6
        bottom = top + _PANEL_H

        def ypx(v, lo=lo, hi=hi, top=top, bottom=bottom):
            return bottom - (v - lo) / (hi - lo) * (bottom - top)

        y_ticks, last_y = [], None
        for t, label in ticks:
            py = ypx(t)
            if last_y is not None and last_y - py < th_k + 2:
                continue  # keep tick labels apart
            y_ticks.append((t, int(round(py))))
            last_y = py
            texts.append(_tb(fk, x0 - 6 - _DRAW.textlength(label, font=fk), py - th_k / 2, label, "y_tick"))
        points = [(s, xpx(i), ypx(v)) for i, (s, v) in enumerate(zip(steps, values)) if math.isfinite(v)]
        every = max(1, math.ceil(len(steps) / _MAX_X_TICKS))
        x_ticks, right = [], -math.inf
        for i, s in enumerate(steps):
            if i % every and i != len(steps) - 1:
                continue
            label = str(s)
            w = _DRAW.textlength(label, font=fk)
            px = xpx(i)
            if px - w / 2 < right + 6:
                continue  # the last step's label would touch the one before
            x_ticks.append((s, int(round(px))))
            texts.append(_tb(fk, px - w / 2, bottom + 4, label, "x_tick"))
            right = px + w / 2
        panels.append(Panel((x0, top, x1, bottom), name, lo, hi, y_ticks, x_ticks, points, colour))
        y = bottom + 4 + th_k + _GAP
    label = "denoising step"
    texts.append(_tb(fx, (x0 + x1) / 2 - _DRAW.textlength(label, font=fx) / 2, y - _GAP + 4, label, "x_label"))
    height = texts[-1].box[3] + _MARGIN
    need = max(t.box[2] for t in texts) + _MARGIN
    return PlotLayout(max(width, need, x1 + _MARGIN + 8), height, panels, texts)


def render_plot(report: FidelityReport, width: int = _W, return_layout: bool = False):
    """The plot as an RGB PIL image (and its layout, with return_layout)."""
    lay = layout_plot(report, width)
    img = Image.new("RGB", (lay.width, lay.height), _BG)
    d = ImageDraw.Draw(img)
    fonts = {"title": _font(_SIZE_TITLE), "subtitle": _font(_SIZE_TEXT), "panel_title": _font(_SIZE_TEXT),
             "x_label": _font(_SIZE_TEXT), "y_tick": _font(_SIZE_TICK), "x_tick": _font(_SIZE_TICK), "note": _font(_SIZE_TEXT)}
    for p in lay.panels:
        x0, y0, x1, y1 = p.box
        for _, py in p.y_ticks:
            d.line([(x0, py), (x1, py)], fill=_GRID)
        for _, px in p.x_ticks:
            d.line([(px, y1), (px, y1 + 3)], fill=_MUTED)
        d.rectangle([x0, y0, x1, y1], outline=_MUTED)
        pts = [(px, py) for _, px, py in p.points]
        if len(pts) > 1:
            d.line(pts, fill=p.colour, width=2)
        r = 3 if len(pts) <= 60 else 1
        for px, py in pts:
            d.ellipse([px - r, py - r, px + r, py + r], fill=p.colour)
    for t in lay.texts:
        d.text(t.xy, t.text, font=fonts[t.kind], fill=_FG if t.kind in ("title", "panel_title") else _MUTED)
    return (img, lay) if return_layout else img
