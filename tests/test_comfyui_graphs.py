"""The graphs users build, on a real ComfyUI (each test runs once per ComfyUI tree under test):
VORTA Apply before and after other patch nodes, split samplers with two experts, caching,
torch.compile, Apply twice, an interrupted run, Apply switched off.

In each, the branch table the run executed ("last run") must equal the one predicted from the
router and the schedule, and the output must equal the per-head reference computation (plain
torch references per head, from the grid and table VORTA's hooks hand down).
"""
from __future__ import annotations

import copy
import itertools
import re
import time
from pathlib import Path

import pytest
import torch

import comfy_harness as h
from comfy_fixtures import MIX, WAN_BLOCKS, gates, hunyuan_prompt, saved_latent, training_free_apply, wan_prompt
from vorta_ops.router import CORESET, SLIDING

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(h.skip_reason() is not None, reason=h.skip_reason() or "")]

_seeds = itertools.count(101)
LIVE = "wan_live.safetensors"  # decisions change with the timestep


def _prompt(router=LIVE, prefix="g", steps=3, **kw):
    """The base Wan graph (loader -> [Apply] -> sampler) with a seed of its own, so ComfyUI's cache
    never hands back an earlier test's result."""
    p = wan_prompt(router, prefix=prefix, tile="1,2,3", window="1,3,1", **kw)
    p["7"]["inputs"]["seed"] = next(_seeds)
    p["7"]["inputs"]["steps"] = steps
    for g in ("9", "10"):
        if g in p:
            p[g]["inputs"]["steps"] = steps
    return p


def _after(p, node_id, class_type, sampler="7", **inputs):
    """Insert a MODEL -> MODEL node right before the sampler (after whatever is there)."""
    p[node_id] = {"class_type": class_type, "inputs": {"model": p[sampler]["inputs"]["model"], **inputs}}
    p[sampler]["inputs"]["model"] = [node_id, 0]
    return p


def _before_apply(p, node_id, class_type, **inputs):
    """Insert a MODEL -> MODEL node between the loader and VORTA Apply."""
    p[node_id] = {"class_type": class_type, "inputs": {"model": p["3"]["inputs"]["model"], **inputs}}
    p["3"]["inputs"]["model"] = [node_id, 0]
    return p


def _predict_on_sampler_model(p, sampler="7", gate="10"):
    """Predicted routing read from the model the sampler gets (a clone of Apply's output, after
    every patch): the state must survive those clones."""
    p[gate]["inputs"]["model"] = p[sampler]["inputs"]["model"]
    return p


def _routes_like_reference(server, p, prefix, sampler="7", last="9", predicted="10", atol=1e-4):
    """Run p; the executed table equals the predicted one and holds sparse branches; the output
    equals the reference routed computation (the same graph with the reference override last)."""
    p["8"]["inputs"]["filename_prefix"] = prefix
    mark = len(server.log.read_text())
    entry = server.run(p)
    log = _log_since(server, mark)
    assert "video self-attention head-calls" in log and "should have routed attention but ran dense" not in log, log[-2000:]
    ex, pr = gates(entry, last)["steps"], gates(entry, predicted)["steps"]
    assert ex == pr, (ex, pr)
    assert any(c != "0" for step in ex for c in step), "nothing was routed"
    ref = _after(copy.deepcopy(p), "30", "VortaTestReferenceOverride", sampler)
    ref["8"]["inputs"]["filename_prefix"] = prefix + "_ref"
    ref.pop(last, None)
    ref.pop(predicted, None)
    server.run(ref)
    fast, slow = saved_latent(server, prefix), saved_latent(server, prefix + "_ref")
    torch.testing.assert_close(fast, slow, atol=atol, rtol=atol)
    return entry, fast


def _log_since(server, mark: int) -> str:
    return server.log.read_text()[mark:]


def test_model_sampling_after_apply_keeps_routing(server):
    """The issue's first graph: Apply right after the loader, ModelSamplingSD3 after it (0.3.64
    deep-copies model_options at that clone)."""
    p = _predict_on_sampler_model(_after(_prompt(prefix="sd3"), "20", "ModelSamplingSD3", shift=5.0))
    _routes_like_reference(server, p, "sd3")


