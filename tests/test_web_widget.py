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


def test_widget_draws_each_cell_in_its_branch_colour():
    from nodes.gate_data import web_payload
    from vorta_ops.viz import BRANCH_COLORS

    tables = torch.tensor([[[0, 1, 2], [2, 2, 1]], [[1, 1, 1], [0, 2, 2]]], dtype=torch.int8)
    data = web_payload(tables, ["a", "b"])
    out = run_js(
        "import {drawGates, stepShares} from './web/vorta_gates_draw.js';"
        f"const data = {json.dumps(data)};"
        "const rects = []; const ctx = {fillRect(x, y, w, h) { rects.push([this.fillStyle, x, y, w, h]); },"
        " fillText() {}, set font(v) {}};"
        "const cell = drawGates(ctx, data, 1, 300, 200);"
        "console.log(JSON.stringify({cell, rects, shares: stepShares(data, 1)}));"
    )
    res = json.loads(out)
    cell, rects = res["cell"], res["rects"]
    colour = {f"rgb({r},{g},{b})": i for i, (r, g, b) in enumerate(BRANCH_COLORS)}
    cells = [r for r in rects if r[3] == cell and r[4] == cell]
    assert len(cells) == 6
    for fill, x, y, _, _ in cells:
        assert colour[fill] == int(tables[1, y // cell, x // cell])
    assert res["shares"] == pytest.approx([1 / 6, 3 / 6, 2 / 6])


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
