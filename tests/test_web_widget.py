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
    assert [t.rsplit(" ", 1)[0] for t in legend] == [b.label for b in BRANCHES]


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
    assert [t for _, t in res["texts"]] == ["A 16.7%", "B 16.7%", "C 16.7%", "D 50.0%"]
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
    assert [t.rsplit(" ", 1)[0] for _, t in res["texts"]] == data["branches"]


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
