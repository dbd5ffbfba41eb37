"""Picture of routing decisions: one small panel per denoising step, blocks (rows) x heads
(columns), each cell coloured by its branch, with the branch shares of the step under it.

Pure numpy + Pillow so that the demo, the ComfyUI IMAGE output and tests share one renderer.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .router import BRANCH_NAMES

__all__ = ["BRANCH_COLORS", "render_decisions"]

# full = warm red (the expensive one), core-set = blue, sliding tile = green; colour-blind safe-ish
BRANCH_COLORS = ((213, 94, 0), (0, 114, 178), (0, 158, 115))
_BG, _FG, _GRID = (255, 255, 255), (20, 20, 20), (200, 200, 200)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def render_decisions(
    tables,
    step_labels: list[str] | None = None,
    title: str = "VORTA routing",
    max_width: int = 1600,
) -> Image.Image:
    """tables: int [steps, blocks, heads] branch ids (torch or numpy). Returns an RGB image."""
    t = tables.cpu().numpy() if isinstance(tables, torch.Tensor) else np.asarray(tables)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.size == 0:
        raise ValueError(f"expected decision tables [steps, blocks, heads], got shape {t.shape}")
    steps, blocks, heads = t.shape
    labels = step_labels or [f"step {i}" for i in range(steps)]
    cell = int(max(2, min(14, 220 // max(blocks, heads))))
    pw, ph = heads * cell, blocks * cell
    gap, label_h, bar_h = 14, 16, 10
    cols = max(1, min(steps, (max_width - gap) // (pw + gap)))
    rows = math.ceil(steps / cols)
    head_h, legend_h = 30, 22
    W = max(cols * (pw + gap) + gap, 420)
    H = head_h + legend_h + rows * (label_h + ph + bar_h + gap + 4) + gap
    img = Image.new("RGB", (W, H), _BG)
    d = ImageDraw.Draw(img)
    f_title, f_small = _font(16), _font(11)
    overall = np.bincount(t.reshape(-1).astype(np.int64), minlength=3)[:3] / t.size
    d.text((gap, 6), f"{title} - {steps} steps x {blocks} blocks x {heads} heads", fill=_FG, font=f_title)
    x = gap
    for i, name in enumerate(BRANCH_NAMES):  # legend with overall shares
        d.rectangle((x, head_h + 3, x + 12, head_h + 15), fill=BRANCH_COLORS[i])
        s = f"{name} {overall[i] * 100:.1f}%"
        d.text((x + 16, head_h + 3), s, fill=_FG, font=f_small)
        x += 16 + int(d.textlength(s, font=f_small)) + 18
    d.text((x + 6, head_h + 3), "each panel: rows = blocks, columns = heads; bar = shares of the step", fill=_FG, font=f_small)
    palette = np.array(BRANCH_COLORS, dtype=np.uint8)
    for s in range(steps):
        r, c = divmod(s, cols)
        x0 = gap + c * (pw + gap)
        y0 = head_h + legend_h + r * (label_h + ph + bar_h + gap + 4)
        d.text((x0, y0), labels[s], fill=_FG, font=f_small)
        cells = palette[np.clip(t[s], 0, 2)]  # [blocks, heads, 3]
        panel = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
        img.paste(Image.fromarray(panel, "RGB"), (x0, y0 + label_h))
        d.rectangle((x0 - 1, y0 + label_h - 1, x0 + pw, y0 + label_h + ph), outline=_GRID)
        share = np.bincount(t[s].reshape(-1).astype(np.int64), minlength=3)[:3] / t[s].size
        bx, by = x0, y0 + label_h + ph + 3
        for i in range(3):  # stacked share bar
            w = int(round(share[i] * pw))
            if w:
                d.rectangle((bx, by, min(bx + w, x0 + pw) - 1, by + bar_h - 1), fill=BRANCH_COLORS[i])
            bx += w
    return img
