"""VORTA Fidelity Check on a real ComfyUI (once per ComfyUI tree under test): a tiny Wan with VORTA
Apply, next to a plain KSampler on the same patched model and seed. With a router that routes (wan_mix)
the report has one row per step, errors > 0 and a finite PSNR; with one that keeps every head full
(wan_full) routed equals dense (errors 0, cosine 1, PSNR inf). The routed LATENT equals the KSampler's,
the plot IMAGE is there, and a model without VORTA's patch is one clear error."""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import comfy_harness as h
from comfy_fixtures import saved_latent, wan_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(h.skip_reason() is not None, reason=h.skip_reason() or "")]

_seeds = itertools.count(1301)
STEPS = 3


def _prompt(router, prefix, steps_to_check=0, steps=STEPS):
    p = wan_prompt(router, prefix=f"{prefix}_ks", tile="1,2,3", window="1,3,1")
    p.pop("9", None)
    p.pop("10", None)
    p["7"]["inputs"].update(seed=next(_seeds), steps=steps)
    ks = p["7"]["inputs"]
    p["11"] = {"class_type": "VortaFidelityCheck", "inputs": {
        k: ks[k] for k in ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                           "latent_image", "denoise")}}
    p["11"]["inputs"]["steps_to_check"] = steps_to_check
    p["12"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"{prefix}_fc"}}
    return p


def _rows(text: str) -> list[tuple[int, float, float]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\d+)\s+\S+\s+(\S+)\s+(\S+)\s*$", line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return out


def _result(entry):
    ui = entry["outputs"]["11"]
    (text,) = ui["text"]
    (data,) = ui["vorta_fidelity"]
    assert ui["images"] and ui["images"][0]["filename"].endswith(".png")  # the plot IMAGE, previewed
    return text, data


def test_fidelity_check_routed_vs_dense_and_the_routed_latent(server):
    entry = server.run(_prompt("wan_mix.safetensors", "fid_mix"))
    text, data = _result(entry)
    rows = _rows(text)
    assert [r[0] for r in rows] == list(range(STEPS)), text
    assert all(r[1] > 0 and r[2] < 1.0 for r in rows), text  # routed attention changed every step's x0
    assert data["steps"] == list(range(STEPS)) and all(e > 0 for e in data["rel_l2"])
    assert isinstance(data["psnr"], float) and math.isfinite(data["psnr"]), data
    assert data["final_is_output"] is True and "PSNR of the final latent" in text
    assert "this prompt" in text and "routed run: VORTA - " in text and "coreset" in text, text
    # the routed LATENT is what the KSampler on the same patched model and seed gives
    torch.testing.assert_close(saved_latent(server, "fid_mix_fc"), saved_latent(server, "fid_mix_ks"), atol=1e-6, rtol=0)


def test_fidelity_check_all_full_router_is_exactly_dense(server):
    entry = server.run(_prompt("wan_full.safetensors", "fid_full", steps=4))
    text, data = _result(entry)
    rows = _rows(text)
    assert [r[0] for r in rows] == [0, 1, 2, 3], text
    assert all(r[1] == 0 and r[2] == 1.0 for r in rows), text
    assert data["psnr"] == "inf" and "inf (routed equals dense)" in text
    torch.testing.assert_close(saved_latent(server, "fid_full_fc"), saved_latent(server, "fid_full_ks"), atol=1e-6, rtol=0)


def test_fidelity_check_first_steps_only(server):
    """steps_to_check 2 of 4: two rows, PSNR of step 1's x0, and the routed LATENT is still the full run."""
    entry = server.run(_prompt("wan_mix.safetensors", "fid_part", steps_to_check=2, steps=4))
    text, data = _result(entry)
    assert [r[0] for r in _rows(text)] == [0, 1], text
    assert data["final_is_output"] is False and "2 of 4 steps checked" in text
    assert "x0) at step 1" in text and "the routed pass ran all 4 steps" in text
    torch.testing.assert_close(saved_latent(server, "fid_part_fc"), saved_latent(server, "fid_part_ks"), atol=1e-6, rtol=0)


def test_fidelity_check_needs_a_patched_model(server):
    p = _prompt(None, "fid_plain")
    with pytest.raises(h.PromptFailed, match="connect the MODEL output of VORTA Apply"):
        server.run(p)
