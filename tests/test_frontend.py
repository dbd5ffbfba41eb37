"""The workflows and the gate widget in ComfyUI's real frontend (headless Chromium), per (ComfyUI
tree, frontend) case.

Cases: VORTA_FRONTENDS, entries separated by ';', each TREE=STATIC[=VERSION]: TREE a tree's version
as comfy_harness.comfy_trees() names it (COMFYUI_PATHS / COMFYUI_PATH), STATIC the static folder of
a comfyui-frontend-package, which the server is started with (--front-end-root). The page must report
VERSION, else the version of the package's dist-info beside it (pip install --target). .ci/setup_comfyui.sh
installs each tree's pinned frontend and PyPI's newest and writes this variable. Without it: each tree
with the frontend its Python has installed.
The check also runs a tiny routed Wan with a "last run" Gate Visualizer through the frontend (tiny
random model and router written into the server's folders) and compares the widget with the server:
cell colours with the table, the hover line with the scores, and the map after the workflow is
saved and loaded again without running.
Also needs Node.js, Chromium (CHROMIUM, default /usr/bin/chromium) and playwright-core
(PLAYWRIGHT_CORE_DIR: a folder whose node_modules holds it); skips with the reason without them.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import base64

import pytest

import comfy_harness as h
from comfy_fixtures import WAN_BLOCKS, WAN_DIM, MIX, biased_router

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PW = os.environ.get("PLAYWRIGHT_CORE_DIR", "")
WORKFLOWS = sorted((h.ROOT / "workflows").glob("*.json"))
CANARY_TYPE = "NoSuchNodeTypeForTheFrontendCheck"


def _dist_version(static: Path) -> str | None:
    """The version of the comfyui-frontend-package whose static folder this is (its dist-info sits
    beside the package when pip installed it with --target, or in the same site-packages)."""
    found = sorted(static.parent.parent.glob("comfyui_frontend_package-*.dist-info"))
    return found[0].name[len("comfyui_frontend_package-"):-len(".dist-info")] if len(found) == 1 else None


def _cases():
    """(id, tree version, tree path or None, static folder or None, expected version or None, skip reason)."""
    trees = dict(h.comfy_trees())
    spec = os.environ.get("VORTA_FRONTENDS", "").strip()
    if not spec:
        if not trees:
            return [("no-comfyui", "-", None, None, None, None)]
        return [(f"{v}-installed-frontend", v, p, None, None, None) for v, p in trees.items()]
    cases = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        tree, _, rest = entry.partition("=")
        static, _, version = rest.partition("=")
        static_p = Path(static)
        version = version or _dist_version(static_p)
        why = None
        if tree not in trees:
            why = f"VORTA_FRONTENDS names ComfyUI {tree}, which COMFYUI_PATHS does not have (it has: {', '.join(trees) or 'none'})"
        elif not (static_p / "index.html").exists():
            why = f"VORTA_FRONTENDS: {static} is no frontend static folder (no index.html)"
        elif version is None:
            why = f"VORTA_FRONTENDS: cannot tell the version of {static}: give it as {tree}={static}=VERSION"
        cases.append((f"{tree}-frontend-{version}", tree, trees.get(tree), static_p, version, why))
    return cases


CASES = _cases()


def _skip(case) -> str | None:
    _, _, tree, _, _, why = case
    reason = h.skip_reason()
    if reason:
        return reason
    if why:
        return why
    if not shutil.which("node") or not Path(CHROMIUM).exists():
        return f"frontend check: needs Node.js and Chromium (CHROMIUM={CHROMIUM})"
    if not (Path(PW) / "node_modules" / "playwright-core").exists():
        return "frontend check: set PLAYWRIGHT_CORE_DIR to a folder with node_modules/playwright-core"
    return None


def _comfy_python(tree: Path) -> str:
    try:
        return h.comfy_python(tree)  # per tree (COMFYUI_PYTHON_<version>) where the harness has that
    except TypeError:
        return h.comfy_python()


def _installed_frontend(tree: Path) -> str | None:
    res = subprocess.run([_comfy_python(tree), "-c", "import importlib.metadata as m; print(m.version('comfyui-frontend-package'))"],
                         capture_output=True, text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


_TINY: dict = {}  # tree -> tiny Wan file made once per session


def _prepare_live_gate(srv, tree: Path, scratch: Path) -> None:
    """The tiny Wan and the weight-driven router the live gate check samples with."""
    from vorta_ops.router_io import save_router

    srv.prepare()
    if tree not in _TINY or not _TINY[tree].exists():
        _TINY[tree] = h.make_tiny_model("wan", scratch / "tiny_wan.safetensors", WAN_DIM, WAN_BLOCKS, tree=tree)
    shutil.copy(_TINY[tree], srv.base / "models/diffusion_models/tiny_wan.safetensors")
    save_router(biased_router("wan", WAN_BLOCKS, 2, WAN_DIM, MIX, weight_scale=0.3),
                srv.base / "models/vorta_routers/wan_live.safetensors")


def hover_text(payload: dict, step: int, block: int, head: int) -> str:
    """The hover line web/vorta_gates_draw.js cellText must show, computed here from the payload's
    bytes (the format of nodes/gate_data.py web_payload)."""
    from vorta_ops.branches import BRANCHES

    n = len(BRANCHES)
    k = int(payload["steps"][step][block * payload["heads"] + head])
    head_text = f"block {block} · head {head} · {BRANCHES[k].label}"
    raw = base64.b64decode(payload["scores"][step])
    cell = raw[(block * payload["heads"] + head) * n:][:n]
    if payload["score_kind"] == "probability":
        return (f"{head_text} · p {cell[k] / 255:.2f} ("
                + ", ".join(f"{b.label} {x / 255:.2f}" for b, x in zip(BRANCHES, cell)) + ")")
    err = lambda x: "n/a" if x == 255 else ">=2.54" if x == 254 else f"{x / 100:.2f}"
    return (f"{head_text} · errors: " + ", ".join(f"{b.label} {err(x)}" for b, x in zip(BRANCHES, cell) if b.name != "full")
            + (f" (tau {payload['tau']:.2f})" if "tau" in payload else ""))


def _check_live_gate(live: dict, history: dict, info: dict, where: str) -> None:
    assert "exception" not in live, (where, live)
    node = str(live["node"])
    sent = [e["outputs"][node]["vorta_gates"][0] for e in history.values() if node in e.get("outputs", {})
            and "vorta_gates" in e["outputs"][node]]
    assert len(sent) == 1, (where, list(history))
    sp = sent[0]
    summary = [e["outputs"][node]["text"][0] for e in history.values() if node in e.get("outputs", {})][0]
    assert "chosen p" in summary, (where, summary)
    # the widget got the server's payload, with the file router's probabilities for every step
    assert live["data"] == sp, where
    assert sp["score_kind"] == "probability" and len(sp["steps"]) == 3 and all(sp["scores"]), (where, sp)
    assert (sp["blocks"], sp["heads"]) == (WAN_BLOCKS, 2), where
    # it drew the server's table: every cell of every step in its branch's colour
    r = live["read"]
    assert r["steps"] == sp["steps"], (where, r)
    assert r["stored"], (where, r)  # kept in the node's properties
    # hovering a cell names its branch and the server's probabilities
    assert live["hovers"], where
    for hv in live["hovers"]:
        assert hv["text"] == hover_text(sp, hv["step"], hv["block"], hv["head"]), (where, hv)
    # saved with the workflow, and still a valid workflow (the widget adds no widget value)
    gate = next(n for n in live["saved"]["nodes"] if str(n["id"]) == node)
    assert gate["properties"]["vorta_gates"] == sp, where
    only_gate = {**live["saved"], "nodes": [{**gate, "inputs": [i for i in gate.get("inputs", []) if i.get("link") is None]}]}
    assert h.ui_to_api(only_gate, info)[node]["inputs"] == {"mode": "last run", "steps": 3, "scheduler": "simple"}, (where, gate)
    # reopened without running: the same map, the same hover line
    rr = live["reread"]
    assert rr["widget"] and rr["data"] and rr["steps"] == sp["steps"], (where, rr)
    assert live["rehover"] == hover_text(sp, len(sp["steps"]) - 1, 0, 0), (where, live["rehover"])
    # 40 x 40 x 50: the node grows so that cells stay a few pixels wide, and they are drawn right
    big = live["big"]
    assert big["cell"] >= 4 and big["steps"] == big["first"], (where, {k: v for k, v in big.items() if k != "steps"})
    # (a frontend asking the registry at api.comfy.org about the pack's node types, refused by the
    # page's policy offline, names them but is no error of the widget)
    assert [e for e in live["errors"] if "vorta" in e.lower() and "api.comfy.org" not in e] == [], (where, live["errors"])


@pytest.mark.comfyui
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_workflows_open_in_the_real_frontend_and_the_widget_draws(case, tmp_path):
    reason = _skip(case)
    if reason:
        pytest.skip(reason)
    _, tree_version, tree, static, expected, _ = case
    if static is None:
        expected = _installed_frontend(tree)
    # last: a workflow with a node type nobody has, which the check must report as missing
    canary = json.loads(WORKFLOWS[0].read_text())
    canary["nodes"][0]["type"] = CANARY_TYPE
    (tmp_path / "canary.json").write_text(json.dumps(canary))
    shots = tmp_path / "shots"
    shots.mkdir()
    extra = ("--front-end-root", str(static)) if static is not None else ()
    srv = h.ComfyServer(tmp_path / "comfy", tree, extra_args=extra)
    _prepare_live_gate(srv, tree, tmp_path)
    srv.start()
    try:
        res = subprocess.run(
            ["node", str(h.ROOT / "tests" / "frontend_check.mjs"), srv.url, str(shots), *map(str, WORKFLOWS), str(tmp_path / "canary.json")],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PLAYWRIGHT_CORE_DIR": PW, "CHROMIUM": CHROMIUM, "VORTA_LIVE_GATE": "1"},
        )
        history = srv.get("/history") if res.returncode == 0 else {}
        info = srv.get("/object_info") if res.returncode == 0 else {}
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    where = f"ComfyUI {tree_version}, frontend {out['frontend_version']} (screenshots: {shots})"

    # the page runs the frontend asked for (both places it states its version, where it has them)
    if expected is not None:
        assert out["frontend_version"] == expected, (where, out["version_global"], out["version_prompt"])
        for v in (out["version_global"], out["version_prompt"]):
            assert v in (None, expected), (where, v)
    assert out["extension_loaded"], where
    assert [e for e in out["load_errors"] if "vorta" in e.lower()] == [], (where, out["load_errors"])

    for wf_path in WORKFLOWS:
        r = out["workflows"][wf_path.name]
        wf = json.loads(wf_path.read_text())
        assert "exception" not in r, (where, wf_path.name, r)
        assert r["nodes"] == len(wf["nodes"]), (where, wf_path.name, r)
        assert r["missing"] == [], (where, wf_path.name, r)
        # the widget exists, is on the page, and draws each step's branches in their colours
        assert r["widget"] and r["shown"], (where, wf_path.name, r)
        assert r["cells"] == r["sent"], (where, wf_path.name, r)
        assert [e for e in r["errors"] if "vorta" in e.lower()] == [], (where, wf_path.name, r["errors"])

    # a real run: the widget shows the server's table and scores, and keeps them in the workflow
    _check_live_gate(out["live"], history, info, where)

    # the missing-node check still sees a missing node on this frontend
    assert out["workflows"]["canary.json"]["missing"] == [CANARY_TYPE], (where, out["workflows"]["canary.json"])
