"""A real headless ComfyUI with this pack: tiny random-weight Wan / HunyuanVideo checkpoints,
prompts posted to /prompt, results read from /history and the output folder."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import comfy_harness as h
from comfy_fixtures import MIX, WAN_BLOCKS, gates, hunyuan_prompt, saved_latent, wan_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(h.skip_reason() is not None, reason=h.skip_reason() or "")]

def test_routed_run_executes_the_table_and_the_picture_shows_it(server):
    entry = server.run(wan_prompt("wan_mix.safetensors", prefix="mix"))
    executed, predicted = gates(entry, "9"), gates(entry, "10")
    flat = "".join(str(b) for row in MIX for b in row)
    assert executed["steps"] == [flat] * 3 and predicted["steps"] == [flat] * 3
    assert (executed["blocks"], executed["heads"]) == (2, 2)
    assert entry["outputs"]["9"]["images"][0]["type"] == "temp"
    assert "coreset 50.0%, sliding_tile 50.0%" in server.log.read_text()


def test_live_router_predicted_equals_executed(server):
    entry = server.run(wan_prompt("wan_live.safetensors", prefix="live"))
    assert gates(entry, "9")["steps"] == gates(entry, "10")["steps"]


def test_all_full_router_is_bit_identical_and_the_original_model_is_untouched(server):
    server.run(wan_prompt(prefix="base"))
    server.run(wan_prompt("wan_full.safetensors", prefix="full"))
    # one prompt holding both the plain model and a patched clone of it
    both = wan_prompt("wan_mix.safetensors", prefix="routed", extra={
        "17": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
                                                     "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0],
                                                     "latent_image": ["6", 0], "denoise": 1.0}},
        "18": {"class_type": "SaveLatent", "inputs": {"samples": ["17", 0], "filename_prefix": "plain"}},
    })
    server.run(both)
    plain, routed = saved_latent(server, "plain"), saved_latent(server, "routed")
    base_l, full_l = saved_latent(server, "base"), saved_latent(server, "full")
    assert torch.equal(full_l, base_l)
    assert torch.equal(plain, base_l)
    assert not torch.equal(routed, base_l)  # routing really changed the computation
    assert torch.isfinite(routed).all()


def test_routed_output_equals_the_reference_routed_computation(server):
    server.run(wan_prompt("wan_live.safetensors", prefix="fast", tile="1,2,3", window="1,3,1"))
    ref = wan_prompt("wan_live.safetensors", prefix="slow", tile="1,2,3", window="1,3,1", extra={
        "30": {"class_type": "VortaTestReferenceOverride", "inputs": {"model": ["3", 0]}}})
    ref["7"]["inputs"]["model"] = ["30", 0]
    server.run(ref)
    fast, slow = saved_latent(server, "fast"), saved_latent(server, "slow")
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    server.run(wan_prompt(prefix="plain_ref"))
    assert (fast - saved_latent(server, "plain_ref")).abs().max() > 1e-3  # and it is not just dense


def test_chains_to_an_earlier_override(server, tmp_path):
    log_mix, log_full = tmp_path / "mix.txt", tmp_path / "full.txt"
    server.run(wan_prompt("wan_mix.safetensors", prefix="chain_mix", override_file=log_mix))
    server.run(wan_prompt("wan_full.safetensors", prefix="chain_full", override_file=log_full))
    mix, full = log_mix.read_text().splitlines(), log_full.read_text().splitlines()
    calls = 3 * WAN_BLOCKS  # steps x blocks; cond and uncond are one batch
    # mix: no full heads, so only the cross-attention calls reach the earlier override
    assert len(mix) == calls and all(line.split(") (")[1].startswith("2, 8,") for line in mix)
    # all full: self-attention goes to it as well
    assert len(full) == 2 * calls
    # the earlier override serves everything dense: all-full routing still changes nothing
    assert torch.equal(saved_latent(server, "chain_full"), saved_latent(server, "chain_mix")) is False


def test_mismatched_router_is_rejected_at_prompt_with_both_sizes(server, tmp_path):
    """The fit is checked from the file headers when the prompt is posted, before anything loads,
    also when the model reaches Apply through another patch node."""
    for override in (None, tmp_path / "calls.txt"):
        with pytest.raises(h.PromptRejected) as e:
            server.run(wan_prompt("wan_3blocks.safetensors", prefix="bad", override_file=override))
        errors = e.value.body["node_errors"]
        assert list(errors) == ["3"]  # VORTA Apply, and nothing else
        assert len(errors["3"]["errors"]) == 1, errors  # one message per node, not one per input
        msg = json.dumps(errors)
        assert "blocks: router 3, model 2" in msg and "Load the router trained for this model" in msg
        assert "wan-14B" in msg
    # switched off, Apply passes the model through: the same router is no error, and the
    # visualizers show full attention everywhere instead of failing the workflow
    p = wan_prompt("wan_3blocks.safetensors", prefix="bad_off")
    p["3"]["inputs"]["enabled"] = False
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == gates(entry, "10")["steps"] == ["0000"] * 3


def test_mismatch_not_traceable_at_prompt_still_fails_clearly_at_apply(server, tmp_path):
    """A model the /prompt check cannot trace for certain (here: behind a merge node, which takes
    model1/model2 rather than handing on one "model") is left to Apply, which names both sizes
    when it runs."""
    p = wan_prompt("wan_3blocks.safetensors", prefix="bad_late")
    # ModelMergeSimple takes model1/model2: not a "model" pass-through, so the walk stops there
    p["21"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["1", 0], "ratio": 0.5}}
    p["3"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(h.PromptFailed) as e:
        server.run(p)
    assert "blocks: router 3, model 2" in json.dumps(e.value.status)


def test_bad_option_is_rejected_at_validation(server):
    p = wan_prompt("wan_mix.safetensors", window="2,3,3", prefix="badopt")
    with pytest.raises(h.PromptRejected) as e:
        server.run(p)
    assert "window must be odd" in json.dumps(e.value.body)
    assert len(e.value.body["node_errors"]["3"]["errors"]) == 1


def test_hunyuan_mismatch_names_the_hunyuan_router(server):
    p = wan_prompt("wan_mix.safetensors", prefix="hy_bad")
    p["1"]["inputs"]["unet_name"] = "tiny_hunyuan.safetensors"
    with pytest.raises(h.PromptRejected) as e:
        server.run(p)
    errors = e.value.body["node_errors"]["3"]["errors"]
    assert len(errors) == 1
    msg = errors[0]["details"]
    assert "family: router wan, model hunyuan" in msg and "wan-14B" not in msg and "hunyuan" in msg.split("Load the router")[1]


def test_hunyuan_video_routes_video_tokens_with_text_after(server):
    p = hunyuan_prompt()
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["1221"] * 2
    log = server.log.read_text()
    assert "routed attention failed" not in log
    assert torch.isfinite(saved_latent(server, "hy")).all()
    # equal to the per-head reference with the text where this ComfyUI puts it (0.3.64: after the
    # video; 0.19.3: before it)
    p["30"] = {"class_type": "VortaTestReferenceOverride", "inputs": {"model": ["3", 0]}}
    p["7"]["inputs"]["model"] = ["30", 0]
    p["8"]["inputs"]["filename_prefix"] = "hy_ref"
    p.pop("9")
    server.run(p)
    torch.testing.assert_close(saved_latent(server, "hy"), saved_latent(server, "hy_ref"), atol=1e-4, rtol=1e-4)
    plain = {k: v for k, v in p.items() if k not in ("2", "3", "30")}
    plain["7"] = copy.deepcopy(p["7"])
    plain["7"]["inputs"]["model"] = ["1", 0]
    plain["8"] = dict(p["8"], inputs=dict(p["8"]["inputs"], filename_prefix="hy_plain"))
    server.run(plain)
    assert (saved_latent(server, "hy") - saved_latent(server, "hy_plain")).abs().max() > 1e-4  # not just dense


WORKFLOWS = sorted((h.ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_converts_and_validates(server, path):
    wf = json.loads(path.read_text())
    info = server.get("/object_info")
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, sslot, dst, dslot, typ in wf["links"]:  # links agree with both ends and the schemas
        assert nodes[src]["outputs"][sslot]["type"] == typ and lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == lid
        assert info[nodes[src]["type"]]["output"][sslot] == typ
    types = {n["type"] for n in wf["nodes"]}
    assert {"VortaApply", "VortaGateVisualizer"} <= types and types & {"VortaRouterLoader", "VortaTrainingFreeRouter"}
    if "VortaRouterLoader" in types:  # the note says where the router file goes
        assert any(n["type"] == "Note" and "models/vorta_routers" in n["widgets_values"][0] for n in wf["nodes"])
    else:
        assert any(n["type"] == "Note" and "no router file" in n["widgets_values"][0] for n in wf["nodes"])
    prompt = h.ui_to_api(wf, info)
    code, body = server.post("/prompt", {"prompt": prompt, "client_id": "vorta-tests"})
    # the real model files are not here: the only errors allowed are missing files in file combos
    assert code == 400, body
    errors = [(nid, e) for nid, ne in body["node_errors"].items() for e in ne["errors"]]
    assert errors
    for nid, e in errors:
        assert e["type"] == "value_not_in_list", (nid, e)
        assert e["extra_info"]["input_name"].endswith(("_name", "_name1", "_name2")), (nid, e)


def test_fp8_weights_route_too(server):
    """Only attention is touched: a model loaded with fp8 weights (manual cast) routes the same way."""
    p = wan_prompt("wan_mix.safetensors", prefix="fp8")
    p["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["1221"] * 3
    assert torch.isfinite(saved_latent(server, "fp8")).all()


def test_web_extension_is_served(server):
    listed = server.get("/extensions")
    assert "/extensions/comfyui-vorta/vorta_gates.js" in listed
    import urllib.request

    with urllib.request.urlopen(server.url + "/extensions/comfyui-vorta/vorta_gates_draw.js") as r:
        assert b"export function drawGates" in r.read()


def test_wan22_5b_odd_resolution_routes(server):
    """Wan 2.2 5B (48 latent channels) at a grid that no tile divides: padded, never asserted on."""
    p = wan_prompt("wan_mix.safetensors", prefix="w22", tile="auto", window="3,3,3")
    p["1"]["inputs"]["unet_name"] = "tiny_wan22_5b.safetensors"
    p["6"] = {"class_type": "VortaTestLatent", "inputs": {"channels": 48, "frames": 3, "height": 10, "width": 14}}
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["1221"] * 3
    assert "routed attention failed" not in server.log.read_text()
    out = saved_latent(server, "w22")
    assert out.shape == (1, 48, 3, 10, 14) and torch.isfinite(out).all()


def test_wan_i2v_routes_self_attention_and_leaves_both_cross_attentions(server, tmp_path):
    """Wan I2V cross-attends twice per block (CLIP image tokens, then text); neither is routed."""
    log_file = tmp_path / "calls.txt"
    p = wan_prompt("wan_mix.safetensors", prefix="i2v", override_file=log_file)
    p["1"]["inputs"]["unet_name"] = "tiny_wan_i2v.safetensors"
    for n in ("4", "5"):
        p[n]["inputs"]["clip_vision"] = True
    entry = server.run(p)
    assert gates(entry, "9")["steps"] == ["1221"] * 3
    keys = [line.split(") (")[1].split(",")[1].strip() for line in log_file.read_text().splitlines()]
    # every call that reached the earlier override is a cross-attention: 257 image or 8 text keys
    assert sorted(set(keys)) == ["257", "8"] and len(keys) == 2 * 3 * WAN_BLOCKS
    assert "routed attention failed" not in server.log.read_text()
    assert torch.isfinite(saved_latent(server, "i2v")).all()


@pytest.mark.skipif(h.gguf_skip_reason() is not None, reason=h.gguf_skip_reason() or "")
def test_gguf_quantized_model_routes_and_equals_the_reference(server):
    """A Q8_0 GGUF Wan loaded by ComfyUI-GGUF's Unet Loader (its own ops dequantize the weights):
    routed as the table says, and equal to the reference routed computation on that model."""
    def gguf_prompt(prefix, reference=False):
        p = wan_prompt("wan_live.safetensors", prefix=prefix, tile="1,2,3", window="1,3,1")
        p["1"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_wan_q8.gguf"}}
        if reference:
            p["30"] = {"class_type": "VortaTestReferenceOverride", "inputs": {"model": ["3", 0]}}
            p["7"]["inputs"]["model"] = ["30", 0]
        return p

    entry = server.run(gguf_prompt("gguf_fast"))
    assert gates(entry, "9")["steps"] == gates(entry, "10")["steps"]
    assert "routed attention failed" not in server.log.read_text()
    server.run(gguf_prompt("gguf_slow", reference=True))
    fast, slow = saved_latent(server, "gguf_fast"), saved_latent(server, "gguf_slow")
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    # a router that does not fit is refused at /prompt for a GGUF file too (its header read by gguf)
    bad = gguf_prompt("gguf_bad")
    bad["2"]["inputs"]["router_name"] = "wan_3blocks.safetensors"
    with pytest.raises(h.PromptRejected) as e:
        server.run(bad)
    assert "blocks: router 3, model 2" in json.dumps(e.value.body["node_errors"])
    # the quantized weights really were used: not the float model's result
    server.run(wan_prompt("wan_live.safetensors", prefix="gguf_float", tile="1,2,3", window="1,3,1"))
    assert not torch.equal(fast, saved_latent(server, "gguf_float"))


def test_gate_view_says_why_with_the_routers_probabilities(server):
    """File router: each step of both gate views carries the router's probabilities (the predicted
    view from the same step context its table comes from); the chosen branch is the argmax here (no
    head under tau_sparse), and the summary adds the chosen branch's mean probability."""
    from nodes.gate_data import decode_scores

    entry = server.run(wan_prompt("wan_live.safetensors", prefix="why_p"))
    for node in ("9", "10"):
        g = gates(entry, node)
        assert g["score_kind"] == "probability" and "tau" not in g and len(g["scores"]) == len(g["steps"]) == 3
        for table, enc in zip(g["steps"], g["scores"]):
            p = decode_scores("probability", enc, g["blocks"], g["heads"])
            assert torch.allclose(p.sum(-1), torch.ones(g["blocks"], g["heads"]), atol=2 / 255)
            assert "".join(str(int(i)) for i in p.argmax(-1).reshape(-1)) == table
        assert g["overall"] == pytest.approx([sum(s.count(str(i)) for s in g["steps"]) / 12 for i in range(3)])
        assert "chosen p" in entry["outputs"][node]["text"][0]
    assert gates(entry, "9")["scores"] == gates(entry, "10")["scores"]


