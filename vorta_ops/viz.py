"""Picture of routing decisions: one small panel per denoising step, blocks (rows) x heads
(columns), each cell coloured by its branch, with the branch shares of the step under it.

Pure numpy + Pillow so that the demo, the ComfyUI IMAGE output and tests share one renderer.

The geometry is computed first, by `layout_decisions`, into a `DecisionLayout` (every text box,
legend item, panel and the share strip, in image pixels); `render_decisions` only paints that
layout, so tests can check the geometry exactly (`render_decisions(..., return_layout=True)`).

Readable from 1 block x 1 head x 1 step up to 40 x 40 x 50 and more: cells shrink from 24 px to
4 px, block / head numbers are drawn every k-th row / column so that they never collide, labels are
ellipsized to their panel's slot, the title and legend grow the width or wrap. When there are more
steps than fit (`max_panels`, or the height limit) an evenly spaced subset of steps is shown as
panels, the picture says "showing N of M steps", and a strip at the bottom gives the branch shares
of every step.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .branches import BRANCH_COLOURS, BRANCH_LABELS, N_BRANCHES

__all__ = [
    "BRANCH_COLORS",
    "DecisionLayout",
    "LegendItem",
    "PanelBox",
    "ShareStrip",
    "TextBox",
    "layout_decisions",
    "render_decisions",
    "step_label",
]

# the branch table's colours and legend labels (branches.py), by branch id
BRANCH_COLORS = BRANCH_COLOURS
_BG, _FG, _MUTED, _GRID = (255, 255, 255), (20, 20, 20), (90, 90, 90), (200, 200, 200)

# geometry (pixels)
_MARGIN = 10  # around the image
_COL_GAP = 18  # between panel slots, horizontally
_ROW_GAP = 12  # between panel slots, vertically
_MIN_W = 420  # narrowest image (unless max_width is smaller)
_CELL_MIN, _CELL_MAX, _PANEL_TARGET = 4, 24, 220  # cell side: _PANEL_TARGET // (blocks or heads), clamped
_CELL_ASPECT = 3  # a cell is at most 3 times as wide as high or as high as wide
_LABEL_CAP = 160  # a slot grows up to this width for its step label; longer labels are ellipsized
_BAR_H = 8  # per-panel share bar
_STRIP_H = 36  # all-steps share strip (summarised pictures)
_SIZE_TITLE, _SIZE_TEXT, _SIZE_TICK = 16, 11, 10
_NICE = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)

# fonts: Pillow's bundled default font (Aileron) has no Greek, so "σ" in a step label is drawn from a
# system font that has it, or spelled out when none is found
_FALLBACK_FONTS = ("DejaVuSans.ttf", "arial.ttf", "Arial.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf")
_ASCII = {"σ": "sigma", "×": "x", "→": "->", "←": "<-", "↓": "v", "…": "...", "–": "-", "—": "-", "·": "-"}
_MISSING = "\U000f0000"  # a private-use code point: no font has it, renders as the "missing glyph"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _metrics(font) -> tuple[int, int]:
    try:
        return font.getmetrics()
    except AttributeError:  # bitmap font (old Pillow)
        b = font.getbbox("Ag")
        return int(b[3]), 0


def _has_glyph(font, ch: str) -> bool:
    if ch.isspace():
        return True
    try:
        m, p = font.getmask(ch), font.getmask(_MISSING)
        return m.size != p.size or bytes(m) != bytes(p)
    except Exception:
        return False


class _Face:
    """One text size: the default font, plus a fallback font for glyphs the default lacks."""

    def __init__(self, size: int, fallbacks: tuple[str, ...]):
        self.size = size
        self.main = _font(size)
        self.fallback = None
        for name in fallbacks:
            try:
                self.fallback = ImageFont.truetype(name, size)
                break
            except (OSError, ValueError):
                continue
        fonts = [self.main] + ([self.fallback] if self.fallback is not None else [])
        self.ascent = max(_metrics(f)[0] for f in fonts)
        self.line_h = self.ascent + max(_metrics(f)[1] for f in fonts)
        self._glyph: dict[tuple[int, str], bool] = {}
        self._draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def _has(self, which: int, font, ch: str) -> bool:
        key = (which, ch)
        if key not in self._glyph:
            self._glyph[key] = _has_glyph(font, ch)
        return self._glyph[key]

    def runs(self, s: str) -> list[tuple[object, str]]:
        """Split s into (font, text) runs; characters no font has are spelled in ASCII."""
        out: list[tuple[object, str]] = []
        for ch in s:
            if self._has(0, self.main, ch):
                f, c = self.main, ch
            elif self.fallback is not None and self._has(1, self.fallback, ch):
                f, c = self.fallback, ch
            else:
                f, c = self.main, _ASCII.get(ch, "?")
            if out and out[-1][0] is f:
                out[-1] = (f, out[-1][1] + c)
            else:
                out.append((f, c))
        return out

    def length(self, s: str) -> float:
        return sum(f.getlength(t) for f, t in self.runs(s))

    def _placed(self, x: float, y: float, s: str):
        """(font, text, (x, y)) per run, for a line whose top is y (baselines aligned)."""
        out = []
        for f, t in self.runs(s):
            out.append((f, t, (x, y + self.ascent - _metrics(f)[0])))
            x += f.getlength(t)
        return out

    def box(self, x: float, y: float, s: str) -> tuple[int, int, int, int]:
        """Pixel box [x0, x1) x [y0, y1) holding the line box and every inked pixel of s at (x, y)."""
        x0, y0, x1, y1 = x, y, x + self.length(s), y + self.line_h
        for f, t, xy in self._placed(x, y, s):
            b = self._draw.textbbox(xy, t, font=f)
            x0, y0, x1, y1 = min(x0, b[0]), min(y0, b[1]), max(x1, b[2]), max(y1, b[3])
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    def draw(self, d: ImageDraw.ImageDraw, x: float, y: float, s: str, fill) -> None:
        for f, t, xy in self._placed(x, y, s):
            d.text(xy, t, font=f, fill=fill)

    def ellipsize(self, s: str, width: float) -> str:
        """s, or its longest prefix + "…" that fits in width ("" when not even "…" fits)."""
        if self.length(s) <= width:
            return s
        lo, hi = 0, len(s)  # longest k with s[:k] + "…" fitting
        while lo < hi:
            k = (lo + hi + 1) // 2
            if self.length(s[:k].rstrip() + "…") <= width:
                lo = k
            else:
                hi = k - 1
        out = s[:lo].rstrip() + "…"
        return out if self.length(out) <= width else ""

    def wrap(self, s: str, width: float, sep: str = " · ") -> list[str]:
        """Greedy wrap to width, breaking at sep first and between words when a part alone is
        too wide; a word wider than width is ellipsized."""
        lines: list[str] = []
        cur = ""
        for part in s.split(sep):
            cand = f"{cur}{sep}{part}" if cur else part
            if self.length(cand) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
                cur = ""
            for word in part.split():
                cand = f"{cur} {word}" if cur else word
                if self.length(cand) <= width:
                    cur = cand
                    continue
                if cur:
                    lines.append(cur)
                cur = word if self.length(word) <= width else self.ellipsize(word, width)
        if cur:
            lines.append(cur)
        return lines or [""]


@functools.lru_cache(maxsize=None)
def _face_cached(size: int, fallbacks: tuple[str, ...]) -> _Face:
    return _Face(size, fallbacks)


def _face(size: int) -> _Face:
    return _face_cached(size, tuple(_FALLBACK_FONTS))


Box = tuple  # (x0, y0, x1, y1): pixels x0 <= x < x1, y0 <= y < y1


@dataclass(frozen=True)
class TextBox:
    """One drawn line of text. kind: title, info, legend, key, note, step_label, block_tick,
    head_tick, strip_label, strip_tick. text is what is drawn (maybe ellipsized), full the text
    it was made from. (x, y) is the top-left of the line; box holds every pixel of it."""

    kind: str
    text: str
    full: str
    x: int
    y: int
    size: int
    box: Box
    step: int | None = None  # the panel (step) it belongs to, for step labels and ticks
    index: int | None = None  # block / head / step number of a tick


@dataclass(frozen=True)
class LegendItem:
    branch: int
    swatch: Box
    text: TextBox


@dataclass(frozen=True)
class PanelBox:
    """One step's panel: cell (block i, head j) covers [x + j*cell_w, x + (j+1)*cell_w) x
    [y + i*cell_h, y + (i+1)*cell_h); bar is the step's branch-share bar under it."""

    step: int
    x: int
    y: int
    cell_w: int
    cell_h: int
    blocks: int
    heads: int
    bar: Box

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.x + self.heads * self.cell_w, self.y + self.blocks * self.cell_h)

    def cell_center(self, block: int, head: int) -> tuple[int, int]:
        return self.x + head * self.cell_w + self.cell_w // 2, self.y + block * self.cell_h + self.cell_h // 2


