"""The workflows and the gate widget in ComfyUI's real frontend (headless Chromium), per (ComfyUI
tree, frontend) case.

Cases: VORTA_FRONTENDS, entries separated by ';', each TREE=STATIC[=VERSION]: TREE a tree's version
as comfy_harness.comfy_trees() names it (COMFYUI_PATHS / COMFYUI_PATH), STATIC the static folder of
a comfyui-frontend-package, which the server is started with (--front-end-root). The page must report
VERSION, else the version of the package's dist-info beside it (pip install --target). .ci/setup_comfyui.sh
installs each tree's pinned frontend and PyPI's newest and writes this variable. Without it: each tree
with the frontend its Python has installed.
Also needs Node.js, Chromium (CHROMIUM, default /usr/bin/chromium) and playwright-core
(PLAYWRIGHT_CORE_DIR: a folder whose node_modules holds it); skips with the reason without them.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import comfy_harness as h

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
    srv.start()
    try:
        res = subprocess.run(
            ["node", str(h.ROOT / "tests" / "frontend_check.mjs"), srv.url, str(shots), *map(str, WORKFLOWS), str(tmp_path / "canary.json")],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PLAYWRIGHT_CORE_DIR": PW, "CHROMIUM": CHROMIUM},
        )
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

    # the missing-node check still sees a missing node on this frontend
    assert out["workflows"]["canary.json"]["missing"] == [CANARY_TYPE], (where, out["workflows"]["canary.json"])