def test_gate_view_says_why_with_the_training_free_routers_errors(server):
    """Training-free router: once its measurements exist (a second run measures nothing: they are
    cached), the executed view carries the measured errors (full's 0) behind each routed step, and
    its tau; the summary adds the chosen branch's mean error."""
    from nodes.gate_data import decode_scores

    p = wan_prompt("unused", prefix="why_e")
    p["2"] = {"class_type": "VortaTrainingFreeRouter", "inputs": {"tau": 10.0, "warmup_percent": 0.0, "bins": 2,
                                                                   "rows": 16, "seed": 0}}
    p["7"]["inputs"]["steps"] = p["9"]["inputs"]["steps"] = 4
    p.pop("10")
    server.run(p)
    p["7"]["inputs"]["seed"] = 1  # a new run of the same model, grid and schedule: routed from the measurements
    entry = server.run(p)
    g = gates(entry, "9")
    assert g.get("score_kind") == "error" and g["tau"] == 10.0 and len(g["scores"]) == 4, g
    measured = [i for i, enc in enumerate(g["scores"]) if enc is not None]
    assert measured, g
    for i in measured:
        e = decode_scores("error", g["scores"][i], g["blocks"], g["heads"])
        assert (e[..., 0] == 0).all()
        chosen = e.gather(-1, torch.tensor([int(c) for c in g["steps"][i]]).reshape(g["blocks"], g["heads"], 1))
        assert not (chosen > 10.0).any()  # NaN (not measured) compares False
        assert any(c != "0" for c in g["steps"][i]) or torch.isnan(e[..., 1:]).all()
    assert "chosen err" in entry["outputs"]["9"]["text"][0]