@dataclass(frozen=True)
class ShareStrip:
    """Branch shares of every step (summarised pictures): column c covers steps
    [c*steps_per_col, (c+1)*steps_per_col) and x in [x + c*col_w, x + (c+1)*col_w)."""

    x: int
    y: int
    col_w: int
    height: int
    steps_per_col: int
    cols: int
    marks: tuple[Box, ...]  # under the columns of the steps shown as panels

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.x + self.cols * self.col_w, self.y + self.height)


@dataclass
class DecisionLayout:
    width: int
    height: int
    shape: tuple[int, int, int]  # steps, blocks, heads
    shown_steps: tuple[int, ...]
    texts: list[TextBox] = field(default_factory=list)
    legend: list[LegendItem] = field(default_factory=list)
    panels: list[PanelBox] = field(default_factory=list)
    strip: ShareStrip | None = None

    @property
    def summarised(self) -> bool:
        return len(self.shown_steps) < self.shape[0]

    def texts_of(self, kind: str) -> list[TextBox]:
        return [t for t in self.texts if t.kind == kind]


def step_label(step: int, sigma: float) -> str:
    """"step 3 · σ 0.873": sigma to 3 decimals (3 significant digits when it is below 0.0005)."""
    sigma = float(sigma)
    s = f"{sigma:.3f}" if sigma == 0 or abs(sigma) >= 0.0005 else f"{sigma:.3g}"
    return f"step {step} · σ {s}"


