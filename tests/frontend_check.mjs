// Opens ComfyUI's real frontend in headless Chromium, loads each workflow, and drives the VORTA
// gate widget: feeds it a payload as the node's execution would, reads the widget's canvas back
// per step (slider at 0, then moved to 1). Usage: node frontend_check.mjs URL SHOT_DIR WORKFLOW.json...
// Prints one JSON line: the frontend version the page reports, errors while the page loaded, and per
// workflow the node count, node types the frontend does not know, the cells the widget drew and
// console errors. Written against ComfyUI frontends 1.27 to 1.58: globals and dialogs differ between
// them, so every lookup below has a fallback and dialogs are closed before each workflow.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + "/");
const { chromium } = require("playwright-core");
const [url, shotDir, ...files] = process.argv.slice(2);

// What the gate visualizer's execution hands the widget (nodes/gate_data.py web_payload), and the
// branch colours it must draw (web/vorta_gates_draw.js BRANCH_COLORS).
const GATES = { blocks: 2, heads: 3, branches: ["full", "coreset", "sliding_tile"],
                labels: ["step 0", "step 1"], steps: ["012210", "111222"] };
const COLORS = [[213, 94, 0], [0, 114, 178], [0, 158, 115]];
// Frontend-only node types (no Python class behind them).
const VIRTUAL = ["Note", "MarkdownNote", "Reroute", "PrimitiveNode"];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(`pageerror: ${e}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  // a console "404" names no file: the failed request does (a missing /extensions/comfyui-vorta/... shows here)
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`HTTP ${r.status()} ${r.url()}`); });
  await page.goto(url);
  // ready: the app, its graph, and the node definitions from /object_info registered
  await page.waitForFunction(() => {
    const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
    return window.app?.graph && LG?.registered_node_types?.KSampler;
  }, null, { timeout: 90000 });
  await page.waitForTimeout(1500); // first-run dialogs and the default graph settle

  const info = await page.evaluate(async () => {
    let fromPrompt = null;
    try { fromPrompt = (await window.app.graphToPrompt()).workflow?.extra?.frontendVersion ?? null; } catch (e) { fromPrompt = `error: ${e}`; }
    const exts = window.app.extensions ?? window.app.extensionManager?.extensions ?? [];
    return {
      version_global: window.__COMFYUI_FRONTEND_VERSION__ ?? null, // 1.2x+: set at start
      version_prompt: fromPrompt,                                    // every version: stamped on saved workflows
      extension_loaded: Array.from(exts).some((e) => e?.name === "vorta.GateVisualizer"),
    };
  });
  const results = {
    frontend_version: info.version_global ?? info.version_prompt,
    version_global: info.version_global, version_prompt: info.version_prompt,
    extension_loaded: info.extension_loaded, load_errors: errors.splice(0), workflows: {},
  };

  const closeDialogs = async () => {
    for (let i = 0; i < 3; i++) {
      const open = await page.evaluate(() => document.querySelectorAll(".p-dialog, [role=dialog]").length);
      if (!open) return 0;
      await page.keyboard.press("Escape");
      await page.waitForTimeout(200);
    }
    return page.evaluate(() => document.querySelectorAll(".p-dialog, [role=dialog]").length);
  };

  for (const f of files) {
    const name = f.split("/").pop();
    await closeDialogs(); // the first-run template dialog, a previous "missing nodes" dialog
    const before = errors.length;
    const wf = JSON.parse(readFileSync(f, "utf8"));
    let r;
    try {
      r = await page.evaluate(async ([wf, GATES, COLORS, VIRTUAL]) => {
        const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
        await window.app.loadGraphData(wf);
        const graph = window.app.graph;
        const nodes = graph.nodes ?? graph._nodes;
        // unknown to the frontend: no registered type (a placeholder stands in), or a type that is not
        // frontend-only without a backend definition. has_errors is not used: frontends >= 1.4x set it
        // for missing model files too.
        const missing = nodes.filter((n) => !LG.registered_node_types[n.type]
          || (!VIRTUAL.includes(n.type) && n.constructor?.nodeData == null)).map((n) => n.type);
        const flagged = nodes.filter((n) => n.has_errors).map((n) => n.type);
        const gate = nodes.find((n) => n.type === "VortaGateVisualizer");
        const out = { nodes: nodes.length, missing, flagged, widget: false, shown: false, cells: [] };
        if (!gate) return out;
        gate.onExecuted({ vorta_gates: [GATES] });
        const w = gate.vortaWidget;
        out.widget = !!w;
        if (!w) return out;
        const canvas = w.slider.parentElement.querySelector("canvas");
        // which branch colour each (block, head) cell has, block-major, as the payload's digits
        const read = () => {
          const ctx = canvas.getContext("2d");
          const cell = Math.floor(Math.min(canvas.width / GATES.heads, (canvas.height - 18) / GATES.blocks));
          let s = "";
          for (let b = 0; b < GATES.blocks; b++) for (let h = 0; h < GATES.heads; h++) {
            const px = ctx.getImageData(h * cell + (cell >> 1), b * cell + (cell >> 1), 1, 1).data;
            const k = COLORS.findIndex((c) => c.every((v, i) => Math.abs(v - px[i]) <= 2));
            s += k < 0 ? "?" : String(k);
          }
          return s;
        };
        out.cells.push(read());
        w.slider.value = "1";
        w.slider.dispatchEvent(new Event("input"));
        out.cells.push(read());
        return out;
      }, [wf, GATES, COLORS, VIRTUAL]);
    } catch (e) {
      r = { nodes: 0, missing: [], flagged: [], widget: false, shown: false, cells: [], exception: String(e) };
    }
    r.sent = GATES.steps;
    await page.waitForTimeout(300);
    r.dialogs_left = await closeDialogs();
    await page.evaluate(() => {
      const c = window.app.canvas;
      c.ds.scale = 0.65; c.ds.offset = [30, 260]; c.setDirty(true, true);
    });
    await page.waitForTimeout(300);
    // the widget's element is placed over the canvas on the next draw: is it on the page now?
    r.shown = await page.evaluate(() => {
      const graph = window.app.graph;
      const gate = (graph.nodes ?? graph._nodes).find((n) => n.type === "VortaGateVisualizer");
      const el = gate?.vortaWidget?.slider?.parentElement;
      if (!el || !el.isConnected) return false;
      const rect = el.getBoundingClientRect();
      return rect.width > 0 && rect.height > 0 && getComputedStyle(el).display !== "none";
    });
    r.errors = errors.slice(before);
    results.workflows[name] = r;
    await page.screenshot({ path: `${shotDir}/${name}.png` });
  }
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
