"""Gate view data, shared by the IMAGE/text outputs and the web widget (no ComfyUI import)."""
from __future__ import annotations

import base64
import math

import torch

from vorta_ops.branches import BRANCHES, N_BRANCHES
from vorta_ops.router import decision_shares

SCORE_KINDS = ("probability", "error")
ERROR_SCALE = 100  # error byte = round(error * 100), so 0.01 steps up to 2.54
ERROR_MAX_BYTE = 254
NOT_MEASURED = 255  # error byte of a branch not measured (NaN)


def _scores_fit(scores, blocks: int, heads: int) -> bool:
    return isinstance(scores, torch.Tensor) and tuple(scores.shape) == (blocks, heads, N_BRANCHES)


def encode_scores(kind: str, scores: torch.Tensor) -> str:
    """One step's scores [blocks, heads, branches] -> base64 of uint8 bytes, block-major, then head,
    then branch (see web_payload)."""
    s = scores.detach().to("cpu", torch.float64).reshape(-1)
    nan = torch.isnan(s)
    if kind == "probability":
        b = (s.nan_to_num(0.0).clamp(0.0, 1.0) * 255).round()
    elif kind == "error":
        b = (s.nan_to_num(0.0, posinf=math.inf).clamp(min=0.0) * ERROR_SCALE).round().clamp(max=ERROR_MAX_BYTE)
        b[nan] = NOT_MEASURED
    else:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    return base64.b64encode(b.to(torch.uint8).numpy().tobytes()).decode("ascii")


def decode_scores(kind: str, text: str | None, blocks: int, heads: int) -> torch.Tensor | None:
    """The inverse of encode_scores, within its quantisation (1/255 for probabilities, 0.01 for
    errors, errors capped at 2.54); an error byte of 255 -> NaN. None (or a string that is not
    [blocks, heads, branches] bytes) -> None."""
    if not text:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    if len(raw) != blocks * heads * N_BRANCHES:
        return None
    b = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.float32).reshape(blocks, heads, N_BRANCHES)
    if kind == "probability":
        return b / 255.0
    out = b / ERROR_SCALE
    out[b == NOT_MEASURED] = float("nan")
    return out


def chosen_scores(table: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The score of the branch each (block, head) runs: [blocks, heads] (NaN where not measured)."""
    idx = table.to(torch.long).clamp(0, N_BRANCHES - 1).unsqueeze(-1)
    return scores.to(torch.float32).gather(-1, idx).squeeze(-1)


def _mean_chosen(table, scores) -> float:
    v = chosen_scores(table, scores)
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else float("nan")


def summarize(tables: torch.Tensor, labels, score_kind: str | None = None, scores=None) -> str:
    """Per step the share of each branch; with scores (one [blocks, heads, branches] tensor or None
    per step) a last column: the mean probability of the chosen branch ("chosen p", file router) or
    the mean measured error of the chosen branch ("chosen err", training-free; full counts 0)."""
    names = [b.name for b in BRANCHES]
    S, Bk, H = tables.shape
    has = score_kind in SCORE_KINDS and scores is not None and any(_scores_fit(s, Bk, H) for s in scores)
    col = {"probability": "chosen p", "error": "chosen err"}.get(score_kind, "")
    lines = [f"{'':<18} " + " ".join(f"{n:>12}" for n in names) + (f" {col:>12}" if has else "")]
    means = []
    for i, (t, label) in enumerate(zip(tables, labels)):
        sh = decision_shares(t)
        line = f"{label:<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in names)
        if has:
            s = scores[i] if i < len(scores) else None
            m = _mean_chosen(t, s) if _scores_fit(s, Bk, H) else float("nan")
            means.append(m)
            line += f" {m:>12.3f}" if math.isfinite(m) else f" {'-':>12}"
        lines.append(line)
    sh = decision_shares(tables)
    line = f"{'all steps':<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in names)
    if has:
        ok = [m for m in means if math.isfinite(m)]
        line += f" {sum(ok) / len(ok):>12.3f}" if ok else f" {'-':>12}"
    lines.append(line)
    return "\n".join(lines)


def web_payload(tables: torch.Tensor, labels, score_kind: str | None = None, scores=None, tau: float | None = None) -> dict:
    """Compact data for the web widget (web/vorta_gates_draw.js), by branch id from the branch
    table (vorta_ops/branches.py), so the widget hard-codes no branch:
        blocks, heads
        branches        branch names ("full", "coreset", "sliding_tile")
        branch_labels   legend labels ("full", "core-set", "sliding tile")
        colours         "#rrggbb" per branch
        labels          one label per step
        steps           one string per step: a character per (block, head), block-major, the
                        branch id as chr(48 + id) (a digit for ids 0..9)
        overall         share of each branch over all steps (branch order)
    and, when the router said why (score_kind given and at least one step has scores):
        score_kind      "probability" (file router: softmax of the router per head) or "error"
                        (training-free router: measured relative error of each branch vs full
                        attention on sampled rows; full's is 0)
        scores          one entry per step: null (no scores for that step), or base64 of
                        blocks * heads * len(branches) uint8 bytes, block-major, then head, then
                        branch (byte i = ((block * heads) + head) * len(branches) + branch);
                        probability byte = round(p * 255) (p = byte / 255);
                        error byte = min(round(e * 100), 254) (e = byte / 100, 254 meaning
                        ">= 2.54"); error byte 255 = not measured (NaN)
        tau             the training-free router's error threshold (score_kind "error" only)
    Every field after "steps" may be missing (payloads of older versions): the widget draws them."""
    S, Bk, H = tables.shape
    out = {
        "blocks": Bk, "heads": H,
        "branches": [b.name for b in BRANCHES],
        "branch_labels": [b.label for b in BRANCHES],
        "colours": [b.hex for b in BRANCHES],
        "labels": list(labels),
        "steps": ["".join(chr(48 + int(i)) for i in t.reshape(-1).tolist()) for t in tables],
    }
    sh = decision_shares(tables)
    out["overall"] = [sh[b.name] for b in BRANCHES]
    if score_kind in SCORE_KINDS and scores is not None:
        enc = [encode_scores(score_kind, s) if _scores_fit(s, Bk, H) else None
               for s in (list(scores) + [None] * S)[:S]]
        if any(e is not None for e in enc):
            out["score_kind"], out["scores"] = score_kind, enc
            if score_kind == "error" and tau is not None and math.isfinite(float(tau)):
                out["tau"] = float(tau)
    return out
