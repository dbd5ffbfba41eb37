"""Gate view data, shared by the IMAGE/text outputs and the web widget (no ComfyUI import)."""
from __future__ import annotations

import torch

from vorta_ops.branches import BRANCHES
from vorta_ops.router import decision_shares


def summarize(tables: torch.Tensor, labels) -> str:
    names = [b.name for b in BRANCHES]
    lines = [f"{'':<18} " + " ".join(f"{n:>12}" for n in names)]
    for t, label in zip(tables, labels):
        sh = decision_shares(t)
        lines.append(f"{label:<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in names))
    sh = decision_shares(tables)
    lines.append(f"{'all steps':<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in names))
    return "\n".join(lines)


def web_payload(tables: torch.Tensor, labels) -> dict:
    """Compact data for the web widget (web/vorta_gates_draw.js), by branch id from the branch
    table (vorta_ops/branches.py), so the widget hard-codes no branch:
        blocks, heads
        branches        branch names ("full", "coreset", "sliding_tile")
        branch_labels   legend labels ("full", "core-set", "sliding tile")
        colours         "#rrggbb" per branch
        labels          one label per step
        steps           one string per step: a character per (block, head), block-major, the
                        branch id as chr(48 + id) (a digit for ids 0..9)"""
    S, Bk, H = tables.shape
    return {
        "blocks": Bk, "heads": H,
        "branches": [b.name for b in BRANCHES],
        "branch_labels": [b.label for b in BRANCHES],
        "colours": [b.hex for b in BRANCHES],
        "labels": list(labels),
        "steps": ["".join(chr(48 + int(i)) for i in t.reshape(-1).tolist()) for t in tables],
    }
