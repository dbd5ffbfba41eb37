"""VORTA Calibration Report on a real ComfyUI (once per ComfyUI tree under test): a tiny Wan sampled
with the Training-Free Router, then the report against the wan_mix router file. The JSON lands in
the output folder, its counts agree with the executed and predicted gate tables of the same run,
and a second report never overwrites the first."""
from __future__ import annotations

import itertools
import json
import re

import pytest

import comfy_harness as h
from comfy_fixtures import WAN_BLOCKS, WAN_HEADS, gates, training_free_apply, wan_prompt
from vorta_ops.branches import N_BRANCHES

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(h.skip_reason() is not None, reason=h.skip_reason() or "")]

_seeds = itertools.count(901)
STEPS = 6
PREFIX = "vorta_calib_test"


def _prompt(prefix=PREFIX):
    p = wan_prompt(None, prefix="calib", tile="1,2,3", window="1,3,1")
    p["7"]["inputs"].update(seed=next(_seeds), steps=STEPS)
    training_free_apply(p)
    p["11"] = {"class_type": "VortaRouterLoader", "inputs": {"router_name": "wan_mix.safetensors"}}
    # what ran, and what the official router says on the same schedule
    p["9"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "last run", "steps": STEPS,
                                                              "scheduler": "simple", "latent": ["7", 0]}}
    p["10"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "predicted", "steps": STEPS,
                                                               "scheduler": "simple", "router": ["11", 0]}}
    p["12"] = {"class_type": "VortaCalibrationReport", "inputs": {"model": ["3", 0], "official_router": ["11", 0],
                                                                  "filename_prefix": prefix, "latent": ["7", 0]}}
    return p


def _by_step(payload) -> dict[int, str]:
    return {int(re.match(r"step (\d+)", label).group(1)): s for label, s in zip(payload["labels"], payload["steps"])}


def _report_file(server, entry):
    (f,) = entry["outputs"]["12"]["vorta_calibration"]
    assert f["type"] == "output"
    return server.base / "output" / f["subfolder"] / f["filename"]


def test_calibration_report_counts_the_run_and_never_overwrites(server):
    p = _prompt()
    entry = server.run(p)
    path = _report_file(server, entry)
    assert path.is_file() and path.name == f"{PREFIX}_00001_.json"
    text = path.read_text()
    rep = json.loads(text)
    assert rep["kind"] == "vorta-calibration" and rep["versions"]["comfyui"] == server.version
    assert rep["model"]["blocks"] == WAN_BLOCKS and rep["model"]["heads"] == WAN_HEADS
    assert rep["training_free"]["tau"] == 10.0 and rep["official_router"]["tau_sparse"] == 0.3

    executed, official = _by_step(gates(entry, "9")), _by_step(gates(entry, "10"))
    assert sorted(s["step"] for s in rep["steps"]) == sorted(executed) and len(rep["sigmas"]) == len(executed)
    # compared: exactly the steps that routed (block 1 holds sparse branches; block 0 is the router's dense block)
    routed = sorted(k for k, s in executed.items() if s[WAN_HEADS:] != "0" * WAN_HEADS)
    assert routed and rep["compared_steps"] == routed
    assert all(executed[k][:WAN_HEADS] == "0" * WAN_HEADS for k in routed)
    cells = range(WAN_HEADS, WAN_BLOCKS * WAN_HEADS)  # block 1
    matrix = [[0] * N_BRANCHES for _ in range(N_BRANCHES)]
    per_step = {}
    for k in routed:
        for c in cells:
            matrix[int(official[k][c])][int(executed[k][c])] += 1
        per_step[k] = sum(official[k][c] == executed[k][c] for c in cells) / len(cells)
    conf = rep["confusion"]["matrix"]
    assert sum(map(sum, conf)) == rep["cells"] == len(routed) * (WAN_BLOCKS - 1) * WAN_HEADS
    assert conf == matrix
    assert {s["step"]: s["agreement"] for s in rep["steps"] if s["compared"]} == pytest.approx(per_step)
    assert rep["agreement"] == pytest.approx(sum(per_step.values()) / len(per_step))
    # the tau the sweep picks is at least as close to the official mix as the router's own
    own = [q for q in rep["tau_sweep"]["plateaus"] if q["tau_from"] <= 10.0 <= q["tau_to"]]
    best = rep["tau_match"]
    assert not own or best["distance"] <= own[0]["distance"] + 1e-12
    summary = entry["outputs"]["12"]["text"][0]
    assert "VORTA calibration" in summary and path.name in summary

    # a second report (the node reruns on every queue; the sampling is cached) writes a new file
    entry2 = server.run(p)
    path2 = _report_file(server, entry2)
    assert path2.name == f"{PREFIX}_00002_.json" and path.read_text() == text
    assert json.loads(path2.read_text())["confusion"] == rep["confusion"]


def test_calibration_report_says_what_to_connect(server):
    p = _prompt(prefix="vorta_calib_bad")
    p["12"]["inputs"]["model"] = ["1", 0]  # the model VORTA Apply never patched
    p["12"]["inputs"].pop("latent")
    for n in ("7", "8", "9", "10"):
        p.pop(n)
    with pytest.raises(h.PromptFailed) as e:
        server.run(p)
    assert "not patched by VORTA Apply" in json.dumps(e.value.status)
    assert not list((server.base / "output").glob("vorta_calib_bad*"))
