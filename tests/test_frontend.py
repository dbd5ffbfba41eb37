"""The workflows and the gate widget in ComfyUI's real frontend (headless Chromium).

Needs COMFYUI_PATH (see comfy_harness), Chromium (CHROMIUM, default /usr/bin/chromium) and
playwright-core (PLAYWRIGHT_CORE_DIR: a folder whose node_modules holds it); skips without them.
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


def _skip():
    if h.skip_reason():
        return h.skip_reason()
    if not shutil.which("node") or not Path(CHROMIUM).exists():
        return "frontend check: needs Node.js and Chromium"
    if not (Path(PW) / "node_modules" / "playwright-core").exists():
        return "frontend check: set PLAYWRIGHT_CORE_DIR to a folder with node_modules/playwright-core"
    return None


pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(_skip() is not None, reason=_skip() or "")]


def test_workflows_open_in_the_real_frontend_and_the_widget_draws(tmp_path):
    srv = h.ComfyServer(tmp_path / "comfy")
    srv.start()
    try:
        files = [str(p) for p in sorted((h.ROOT / "workflows").glob("*.json"))]
        res = subprocess.run(
            ["node", str(h.ROOT / "tests" / "frontend_check.mjs"), srv.url, str(tmp_path), *files],
            capture_output=True, text=True, timeout=240, env={**os.environ, "PLAYWRIGHT_CORE_DIR": PW, "CHROMIUM": CHROMIUM},
        )
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["extension_loaded"]
    for name, r in out["workflows"].items():
        wf = json.loads((h.ROOT / "workflows" / name).read_text())
        assert r["nodes"] == len(wf["nodes"]), (name, r)
        assert r["missing"] == [], (name, r)
        assert r["widget"], name
        assert [e for e in r["errors"] if "vorta" in e.lower()] == [], (name, r["errors"])
