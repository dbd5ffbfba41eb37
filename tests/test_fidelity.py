"""VORTA Fidelity Check's part without ComfyUI (nodes/fidelity_data.py): the metrics on known
tensors, the pass clock, the report text, the plot geometry, and the dense clone (VORTA's patch
taken off a copy, the patched model left as it was) against a small ModelPatcher fake."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import copy

from model_fakes import WanModel
from nodes import patch as P
from nodes.fidelity_data import (FidelityReport, PassClock, StepRow, cosine, layout_plot, psnr, rel_l2, render_plot,
                                 summary_text, vorta_state_of, web_payload, without_vorta)
from vorta_ops.router import RouterSet


def test_identical_tensors_give_zero_one_inf():
    x = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    assert rel_l2(x, x.clone()) == 0.0
    assert cosine(x, x.clone()) == 1.0
    p, peak = psnr(x, x.clone())
    assert p == math.inf and peak == pytest.approx(float(x.max() - x.min()))


def test_known_values():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    x = torch.tensor([3.0, 5.0])  # diff norm 1
    assert rel_l2(x, ref) == pytest.approx(0.2)
    assert cosine(x, ref) == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    # peak = 4 - 3 = 1, mse = 1/2 -> 10 log10(2)
    p, peak = psnr(x, ref)
    assert peak == 1.0 and p == pytest.approx(10 * math.log10(2.0))
    assert cosine(-ref, ref) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)


def test_scale_and_dtype():
    ref = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    assert rel_l2(ref * 1.1, ref) == pytest.approx(0.1, rel=1e-6)  # float32 input
    assert cosine(ref * 3.0, ref) == pytest.approx(1.0, abs=1e-12)
    assert rel_l2(ref.half(), ref.half().float()) == 0.0  # compared in float64 whatever comes in
    # PSNR drops by 20 dB per 10x more error
    noise = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2))
    p1, _ = psnr(ref + 0.01 * noise, ref)
    p2, _ = psnr(ref + 0.1 * noise, ref)
    assert p1 - p2 == pytest.approx(20.0, abs=1e-3)  # (float32 sums)


def test_zero_and_constant_references():
    z = torch.zeros(3, 4)
    assert rel_l2(z, z) == 0.0 and cosine(z, z) == 1.0 and psnr(z, z)[0] == math.inf
    assert rel_l2(torch.ones(3, 4), z) == math.inf
    assert cosine(torch.ones(3, 4), z) == 0.0
    p, peak = psnr(torch.ones(3, 4), z)  # a constant reference: peak 1
    assert peak == 1.0 and p == pytest.approx(0.0)


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="shapes"):
        rel_l2(torch.zeros(2, 3), torch.zeros(3, 2))


def test_pass_clock_excludes_callback_time():
    t = [0.0]
    clock = PassClock(now=lambda: t[0])
    clock.start()
    t[0] = 5.0  # model loading + step 0
    clock.mark(0)
    with clock.excluding():
        t[0] += 100.0  # a slow preview inside the callback
    for step in (1, 2, 3):
        t[0] += 2.0
        clock.mark(step)
    assert clock.seconds(0) == 5.0 and clock.seconds(3) == 11.0
    assert clock.per_step(3) == pytest.approx(2.0)
    assert clock.per_step(0) is None and clock.seconds(9) is None


def _report(n=4, err=0.01, psnr_db=40.0, full=True, steps=None):
    rows = [StepRow(i, 1.0 - i / n, err * (i + 1), 1.0 - err * (i + 1) / 10) for i in range(n)]
    return FidelityReport(rows, steps or n, psnr_db, 2.5, full, dense_seconds=4.0, routed_seconds=2.0,
                          dense_per_step=1.0, routed_per_step=0.4, routed_total_seconds=2.5,
                          setting="seed 3, euler / simple", vorta_summary="routed run: VORTA - 4 steps")


def test_summary_text_has_one_row_per_step_and_the_definitions():
    text = summary_text(_report())
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]
    assert "this prompt" in text and "peak = max - min of the dense latent" in text
    assert "PSNR of the final latent: 40.00 dB" in text
    assert "routed / dense time: 0.400 (2.50x speed-up)" in text  # per step from step 1 on
    assert "routed run: VORTA - 4 steps" in text


def test_summary_text_identical_and_partial():
    r = FidelityReport([StepRow(0, 1.0, 0.0, 1.0), StepRow(1, 0.5, 0.0, 1.0)], 8, math.inf, 1.0, False,
                       dense_seconds=1.0, routed_seconds=1.0, routed_total_seconds=3.0)
    text = summary_text(r)
    assert "2 of 8 steps checked" in text
    assert "x0) at step 1" in text and "inf (routed equals dense)" in text
    assert "the routed pass ran all 8 steps" in text
    rows = [line.split() for line in text.splitlines() if line[:4].strip().isdigit()]
    assert [(row[2], row[3]) for row in rows] == [("0", "1"), ("0", "1")]
    assert "total of the checked steps" in text  # no per-step times: the ratio is of the totals


def test_web_payload_is_plain_json():
    import json

    r = _report()
    r.psnr = math.inf
    data = json.loads(json.dumps(web_payload(r), allow_nan=False))
    assert data["psnr"] == "inf" and data["steps"] == [0, 1, 2, 3] and len(data["rel_l2"]) == 4
    assert data["time_ratio"] == pytest.approx(0.4)


def _inside(box, outer):
    return box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and box[3] <= outer[3]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("n,err", [(1, 0.0), (4, 0.01), (8, 0.3), (50, 0.002), (200, 1e-7)])
def test_plot_geometry(n, err):
    report = _report(n, err)
    img, lay = render_plot(report, return_layout=True)
    assert img.size == (lay.width, lay.height) and img.mode == "RGB"
    assert 400 <= lay.width <= 1000 and 250 <= lay.height <= 700
    frame = (0, 0, lay.width, lay.height)
    for t in lay.texts:
        assert _inside(t.box, frame), t
    for i, a in enumerate(lay.texts):
        for b in lay.texts[i + 1:]:
            assert not _overlap(a.box, b.box), (a, b)
    assert len(lay.panels) == 2
    top_panel, bottom_panel = lay.panels
    assert top_panel.box[3] < bottom_panel.box[1]
    for p in lay.panels:
        x0, y0, x1, y1 = p.box
        assert len(p.points) == n
        xs = [px for _, px, _ in p.points]
        assert xs == sorted(xs) and len(set(xs)) == n  # one column per step, left to right
        for _, px, py in p.points:
            assert x0 <= px <= x1 and y0 - 1e-6 <= py <= y1 + 1e-6
        assert p.lo < p.hi and len(p.y_ticks) >= 2
        assert all(y0 - 1 <= py <= y1 + 1 for _, py in p.y_ticks)
        assert p.x_ticks and p.x_ticks[0][0] == 0 and len(p.x_ticks) <= 13
        for t in lay.texts:  # no text over a plotting area
            assert not _overlap(t.box, p.box), t
    # rel L2: 0 at the bottom edge, the largest value below the top edge and above the smallest
    rel = top_panel
    ys = [py for _, _, py in rel.points]
    if err > 0 and n > 1:
        assert ys[-1] < ys[0]  # errors grow with the step here: drawn higher
    assert rel.lo == 0.0
    # cosine: never a tick above 1
    assert all(v <= 1.0 + 1e-12 for v, _ in bottom_panel.y_ticks)
    # pixels were painted in each panel (the line colour)
    arr = np.asarray(img)
    for p in lay.panels:
        x0, y0, x1, y1 = p.box
        region = arr[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
        assert (region == np.array(p.colour, dtype=np.uint8)).all(axis=1).any()


def test_plot_skips_non_finite_values_and_says_nan():
    r = _report(3)
    r.rows[1].rel_l2 = math.nan
    r.rows[1].cosine = math.nan
    r.psnr = math.nan
    lay = layout_plot(r)
    assert [s for s, _, _ in lay.panels[0].points] == [0, 2]
    text = summary_text(r)
    assert "nan" in text


# ---- the dense clone ----------------------------------------------------------------------------


class _Model:
    def __init__(self, dm):
        self.diffusion_model = dm


class FakePatcher:
    """What apply_vorta and without_vorta use of ComfyUI's ModelPatcher (clone copies the options
    and the wrappers, as both ComfyUI trees do)."""

    def __init__(self, dm, model_options=None):
        self.model = _Model(dm)
        self.model_options = model_options or {"transformer_options": {}}
        self.wrappers = {}

    def clone(self):
        c = FakePatcher(self.model.diffusion_model, copy.deepcopy(self.model_options))
        c.wrappers = {k: {k1: list(w) for k1, w in v.items()} for k, v in self.wrappers.items()}
        return c

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def set_model_patch_replace(self, patch, name, block_name, number):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault(name, {})[(block_name, number)] = patch


def _router(blocks=2, heads=2):
    b = torch.zeros(blocks, heads, 3)
    b[..., 1] = 10.0
    return RouterSet("wan", torch.zeros(blocks, heads * 3, 256), b.reshape(blocks, heads * 3))


def _snapshot(m):
    to = m.model_options["transformer_options"]
    return (dict(to), {k: dict(v) for k, v in to.get("patches_replace", {}).items()},
            {k: {k1: list(w) for k1, w in v.items()} for k, v in m.wrappers.items()})


def test_dense_clone_takes_vorta_off_and_puts_back_what_was_there():
    def earlier(func, *a, **k):  # e.g. SageAttention set before Apply
        return func(*a, **k)

    def their_block(args, extra):  # a block patch another node set before Apply
        return extra["original_block"](args)

    def other_wrapper(executor, *a, **k):
        return executor(*a, **k)

    base = FakePatcher(WanModel(), {"transformer_options": {P.OVERRIDE_KEY: earlier}})
    base.set_model_patch_replace(their_block, "dit", "double_block", 1)
    base.add_wrapper_with_key(P.OUTER_SAMPLE, "someone_else", other_wrapper)
    patched, state = P.apply_vorta(base, _router(), P.VortaOptions())
    before = _snapshot(patched)
    dense = without_vorta(patched)
    assert _snapshot(patched) == before  # the user's model is untouched
    assert vorta_state_of(patched) is state
    to = dense.model_options["transformer_options"]
    assert P.STATE_KEY not in to and to[P.OVERRIDE_KEY] is earlier
    assert to["patches_replace"]["dit"] == {("double_block", 1): their_block}
    assert dense.wrappers[P.OUTER_SAMPLE] == {"someone_else": [other_wrapper]}
    assert P.WRAPPER_KEY not in dense.wrappers.get(P.DIFFUSION_MODEL, {})
    with pytest.raises(ValueError, match="connect the MODEL output of VORTA Apply"):
        vorta_state_of(dense)


def test_dense_clone_of_a_model_with_nothing_before_apply_has_no_patches_left():
    patched, _ = P.apply_vorta(FakePatcher(WanModel()), _router(), P.VortaOptions())
    to = without_vorta(patched).model_options["transformer_options"]
    assert P.OVERRIDE_KEY not in to and "patches_replace" not in to and P.STATE_KEY not in to


def test_dense_clone_keeps_an_override_set_after_apply():
    patched, state = P.apply_vorta(FakePatcher(WanModel()), _router(), P.VortaOptions())
    later = patched.clone()
    vorta_override = later.model_options["transformer_options"][P.OVERRIDE_KEY]

    def theirs(func, *a, **k):  # chains to the override it found (VORTA's)
        return vorta_override(func, *a, **k)

    later.model_options["transformer_options"][P.OVERRIDE_KEY] = theirs
    dense = without_vorta(later)
    assert dense.model_options["transformer_options"][P.OVERRIDE_KEY] is theirs
    # VORTA's override, reached through theirs with no VORTA run in the options, calls the backend as is
    seen = []
    out = theirs(lambda *a, **k: seen.append(a) or "backend", 1, 2, 3, transformer_options={})
    assert out == "backend" and seen == [(1, 2, 3)]


@pytest.mark.parametrize("model", [None, object(), FakePatcher(WanModel())])
def test_not_patched_is_one_clear_error(model):
    with pytest.raises(ValueError, match="^VORTA Fidelity Check: .*connect the MODEL output of VORTA Apply"):
        without_vorta(model)
