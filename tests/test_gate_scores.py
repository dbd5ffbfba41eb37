"""The gate view's "why": per-step scores in the web payload (nodes/gate_data.py) and the summary."""
from __future__ import annotations

import base64
import math

import pytest
import torch

from nodes.gate_data import chosen_scores, decode_scores, encode_scores, summarize, web_payload
from vorta_ops.branches import N_BRANCHES


def _probs(steps, blocks, heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(blocks, heads, N_BRANCHES, generator=g).softmax(-1) for _ in range(steps)]


def test_probabilities_round_trip_within_quantisation_and_in_the_documented_order():
    S, Bk, H = 3, 5, 4
    probs = _probs(S, Bk, H)
    tables = torch.stack([p.argmax(-1) for p in probs]).to(torch.int8)
    data = web_payload(tables, [f"s{i}" for i in range(S)], "probability", probs)
    assert data["score_kind"] == "probability" and "tau" not in data and len(data["scores"]) == S
    for p, enc in zip(probs, data["scores"]):
        raw = base64.b64decode(enc)
        assert len(raw) == Bk * H * N_BRANCHES
        # block-major, then head, then branch; byte = round(p * 255)
        b, h, k = 3, 2, 1
        assert raw[(b * H + h) * N_BRANCHES + k] == round(float(p[b, h, k]) * 255)
        back = decode_scores("probability", enc, Bk, H)
        assert (back - p).abs().max() <= 0.5 / 255 + 1e-6
    assert data["overall"] == pytest.approx([float((tables == i).float().mean()) for i in range(N_BRANCHES)])


def test_errors_round_trip_nan_is_not_measured_and_large_errors_are_capped():
    e = torch.tensor([[[0.0, 0.123, 0.031], [0.0, float("nan"), 7.5]],
                      [[0.0, float("inf"), -0.2], [float("nan")] * 3]])
    enc = encode_scores("error", e)
    raw = list(base64.b64decode(enc))
    assert raw[:6] == [0, 12, 3, 0, 255, 254]
    assert raw[6:] == [0, 254, 0, 255, 255, 255]
    back = decode_scores("error", enc, 2, 2)
    assert math.isnan(back[0, 1, 1]) and torch.isnan(back[1, 1]).all()
    assert back[0, 0].tolist() == pytest.approx([0.0, 0.12, 0.03])
    assert back[0, 1, 2] == pytest.approx(2.54)  # capped: ">= 2.54"
    fin = torch.isfinite(e) & (e >= 0) & (e < 2.5)
    assert ((back - e)[fin]).abs().max() <= 0.005 + 1e-6


def test_payload_without_scores_is_the_old_one_and_steps_without_scores_are_null():
    tables = torch.zeros(2, 2, 3, dtype=torch.int8)
    old = web_payload(tables, ["a", "b"])
    assert "score_kind" not in old and "scores" not in old and old["overall"] == [1.0, 0.0, 0.0]
    # no step has scores (or only of the wrong shape): no score fields at all
    assert "scores" not in web_payload(tables, ["a", "b"], "probability", [None, torch.zeros(3, 3, 3)])
    errs = [None, torch.full((2, 3, N_BRANCHES), 0.05)]
    data = web_payload(tables, ["a", "b"], "error", errs, tau=0.3)
    assert data["scores"][0] is None and data["scores"][1] and data["tau"] == 0.3
    # a short list of scores: the missing steps are null; an unknown kind: no scores
    assert web_payload(tables, ["a", "b"], "error", errs[1:], tau=0.3)["scores"][1] is None
    assert "scores" not in web_payload(tables, ["a", "b"], "bogus", errs)


def test_decode_refuses_bad_strings():
    assert decode_scores("probability", None, 2, 2) is None
    assert decode_scores("probability", "", 2, 2) is None
    assert decode_scores("probability", "not base64!", 2, 2) is None
    assert decode_scores("probability", base64.b64encode(b"\x00" * 5).decode(), 2, 2) is None


def test_summary_adds_the_chosen_branchs_mean_score_per_step():
    tables = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [1, 1]]], dtype=torch.int8)
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.0, 0.4, 0.6]])
    probs = [p.reshape(2, 2, 3), None]
    text = summarize(tables, ["step 0", "step 1"], "probability", probs)
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["chosen", "p"]
    assert lines[1].split() == ["step", "0", "25.0%", "25.0%", "50.0%", f"{(0.2 + 0.8 + 0.8 + 0.6) / 4:.3f}"]
    assert lines[2].split() == ["step", "1", "0.0%", "100.0%", "0.0%", "-"]
    assert lines[3].split()[-1] == f"{(0.2 + 0.8 + 0.8 + 0.6) / 4:.3f}"
    # errors: the chosen branch's (full 0), NaN (not measured) left out of the mean
    e = torch.tensor([[0.0, 0.1, float("nan")], [0.0, 0.2, 0.4], [0.0, 0.5, 0.3], [0.0, 0.1, 0.1]]).reshape(2, 2, 3)
    text = summarize(tables, ["step 0", "step 1"], "error", [e, e])
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["chosen", "err"]
    assert lines[1].split()[-1] == f"{(0.0 + 0.2 + 0.3 + 0.1) / 4:.3f}"
    assert lines[2].split()[-1] == f"{(0.1 + 0.2 + 0.5 + 0.1) / 4:.3f}"
    assert chosen_scores(tables[0], e).shape == (2, 2)
    # without scores: the old table
    assert summarize(tables, ["step 0", "step 1"]).splitlines()[1].split() == ["step", "0", "25.0%", "25.0%", "50.0%"]