def test_lora_after_and_before_apply_keeps_routing(server):
    after = _predict_on_sampler_model(
        _after(_prompt(prefix="lora_a"), "20", "LoraLoaderModelOnly", lora_name="tiny_wan_lora.safetensors", strength_model=1.0))
    _, out_after = _routes_like_reference(server, after, "lora_a")
    before = _before_apply(_prompt(prefix="lora_b"), "20", "LoraLoaderModelOnly",
                           lora_name="tiny_wan_lora.safetensors", strength_model=1.0)
    before["7"]["inputs"]["seed"] = after["7"]["inputs"]["seed"]
    _, out_before = _routes_like_reference(server, before, "lora_b")
    torch.testing.assert_close(out_after, out_before, atol=1e-4, rtol=1e-4)  # order does not matter
    plain = _prompt(prefix="lora_none")
    plain["7"]["inputs"]["seed"] = after["7"]["inputs"]["seed"]
    server.run(plain)
    assert (saved_latent(server, "lora_none") - out_after).abs().max() > 1e-3  # the LoRA was applied


@pytest.mark.parametrize("chain", [False, True], ids=["replacing", "chaining"])
def test_override_node_after_apply_gets_every_call_vorta_does_not_route(server, tmp_path, chain):
    """Another attention-override node after Apply (SageAttention-style): VORTA still routes video
    self-attention and hands it the rest. One that chains back to the override it found (VORTA's)
    does not loop."""
    calls = tmp_path / "calls.txt"
    p = _predict_on_sampler_model(_after(_prompt("wan_mix.safetensors", prefix=f"ovr_{chain}"), "20", "VortaTestOverride",
                                         counter_file=str(calls), chain=chain))
    _routes_like_reference(server, p, f"ovr_{chain}")
    keys = [line.split(") (")[1].split(",")[1].strip() for line in calls.read_text().splitlines()]
    # the MIX router sends no head to full: only cross-attention (8 text keys) reached it (and in
    # the reference run nothing: the reference override replaced it)
    assert keys and set(keys) == {"8"}, keys


def test_override_node_before_apply_serves_the_full_heads(server, tmp_path):
    calls = tmp_path / "calls.txt"
    p = _before_apply(_prompt("wan_full.safetensors", prefix="ovr_before"), "20", "VortaTestOverride",
                      counter_file=str(calls))
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["0000"] * 3
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 * 3 * WAN_BLOCKS  # every self- and cross-attention call


def test_torch_compile_after_apply_routes_without_a_graph_break_storm(server):
    """TorchCompileModel (CPU inductor) after Apply, 3 steps whose routing differs: the run completes,
    routes as predicted, and gives the eager routed result. Each attention call is one opaque
    vorta::comfy_attention op in the graph: VORTA breaks the graph once per model call (the set-up
    that reads the step), never per attention call, and a new step's table recompiles nothing."""
    p = _prompt(prefix="compiled", steps=3)
    p["3"]["inputs"]["dense_start_percent"] = 34.0  # step 0 all full, then the mix: the plan changes
    p = _predict_on_sampler_model(p)
    eager = copy.deepcopy(p)
    eager["8"]["inputs"]["filename_prefix"] = "compiled_eager"
    server.run(eager)
    _after(p, "20", "TorchCompileModel", backend="inductor")
    _predict_on_sampler_model(p)
    mark = len(server.log.read_text())
    entry = server.run(p, timeout=900)
    steps = gates(entry, "9")["steps"]
    assert steps == gates(entry, "10")["steps"] and len(set(steps)) > 1, steps  # the table changed between steps
    log = _log_since(server, mark)
    assert "video self-attention head-calls" in log and "should have routed" not in log
    torch.testing.assert_close(saved_latent(server, "compiled"), saved_latent(server, "compiled_eager"), atol=1e-3, rtol=1e-3)
    # one entry per graph break dynamo hit while compiling (TORCH_LOGS=graph_breaks,recompiles)
    where = re.findall(r"\] Graph break (?:\(user stack suppressed[^)]*\) )?in user code at (\S+?):(\d+)", log)
    ours = {(path, int(line)) for path, line in where if "comfyui-vorta" in path}
    # the only place VORTA breaks the graph is the set-up call (seen once per frame dynamo traces it from)
    patch_src = (REPO / "nodes" / "patch.py").read_text().splitlines()
    assert all(path.endswith("nodes/patch.py") and "_setup_call(" in patch_src[line - 1] for path, line in ours), ours
    recompiles = re.findall(r"Recompiling function (\S+)", log)
    assert not recompiles, recompiles
    print(f"\n[{server.version}] TorchCompileModel graph breaks: {len(where)} reported "
          f"({sum('comfyui-vorta' in p for p, _ in where)} at VORTA's per-model-call set-up, the rest in ComfyUI's own "
          f"code), recompiles: {len(recompiles)}")