def _as_tables(tables) -> np.ndarray:
    t = tables.cpu().numpy() if isinstance(tables, torch.Tensor) else np.asarray(tables)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.size == 0:
        raise ValueError(f"expected decision tables [steps, blocks, heads], got shape {t.shape}")
    return t


def _labels(steps: int, step_labels, sigmas) -> list[str]:
    if sigmas is not None:
        sg = sigmas.detach().float().cpu().reshape(-1).tolist() if isinstance(sigmas, torch.Tensor) else list(np.asarray(sigmas, dtype=float).reshape(-1))
        if len(sg) < steps:
            raise ValueError(f"need a sigma per step: {steps} steps, {len(sg)} sigmas")
        default = [step_label(i, sg[i]) for i in range(steps)]
    else:
        default = [f"step {i}" for i in range(steps)]
    labels = [str(s) for s in (step_labels or [])][:steps]
    return labels + default[len(labels):]


def _ticks(n: int, spacing: float, need: float) -> list[int]:
    """Indices 0, k, 2k, ... (k the smallest nice step whose spacing * k >= need) and the last
    index n-1 when it fits (replacing the last multiple of k when that one is too close)."""
    if n <= 0:
        return []
    k = next((k for k in _NICE if k * spacing >= need), None)
    if k is None:
        k = int(math.ceil(need / max(spacing, 1e-9)))
    ticks = list(range(0, n, k))
    last = n - 1
    if ticks[-1] != last:
        if (last - ticks[-1]) * spacing >= need:
            ticks.append(last)
        elif len(ticks) > 1 and (last - ticks[-2]) * spacing >= need:
            ticks[-1] = last
    return ticks


def _branch_ids(x: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.int64), 0, N_BRANCHES - 1)


def _shares(x: np.ndarray) -> np.ndarray:
    return np.bincount(_branch_ids(x.reshape(-1)), minlength=N_BRANCHES)[:N_BRANCHES] / max(x.size, 1)


