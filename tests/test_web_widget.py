"""The gate widget's drawing code, run in Node.js against a recording canvas context."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the web widget's module")


def run_js(code: str) -> str:
    res = subprocess.run([NODE, "--input-type=module", "-e", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def draw(data, step=1, width=300, height=200) -> dict:
    """drawGates on a recording context: the cell size, every fillRect [fill, x, y, w, h], every
    fillText [fill, text], and stepShares of the step."""
    out = run_js(
        "import {drawGates, stepShares} from './web/vorta_gates_draw.js';"
        f"const data = {json.dumps(data)};"
        "const rects = [], texts = []; const ctx = {fillRect(x, y, w, h) { rects.push([this.fillStyle, x, y, w, h]); },"
        " fillText(t) { texts.push([this.fillStyle, t]); }, set font(v) {}};"
        f"const cell = drawGates(ctx, data, {step}, {width}, {height});"
        f"console.log(JSON.stringify({{cell, rects, texts, shares: stepShares(data, {step})}}));"
    )
    return json.loads(out)


def cells_of(res) -> list:
    cell = res["cell"]
    return [r for r in res["rects"] if r[3] == cell and r[4] == cell]


def swatches_of(res) -> list:
    """This step's legend swatches (10 px; the all-steps legend's are 8 px)."""
    return [r[0] for r in res["rects"] if r[3] == 10 and r[4] == 10]


def test_widget_draws_each_cell_in_its_branch_colour():
    from nodes.gate_data import web_payload
    from vorta_ops.branches import BRANCHES

    tables = torch.tensor([[[0, 1, 2], [2, 2, 1]], [[1, 1, 1], [0, 2, 2]]], dtype=torch.int8)
    data = web_payload(tables, ["a", "b"])
    res = draw(data)
    cell = res["cell"]
    colour = {b.hex: b.id for b in BRANCHES}  # the payload's colours are the branch table's
    cells = cells_of(res)
    assert len(cells) == 6
    for fill, x, y, _, _ in cells:
        assert colour[fill] == int(tables[1, y // cell, x // cell])
    assert res["shares"] == pytest.approx([1 / 6, 3 / 6, 2 / 6])
    assert swatches_of(res) == [b.hex for b in BRANCHES]
    legend = [t for _, t in res["texts"]]
    assert [t.rsplit(" ", 1)[0] for t in legend[:3]] == [b.label for b in BRANCHES]
    # then the shares over all steps (the payload's "overall")
    assert legend[3:] == ["all steps:", "full 16.7%", "core-set 41.7%", "sliding tile 41.7%"]


def test_widget_draws_the_payloads_colours_and_labels():
    """Colours, names and the number of branches come from the payload (here 4 branches, none of
    the built-in colours), not from the widget."""
    data = {"blocks": 2, "heads": 3, "branches": ["a", "b", "c", "d"], "branch_labels": ["A", "B", "C", "D"],
            "colours": ["#101010", "#ff00ff", "#123456", "#abcdef"], "labels": ["s0", "s1"],
            "steps": ["000000", "012333"]}
    res = draw(data)
    cell = res["cell"]
    want = [[0, 1, 2], [3, 3, 3]]
    cells = cells_of(res)
    assert len(cells) == 6
    for fill, x, y, _, _ in cells:
        assert fill == data["colours"][want[y // cell][x // cell]]
    assert swatches_of(res) == data["colours"]
    assert [t for _, t in res["texts"]][:4] == ["A 16.7%", "B 16.7%", "C 16.7%", "D 50.0%"]
    # no "overall" in this payload: counted from the steps
    assert [t for _, t in res["texts"]][4:] == ["all steps:", "A 58.3%", "B 8.3%", "C 8.3%", "D 25.0%"]
    assert res["shares"] == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])


def test_widget_without_colours_uses_the_first_tables_colours():
    """A payload from before "colours" (tests/frontend_check.mjs feeds one) draws in the built-in
    colours, which are the branch table's; an id the payload does not know is drawn black."""
    from vorta_ops.branches import BRANCHES

    data = {"blocks": 2, "heads": 3, "branches": ["full", "coreset", "sliding_tile"],
            "labels": ["step 0", "step 1"], "steps": ["012210", "111229"]}
    res = draw(data)
    cell = res["cell"]
    colour = {f"rgb({r},{g},{b})": i for i, (r, g, b) in enumerate(b.colour for b in BRANCHES)}
    for fill, x, y, _, _ in cells_of(res):
        k = data["steps"][1][(y // cell) * 3 + x // cell]
        assert (fill == "#000") if k == "9" else (colour[fill] == int(k))
    assert [colour[f] for f in swatches_of(res)] == [0, 1, 2]
    assert [t.rsplit(" ", 1)[0] for _, t in res["texts"]][:3] == data["branches"]


def test_web_payload_carries_the_table():
    from nodes.gate_data import web_payload
    from vorta_ops.branches import BRANCH_NAMES, BRANCHES

    data = web_payload(torch.tensor([[[0, 1], [2, 2]]], dtype=torch.int8), ["s0"])
    assert data["branches"] == list(BRANCH_NAMES)
    assert data["branch_labels"] == [b.label for b in BRANCHES]
    assert data["colours"] == [b.hex for b in BRANCHES]
    assert data["steps"] == ["0122"] and data["labels"] == ["s0"] and (data["blocks"], data["heads"]) == (2, 2)


def test_extension_module_parses():
    res = subprocess.run([NODE, "--check", str(ROOT / "web" / "vorta_gates.js")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_summary_lists_shares_per_step():
    from nodes.gate_data import summarize

    tables = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [1, 1]]], dtype=torch.int8)
    text = summarize(tables, ["step 0", "step 1"])
    lines = text.splitlines()
    assert lines[1].split() == ["step", "0", "25.0%", "25.0%", "50.0%"]
    assert lines[2].split() == ["step", "1", "0.0%", "100.0%", "0.0%"]
    assert lines[3].split() == ["all", "steps", "12.5%", "62.5%", "25.0%"]


# ---- the "why": scores, hit-testing, hover text (web/vorta_gates_draw.js against nodes/gate_data.py) ----

def call_js(data, expr: str):
    """Evaluates `expr` with the draw module's exports as M and the payload as data; -> its JSON."""
    out = run_js(
        "import * as M from './web/vorta_gates_draw.js';"
        f"const data = {json.dumps(data)};"
        f"console.log(JSON.stringify({expr}));"
    )
    return json.loads(out)


def _payload_with_probs(S=3, B=40, H=40, seed=0):
    from nodes.gate_data import web_payload
    from vorta_ops.branches import N_BRANCHES

    g = torch.Generator().manual_seed(seed)
    probs = [torch.randn(B, H, N_BRANCHES, generator=g).mul(2).softmax(-1) for _ in range(S)]
    tables = torch.stack([p.argmax(-1) for p in probs]).to(torch.int8)
    return web_payload(tables, [f"step {i}" for i in range(S)], "probability", probs), tables, probs


def test_js_decodes_the_python_scores():
    from nodes.gate_data import decode_scores

    data, tables, probs = _payload_with_probs(S=2, B=5, H=7)
    cells = [(0, 0), (4, 6), (2, 3)]
    got = call_js(data, "[" + ",".join(f"M.cellScores(data, 1, {b}, {h})" for b, h in cells) + "]")
    ref = decode_scores("probability", data["scores"][1], 5, 7)
    for (b, h), vals in zip(cells, got):
        assert vals == pytest.approx(ref[b, h].tolist(), abs=1e-6)
        assert vals == pytest.approx(probs[1][b, h].tolist(), abs=0.5 / 255 + 1e-6)
    # errors: 255 bytes are not measured (NaN, which JSON writes as null)
    from nodes.gate_data import web_payload

    e = torch.tensor([[[0.0, float("nan"), 0.07]]])
    d = web_payload(torch.zeros(1, 1, 1, dtype=torch.int8), ["s"], "error", [e], tau=0.3)
    assert call_js(d, "M.cellScores(data, 0, 0, 0)") == [0, None, 0.07]
    # outside the grid, a step without scores, or no scores at all: null
    assert call_js(d, "[M.cellScores(data, 0, 1, 0), M.cellScores(data, 5, 0, 0)]") == [None, None]


def test_hit_test_maps_pixels_to_block_and_head_at_40x40_in_a_small_canvas():
    data, _, _ = _payload_with_probs(S=1)
    width, height = 260, 320
    res = call_js(data, f"(() => {{ const L = M.gridLayout(data, {width}, {height}); const c = L.cell;"
                        f" return {{cell: c, hits: [[0,0],[c*7+1, c*3+c-1],[c*40-1, c*40-1],[c*40, 5],[5, c*40],[-1, 3]]"
                        f".map(([x, y]) => M.hitTest(data, {width}, {height}, x, y))}}; }})()")
    assert res["cell"] >= 4  # readable: 40 heads in 260 px
    assert res["hits"][:3] == [{"block": 0, "head": 0}, {"block": 3, "head": 7}, {"block": 39, "head": 39}]
    assert res["hits"][3:] == [None, None, None]  # right of, under, and left of the grid
    # the grid and the legend fit the canvas
    lay = call_js(data, f"M.gridLayout(data, {width}, {height})")
    assert lay["height"] + lay["legendH"] <= height and lay["width"] <= width
    # the size the widget asks for at 40 x 40 keeps cells of at least MIN_CELL px
    want = call_js(data, "[M.preferredCanvasSize(data, 200), M.MIN_CELL]")
    size, min_cell = want
    assert min_cell >= 4 and size["width"] >= 40 * min_cell
    assert call_js(data, f"M.gridLayout(data, {size['width']}, {size['minHeight']}).cell") >= min_cell


def test_hover_text_names_the_branch_and_the_probabilities():
    data, tables, probs = _payload_with_probs(S=2, B=4, H=5)
    from vorta_ops.branches import BRANCHES

    b, h = 2, 3
    text = call_js(data, f"M.cellText(data, 1, {b}, {h})")
    byte = [round(float(v) * 255) for v in probs[1][b, h]]
    k = int(tables[1, b, h])
    want = (f"block {b} · head {h} · {BRANCHES[k].label} · p {byte[k] / 255:.2f} ("
            + ", ".join(f"{br.label} {x / 255:.2f}" for br, x in zip(BRANCHES, byte)) + ")")
    assert text == want
    # the example of the issue
    assert text.startswith(f"block {b} · head {h} · ") and " · p " in text


def test_hover_text_lists_the_measured_errors_and_tau():
    from nodes.gate_data import web_payload

    e = torch.tensor([[[0.0, 0.12, 0.03], [0.0, float("nan"), 9.0]]])
    table = torch.tensor([[[2, 0]]], dtype=torch.int8)
    data = web_payload(table, ["step 0"], "error", [e], tau=0.3)
    assert call_js(data, "[M.cellText(data, 0, 0, 0), M.cellText(data, 0, 0, 1)]") == [
        "block 0 · head 0 · sliding tile · errors: core-set 0.12, sliding tile 0.03 (tau 0.30)",
        "block 0 · head 1 · full · errors: core-set n/a, sliding tile >=2.54 (tau 0.30)",
    ]
    # a step with no scores (e.g. a warm-up or a measured step) says so
    data2 = web_payload(torch.cat([table, table]), ["s0", "s1"], "error", [None, e], tau=0.3)
    assert call_js(data2, "M.cellText(data, 0, 0, 0)") == "block 0 · head 0 · sliding tile · no scores for this step"
    # an old payload (no scores): the branch only
    old = {"blocks": 1, "heads": 2, "branches": ["full", "coreset", "sliding_tile"], "labels": ["s"], "steps": ["20"]}
    assert call_js(old, "M.cellText(data, 0, 0, 0)") == "block 0 · head 0 · sliding_tile"


def test_overall_shares_and_bad_payloads_never_throw():
    data, tables, _ = _payload_with_probs(S=3, B=3, H=4)
    want = [float((tables == i).float().mean()) for i in range(3)]
    assert call_js(data, "M.overallShares(data)") == pytest.approx(want)
    del data["overall"]  # an older payload: counted from the steps
    assert call_js(data, "M.overallShares(data)") == pytest.approx(want)
    # corrupt scores: no scores, no exception; not a payload at all: isPayload false, empty text
    data["scores"] = ["!!!", "AAAA", 7]
    assert call_js(data, "[0, 1, 2].map((s) => M.cellScores(data, s, 0, 0))") == [None, None, None]
    assert call_js(data, "M.cellText(data, 0, 0, 0)").endswith("no scores for this step")
    for bad in ({}, {"blocks": 2}, {"blocks": 0, "heads": 1, "steps": [""]}, {"blocks": 1, "heads": 1, "steps": [3]}):
        assert call_js(bad, "[M.isPayload(data), M.cellText(data, 0, 0, 0), M.hitTest(data, 10, 10, 1, 1)]") == [False, "", None]


def test_hover_outline_is_drawn_on_the_hovered_cell():
    data, _, _ = _payload_with_probs(S=1, B=2, H=3)
    out = run_js(
        "import {drawGates} from './web/vorta_gates_draw.js';"
        f"const data = {json.dumps(data)};"
        "const strokes = []; const ctx = {fillRect() {}, fillText() {}, set font(v) {},"
        " strokeRect(x, y, w, h) { strokes.push([x, y, w, h]); }};"
        "const cell = drawGates(ctx, data, 0, 300, 200, {block: 1, head: 2});"
        "console.log(JSON.stringify({cell, strokes}));"
    )
    res = json.loads(out)
    c = res["cell"]
    assert res["strokes"] == [[2 * c + 0.5, c + 0.5, c - 1, c - 1]]