def test_easycache_after_apply_keeps_step_indices(server):
    """EasyCache skips the blocks of some steps: the steps that ran keep their own index and table,
    and the log says how many were reused."""
    steps = 8
    p = _predict_on_sampler_model(_after(_prompt(prefix="easy", steps=steps), "20", "EasyCache",
                                         reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False))
    p["8"]["inputs"]["filename_prefix"] = "easy"
    mark = len(server.log.read_text())
    entry = server.run(p)
    last, pred = gates(entry, "9"), gates(entry, "10")
    step_no = lambda label: int(label.split()[1])
    ran = {step_no(lbl): t for lbl, t in zip(last["labels"], last["steps"])}
    predicted = {step_no(lbl): t for lbl, t in zip(pred["labels"], pred["steps"])}
    assert ran and set(ran) <= set(predicted)
    assert all(ran[s] == predicted[s] for s in ran), (ran, predicted)
    skipped = steps - len(ran)
    assert skipped > 0, "EasyCache reused no step: the test does not test skipping"
    assert f"{skipped} steps ran no attention" in _log_since(server, mark)


def test_apply_twice_on_one_chain_the_second_replaces_the_first(server):
    p = _prompt("wan_full.safetensors", prefix="twice")
    p["12"] = {"class_type": "VortaRouterLoader", "inputs": {"router_name": "wan_mix.safetensors"}}
    p["13"] = dict(copy.deepcopy(p["3"]))
    p["13"]["inputs"].update(model=["3", 0], router=["12", 0])
    p["7"]["inputs"]["model"] = ["13", 0]
    p["9"]["inputs"]["model"] = p["10"]["inputs"]["model"] = ["13", 0]
    mark = len(server.log.read_text())
    entry, _ = _routes_like_reference(server, p, "twice")
    flat = "".join(str(b) for row in MIX for b in row)
    assert gates(entry, "9")["steps"] == [flat] * 3
    runs = re.findall(r"VORTA - .*", _log_since(server, mark))
    assert len(runs) == 2, runs  # one summary per sampling run (routed + reference): no double routing


def test_two_experts_split_sampler_dense_start_on_the_noise_level(server):
    """Wan 2.2 A14B: two models, each with its own Apply and router, two KSamplerAdvanced halves of
    one 4-step schedule. dense_start 25% makes only the first step of the whole schedule dense:
    the low-noise expert's first step (half-way) routes."""
    mix = "".join(str(b) for row in MIX for b in row)
    swapped = [[SLIDING, CORESET], [CORESET, SLIDING]]
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_i2v.safetensors", "weight_dtype": "default"}},
        "4": {"class_type": "VortaTestConditioning", "inputs": {"seed": 1, "tokens": 8, "pooled": False}},
        "5": {"class_type": "VortaTestConditioning", "inputs": {"seed": 2, "tokens": 8, "pooled": False}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 96, "height": 64, "length": 9, "batch_size": 1}},
        "11": {"class_type": "VortaRouterLoader", "inputs": {"router_name": "wan_mix.safetensors"}},
        "12": {"class_type": "VortaRouterLoader", "inputs": {"router_name": "wan_swapped.safetensors"}},
    }
    p["1"]["inputs"]["unet_name"] = p["2"]["inputs"]["unet_name"] = "tiny_wan.safetensors"
    for nid, model, router in (("13", "1", "11"), ("14", "2", "12")):
        p[nid] = {"class_type": "VortaApply", "inputs": {
            "model": [model, 0], "router": [router, 0], "enabled": True, "tile": "1,2,3", "window": "1,3,1", "bucket": "2,2,2",
            "keep_ratio": 0.5, "similarity": "auto", "dense_start_percent": 25.0, "dense_end_percent": 0.0, "dense_blocks": ""}}
        p[str(int(nid) + 10)] = {"class_type": "ModelSamplingSD3", "inputs": {"model": [nid, 0], "shift": 8.0}}
    common = {"add_noise": "enable", "noise_seed": next(_seeds), "steps": 4, "cfg": 2.0, "sampler_name": "euler",
              "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0]}
    p["15"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "model": ["23", 0], "latent_image": ["6", 0],
                                                             "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    p["16"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "disable", "model": ["24", 0], "latent_image": ["15", 0],
                                                             "start_at_step": 2, "end_at_step": 4, "return_with_leftover_noise": "disable"}}
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "experts"}}
    p["17"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["23", 0], "mode": "last run", "steps": 4,
                                                               "scheduler": "simple", "latent": ["16", 0]}}
    p["18"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["24", 0], "mode": "last run", "steps": 4,
                                                               "scheduler": "simple", "latent": ["16", 0]}}
    p["19"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["24", 0], "mode": "predicted", "steps": 4,
                                                               "scheduler": "simple"}}
    entry = server.run(p)
    sw = "".join(str(b) for row in swapped for b in row)
    assert gates(entry, "17")["steps"] == ["0000", mix]  # global steps 0 (dense start) and 1
    assert gates(entry, "18")["steps"] == [sw, sw]  # global steps 2 and 3: routed, not "a start"
    assert gates(entry, "19")["steps"] == ["0000", sw, sw, sw]  # the whole schedule, predicted


