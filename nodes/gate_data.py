"""Gate view data, shared by the IMAGE/text outputs and the web widget (no ComfyUI import)."""
from __future__ import annotations

import torch

from vorta_ops.router import BRANCH_NAMES, decision_shares


def summarize(tables: torch.Tensor, labels) -> str:
    lines = [f"{'':<18} " + " ".join(f"{n:>12}" for n in BRANCH_NAMES)]
    for t, label in zip(tables, labels):
        sh = decision_shares(t)
        lines.append(f"{label:<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in BRANCH_NAMES))
    sh = decision_shares(tables)
    lines.append(f"{'all steps':<18} " + " ".join(f"{sh[n] * 100:>11.1f}%" for n in BRANCH_NAMES))
    return "\n".join(lines)


def web_payload(tables: torch.Tensor, labels) -> dict:
    """Compact data for the web widget: one string of branch digits per step."""
    S, Bk, H = tables.shape
    return {
        "blocks": Bk, "heads": H, "branches": list(BRANCH_NAMES), "labels": list(labels),
        "steps": ["".join(map(str, t.reshape(-1).tolist())) for t in tables],
    }