def layout_decisions(
    tables,
    step_labels: list[str] | None = None,
    title: str = "VORTA routing",
    max_width: int = 1600,
    *,
    sigmas=None,
    max_height: int = 2000,
    max_panels: int = 24,
) -> DecisionLayout:
    """Geometry of the routing picture (see render_decisions) without painting it."""
    t = _as_tables(tables)
    steps, blocks, heads = t.shape
    labels = _labels(steps, step_labels, sigmas)
    f_title, f_text, f_tick = _face(_SIZE_TITLE), _face(_SIZE_TEXT), _face(_SIZE_TICK)
    M = _MARGIN

    # one panel slot: [step label] / [head ticks] / [block ticks | cells] / [share bar]
    side = lambda n: int(max(_CELL_MIN, min(_CELL_MAX, _PANEL_TARGET // n)))
    cw, ch = side(heads), side(blocks)
    cw, ch = min(cw, _CELL_ASPECT * ch), min(ch, _CELL_ASPECT * cw)
    pw, ph = heads * cw, blocks * ch
    head_ticks = _ticks(heads, cw, f_tick.length(str(heads - 1)) + 5)
    block_ticks = _ticks(blocks, ch, f_tick.line_h + 1)
    bw = math.ceil(max(f_tick.length(str(b)) for b in block_ticks)) + 4  # block-number column
    ro = max(0, math.ceil(f_tick.length(str(head_ticks[-1])) / 2 - cw / 2) + 1)  # last head number past the panel
    content_w = bw + pw + ro
    label_y, ticks_y = 0, f_text.line_h + 2
    panel_dy = ticks_y + f_tick.line_h + 3
    bar_dy = panel_dy + ph + 3
    slot_h = bar_dy + _BAR_H

    def slot_width(shown):
        lw = max(f_text.length(labels[s]) for s in shown)
        return int(math.ceil(max(content_w, min(lw, _LABEL_CAP))))

    def grid(shown):
        sw = slot_width(shown)
        cols_max = max(1, (max_width - 2 * M + _COL_GAP) // (sw + _COL_GAP))
        rows = math.ceil(len(shown) / cols_max)
        cols = math.ceil(len(shown) / rows)  # balanced rows
        return sw, cols, rows

    def pick(n):
        return tuple(int(i) for i in np.round(np.linspace(0, steps - 1, n)).astype(int)) if n < steps else tuple(range(steps))

    overall = _shares(t)
    legend_txt = [f"{BRANCH_LABELS[i]} {overall[i] * 100:.1f}%" for i in range(N_BRANCHES)]
    sw_legend = 12 + 4  # swatch + gap before its text
    legend_w = sum(sw_legend + f_text.length(s) for s in legend_txt) + 16 * 2

    def build(shown) -> DecisionLayout:
        sw, cols, rows = grid(shown)
        summarised = len(shown) < steps
        W = max(min(_MIN_W, max_width), 2 * M + cols * sw + (cols - 1) * _COL_GAP)
        grow_to = max(W, max_width)
        W = int(math.ceil(min(grow_to, max(W, f_title.length(title) + 2 * M, legend_w + 2 * M))))
        avail = W - 2 * M
        lay = DecisionLayout(W, 0, (steps, blocks, heads), tuple(shown))
        y = M

        def line(kind, face, s, x, y, full=None, **kw):
            tb = TextBox(kind, s, s if full is None else full, int(x), int(y), face.size, face.box(x, y, s), **kw)
            lay.texts.append(tb)
            return tb

        for s in f_title.wrap(title, avail):
            line("title", f_title, s, M, y, full=title)
            y += f_title.line_h + 2
        info = f"{steps} step{'s' * (steps != 1)} · {blocks} block{'s' * (blocks != 1)} · {heads} head{'s' * (heads != 1)}"
        for s in f_text.wrap(info, avail):
            line("info", f_text, s, M, y, full=info)
            y += f_text.line_h + 1
        y += 4
        x = M  # legend: swatch + "name share%", flowing onto a new line when full
        for i, s in enumerate(legend_txt):
            s_fit = f_text.ellipsize(s, avail - sw_legend)
            w = sw_legend + f_text.length(s_fit)
            if x > M and x + w > W - M:
                x, y = M, y + f_text.line_h + 3
            sy = y + (f_text.line_h - 12) // 2
            tb = line("legend", f_text, s_fit, x + sw_legend, y, full=s)
            lay.legend.append(LegendItem(i, (x, sy, x + 12, sy + 12), tb))
            x += math.ceil(w) + 16
        y += f_text.line_h + 4
        key = "rows = blocks (numbered at left) · columns = heads (numbered on top) · bar under a panel = branch shares of that step"
        for s in f_text.wrap(key, avail):
            line("key", f_text, s, M, y, full=key)
            y += f_text.line_h + 1
        if summarised:
            note = (f"showing {len(shown)} of {steps} steps (evenly spaced, first and last included); "
                    f"the strip at the bottom shows every step")
            for s in f_text.wrap(note, avail):
                line("note", f_text, s, M, y, full=note)
                y += f_text.line_h + 1
        y += 8

        for n, s in enumerate(shown):
            r, c = divmod(n, cols)
            sx, sy = M + c * (sw + _COL_GAP), y + r * (slot_h + _ROW_GAP)
            lab = f_text.ellipsize(labels[s], sw)
            if lab:
                line("step_label", f_text, lab, sx, sy + label_y, full=labels[s], step=s)
            px, py = sx + bw, sy + panel_dy
            for j in head_ticks:
                txt = str(j)
                tx = px + j * cw + cw / 2 - f_tick.length(txt) / 2
                line("head_tick", f_tick, txt, tx, sy + ticks_y, step=s, index=j)
            for i in block_ticks:
                txt = str(i)
                line("block_tick", f_tick, txt, px - 4 - f_tick.length(txt),
                     py + i * ch + ch / 2 - f_tick.line_h / 2, step=s, index=i)
            by = sy + bar_dy
            lay.panels.append(PanelBox(s, px, py, cw, ch, blocks, heads, (px, by, px + pw, by + _BAR_H)))
        y += rows * slot_h + (rows - 1) * _ROW_GAP + 8

        if summarised:  # branch shares of every step
            spc = max(1, math.ceil(steps / avail))
            ncols = math.ceil(steps / spc)
            col_w = int(max(1, min(16, avail // ncols)))
            what = f"branch shares of every step, 0 to {steps - 1}" if spc == 1 else \
                f"branch shares of all {steps} steps, {spc} steps a column"
            strip_label = f"{what} (marks under the strip: the steps shown above)"
            y += 4
            for s in f_text.wrap(strip_label, avail):
                line("strip_label", f_text, s, M, y, full=strip_label)
                y += f_text.line_h + 1
            y += 3
            sy = y
            marks = []
            for s in shown:
                cx = M + (s // spc) * col_w + col_w / 2
                mx0 = int(max(M, math.floor(cx - max(col_w, 3) / 2)))
                mx1 = int(min(M + ncols * col_w, mx0 + max(col_w, 3)))
                marks.append((mx0, sy + _STRIP_H + 2, mx1, sy + _STRIP_H + 5))
            lay.strip = ShareStrip(M, sy, col_w, _STRIP_H, spc, ncols, tuple(marks))
            ty = sy + _STRIP_H + 7
            placed = []  # (step, x): centred under the column, kept inside the strip's span
            for c in _ticks(ncols, col_w, f_tick.length(str(steps - 1)) + 6):
                txt = str(c * spc)
                tx = M + c * col_w + col_w / 2 - f_tick.length(txt) / 2
                placed.append((c * spc, min(max(tx, M), M + ncols * col_w - f_tick.length(txt))))
            while len(placed) > 1:  # pushing the last number inside may bring it onto the one before
                (a, ax), (b, bx) = placed[-2], placed[-1]
                if ax + f_tick.length(str(a)) + 4 <= bx:
                    break
                del placed[-2 if len(placed) > 2 else -1]
            for st_i, tx in placed:
                line("strip_tick", f_tick, str(st_i), tx, ty, index=st_i)
            y = ty + f_tick.line_h
        lay.height = int(y + M)
        return lay

    n = min(steps, max(1, max_panels))
    lay = build(pick(n))
    while lay.height > max_height and n > 1:  # drop a row of panels at a time
        _, cols, _ = grid(pick(n))
        n = max(1, n - cols) if n > cols else n - 1
        lay = build(pick(n))
    return lay


def render_decisions(
    tables,
    step_labels: list[str] | None = None,
    title: str = "VORTA routing",
    max_width: int = 1600,
    *,
    sigmas=None,
    max_height: int = 2000,
    max_panels: int = 24,
    return_layout: bool = False,
):
    """tables: int [steps, blocks, heads] branch ids (torch or numpy) of branches.BRANCHES (0 full /
    1 core-set / 2 sliding tile), each cell painted in its branch's colour. step_labels: one per step (default "step i", or step_label(i, sigma) when
    sigmas, [steps] or the sampler's [steps + 1], are given). Returns an RGB image, or
    (image, DecisionLayout) with return_layout=True. More than max_panels steps (or more than fit
    in max_height) are summarised: evenly spaced panels plus a share strip of every step."""
    t = _as_tables(tables)
    lay = layout_decisions(t, step_labels, title, max_width, sigmas=sigmas, max_height=max_height,
                           max_panels=max_panels)
    img = Image.new("RGB", (lay.width, lay.height), _BG)
    d = ImageDraw.Draw(img)
    palette = np.array(BRANCH_COLORS, dtype=np.uint8)
    for p in lay.panels:
        cells = palette[_branch_ids(t[p.step])]  # [blocks, heads, 3 (rgb)]
        panel = np.repeat(np.repeat(cells, p.cell_h, axis=0), p.cell_w, axis=1)
        if p.cell_h >= 8:  # thin white lines between cells, to count them by
            panel[p.cell_h - 1 :: p.cell_h] = 255
        if p.cell_w >= 8:
            panel[:, p.cell_w - 1 :: p.cell_w] = 255
        img.paste(Image.fromarray(np.ascontiguousarray(panel), "RGB"), (p.x, p.y))
        x0, y0, x1, y1 = p.box
        d.rectangle((x0 - 1, y0 - 1, x1, y1), outline=_GRID)
        bx0, by0, bx1, by1 = p.bar
        _stacked(d, _shares(t[p.step]), bx0, by0, bx1 - bx0, by1 - by0, horizontal=True)
    if lay.strip is not None:
        st = lay.strip
        for c in range(st.cols):
            sh = _shares(t[c * st.steps_per_col : (c + 1) * st.steps_per_col])
            _stacked(d, sh, st.x + c * st.col_w, st.y, st.col_w, st.height, horizontal=False)
        x0, y0, x1, y1 = st.box
        d.rectangle((x0 - 1, y0 - 1, x1, y1), outline=_GRID)
        for m in st.marks:
            d.rectangle((m[0], m[1], m[2] - 1, m[3] - 1), fill=_FG)
    for it in lay.legend:
        d.rectangle((it.swatch[0], it.swatch[1], it.swatch[2] - 1, it.swatch[3] - 1), fill=BRANCH_COLORS[it.branch])
    for tb in lay.texts:
        fill = _MUTED if tb.kind in ("key", "note", "strip_label", "block_tick", "head_tick", "strip_tick", "info") else _FG
        _face(tb.size).draw(d, tb.x, tb.y, tb.text, fill)
    return (img, lay) if return_layout else img


def _stacked(d: ImageDraw.ImageDraw, shares, x: int, y: int, w: int, h: int, horizontal: bool) -> None:
    """Shares as a stacked bar filling [x, x+w) x [y, y+h), branches in legend order."""
    n = w if horizontal else h
    edges = np.round(np.cumsum(np.concatenate([[0.0], shares])) * n).astype(int)
    edges[-1] = n
    for i in range(N_BRANCHES):
        a, b = edges[i], edges[i + 1]
        if b > a:
            box = (x + a, y, x + b - 1, y + h - 1) if horizontal else (x, y + a, x + w - 1, y + b - 1)
            d.rectangle(box, fill=BRANCH_COLORS[i])