def test_interrupted_run_leaves_no_stale_state(server):
    """Interrupt a long routed run mid-sampling, then run normally: routed, as predicted, equal to
    the reference, one step record per step."""
    long = _prompt(prefix="interrupted", steps=400)
    long.pop("9")
    long.pop("10")
    code, res = server.post("/prompt", {"prompt": long, "client_id": "vorta-tests"})
    assert code == 200, res
    deadline = time.time() + 120
    while time.time() < deadline and not server.get("/queue")["queue_running"]:
        time.sleep(0.2)
    time.sleep(1.5)  # into the sampling loop
    server.post("/interrupt", {})
    while server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.2)
    hist = server.get(f"/history/{res['prompt_id']}")[res["prompt_id"]]
    assert hist["status"]["status_str"] != "success"  # it really was interrupted
    entry, _ = _routes_like_reference(server, _prompt(prefix="after_interrupt"), "after_interrupt")
    assert len(gates(entry, "9")["steps"]) == 3


def test_apply_switched_off_is_bit_identical_to_no_patch(server):
    seed = next(_seeds)
    plain = _prompt(None, prefix="no_patch")
    plain["7"]["inputs"]["seed"] = seed
    off = _prompt(prefix="apply_off")
    off["7"]["inputs"]["seed"] = seed
    off["3"]["inputs"]["enabled"] = False
    server.run(plain)
    entry = server.run(off)
    assert torch.equal(saved_latent(server, "no_patch"), saved_latent(server, "apply_off"))
    assert gates(entry, "9")["steps"] == ["0000"] * 3


def test_precision_fp8_where_it_cannot_run_says_so_once_and_routes_in_bf16(server):
    """precision fp8 on a machine without FP8 tensor cores (this CPU server): one warning per sampling
    run (here two: the graph and its reference) naming what fp8 needs, and the run routes exactly like
    the bf16 reference."""
    p = _predict_on_sampler_model(_prompt(prefix="fp8_cpu"))
    p["3"]["inputs"]["precision"] = "fp8"
    mark = len(server.log.read_text())
    _routes_like_reference(server, p, "fp8_cpu")
    warned = [ln for ln in _log_since(server, mark).splitlines() if "precision fp8:" in ln]
    assert len(warned) == 2 and all("need" in w and "run in bf16 instead" in w for w in warned), warned


def test_summary_counts_every_video_self_attention_call(server):
    """dense_start 50% of 4 steps and a router with block 0 all full: 2 dense steps x 4 head-calls
    + 2 routed steps x (2 full + 2 sparse) -> full 75%."""
    p = _prompt("wan_half_full.safetensors", prefix="counts", steps=4)
    p["3"]["inputs"]["dense_start_percent"] = 50.0
    mark = len(server.log.read_text())
    server.run(p)
    line = re.findall(r"VORTA - .*", _log_since(server, mark))[0]
    assert "full 75.0%, coreset 12.5%, sliding_tile 12.5%" in line, line


def test_hunyuan_text_refiner_with_a_long_prompt_is_not_taken_for_video(server):
    """More text tokens (100) than video tokens (48): the text refiner's self-attention is not
    routed and not warned about; the blocks route as the router says."""
    p = hunyuan_prompt(tokens=100, seed=next(_seeds), prefix="hy_long")
    mark = len(server.log.read_text())
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["1221"] * 2
    log = _log_since(server, mark)
    assert "VORTA:" not in log, log  # no warning of any kind
    assert "coreset 50.0%, sliding_tile 50.0%" in log


def test_training_free_router_routes_a_model_with_no_router_file(server):
    """Wan 2.2 5B has no official router: the Training-Free Router measures the first step of each
    span and routes it by its own errors, routes the span's other steps by them, and the output
    equals the per-head reference; 4 steps are a distilled schedule (every step its own span, the
    last one dense); a second run of the same model measures nothing, and the measurements are on
    disk in models/vorta_routers/tables."""
    p = _prompt(None, prefix="tf", steps=4)
    p["1"]["inputs"]["unet_name"] = "tiny_wan22_5b.safetensors"
    p["6"] = {"class_type": "VortaTestLatent", "inputs": {"channels": 48, "frames": 3, "height": 8, "width": 12}}
    training_free_apply(p)
    p["9"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "last run", "steps": 4,
                                                              "scheduler": "simple", "latent": ["7", 0]}}
    tables = server.base / "models" / "vorta_routers" / "tables"
    before = set(tables.glob("*.safetensors")) if tables.exists() else set()
    mark = len(server.log.read_text())
    entry = server.run(p)
    log = _log_since(server, mark)
    steps = gates(entry, "9")["steps"]
    assert len(steps) == 4 and steps[3] == "0000"  # the last step of a distilled schedule: dense
    for s in steps[:3]:  # measured and routed by their own errors
        assert s[:2] == "00" and "0" not in s[2:], steps  # block 0 dense; block 1 routed
    assert log.count("training-free router measured") == 3, log[-3000:]
    assert len(set(tables.glob("*.safetensors")) - before) == 1  # one cache file for this key
    again = copy.deepcopy(p)
    again["7"]["inputs"]["seed"] = next(_seeds)
    again["8"]["inputs"]["filename_prefix"] = "tf_again"
    mark = len(server.log.read_text())
    entry = server.run(again)
    assert "training-free router measured" not in _log_since(server, mark)
    assert gates(entry, "9")["steps"] == steps
    # the same (measured) tables, computed by the per-head reference
    ref = _after(copy.deepcopy(again), "30", "VortaTestReferenceOverride")
    ref["8"]["inputs"]["filename_prefix"] = "tf_ref"
    ref.pop("9")
    server.run(ref)
    torch.testing.assert_close(saved_latent(server, "tf_again"), saved_latent(server, "tf_ref"), atol=1e-4, rtol=1e-4)


def _training_free_prompt(prefix, steps=10, tau=10.0):
    p = _prompt(None, prefix=prefix, steps=steps)
    p["1"]["inputs"]["unet_name"] = "tiny_wan22_5b.safetensors"
    p["6"] = {"class_type": "VortaTestLatent", "inputs": {"channels": 48, "frames": 3, "height": 8, "width": 12}}
    training_free_apply(p, tau=tau, warmup_percent=10.0, seed=3, keep_on_disk=False)
    p["9"] = {"class_type": "VortaGateVisualizer", "inputs": {"model": ["3", 0], "mode": "last run", "steps": steps,
                                                              "scheduler": "simple", "latent": ["7", 0]}}
    return p


def test_saved_measured_router_loads_and_routes_with_no_measuring(server):
    """Save Measured Router writes the last run's measurements as a router file; the Router Loader
    lists it (not the cache folder's files) and, loaded into Apply, it routes a 10-step run with the
    training-free run's tables and measures nothing; queued again, it saves under the next free
    numbered name and leaves the first file as it was."""
    name = f"measured_{server.version.replace('.', '_')}"
    p = _training_free_prompt("tf_save")
    p["11"] = {"class_type": "VortaSaveMeasuredRouter", "inputs": {"model": ["3", 0], "filename": name,
                                                                   "latent": ["7", 0]}}
    entry = server.run(p)
    measured_steps = gates(entry, "9")["steps"]
    assert any(set(s[2:]) - {"0"} for s in measured_steps)  # it routed something
    path = server.base / "models" / "vorta_routers" / f"{name}.safetensors"
    assert path.exists()
    info = server.get("/object_info/VortaRouterLoader")["VortaRouterLoader"]["input"]["required"]["router_name"]
    options = info[0] if isinstance(info[0], list) else info[1].get("options", [])
    assert f"{name}.safetensors" in options and not any(o.startswith("tables") for o in options), options
    q = _training_free_prompt("tf_loaded")
    q["2"] = {"class_type": "VortaRouterLoader", "inputs": {"router_name": f"{name}.safetensors"}}
    mark = len(server.log.read_text())
    entry = server.run(q)
    log = _log_since(server, mark)
    assert "training-free router measured" not in log and "VORTA:" not in log, log[-2000:]
    loaded_steps = gates(entry, "9")["steps"]
    # the measured steps of the first run were dense only where the warm-up says so; all others match
    assert loaded_steps == measured_steps, (loaded_steps, measured_steps)
    stamp = path.stat().st_mtime_ns, path.read_bytes()
    entry = server.run(p)  # queued again (say with another seed): a new numbered file, the first untouched
    assert (path.stat().st_mtime_ns, path.read_bytes()) == stamp
    second = path.with_name(f"{name}_00001_.safetensors")
    assert second.exists() and entry["outputs"]["11"]["text"][0].endswith(second.name)
