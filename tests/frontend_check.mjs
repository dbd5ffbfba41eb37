// Opens ComfyUI's real frontend in headless Chromium, loads each workflow, and drives the VORTA
// gate widget: feeds it a payload as the node's execution would, reads the widget's canvas back
// per step (slider at 0, then moved to 1). Usage: node frontend_check.mjs URL SHOT_DIR WORKFLOW.json...
// With VORTA_LIVE_GATE=1 (the server has tiny_wan.safetensors and the router wan_live.safetensors)
// it then builds a tiny routed Wan graph with a "last run" Gate Visualizer, queues it through the
// frontend, and reports what the widget received and drew (every step's cells read from the canvas,
// the hover line of a cell), then the same after the workflow is serialized and loaded again (not
// run), and the cell size the widget gives a 40 x 40 x 50 payload ("live" in the output).
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
        const M = await import(new URL("/extensions/comfyui-vorta/vorta_gates_draw.js", location.href).href);
        const read = () => {
          const ctx = canvas.getContext("2d");
          const cell = M.gridLayout(GATES, canvas.width, canvas.height).cell;
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
  if (process.env.VORTA_LIVE_GATE === "1") {
    await closeDialogs();
    try {
      results.live = await liveGate(page);
    } catch (e) {
      results.live = { exception: String(e?.stack ?? e) };
    }
    results.live.errors = errors.splice(0);
    await page.screenshot({ path: `${shotDir}/live_gate.png` });
  }
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}


// In the page: reads the gate widget of node `id` (window.app.graph) back: per step the branch ids
// of the cells (from the canvas pixels and the payload's colours), and the canvas/cell size.
async function readGate(page, id) {
  return page.evaluate(async (id) => {
    const M = await import(new URL("/extensions/comfyui-vorta/vorta_gates_draw.js", location.href).href);
    const gate = window.app.graph.getNodeById(id);
    const w = gate?.vortaWidget, data = gate?.vortaGates;
    if (!w || !data) return { widget: !!w, data: !!data };
    const canvas = w.canvas;
    const colours = M.branchColours(data).map((c) => {
      const x = c.startsWith("#") ? [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)) : c.match(/\d+/g).map(Number);
      return x;
    });
    const steps = [];
    for (let st = 0; st < data.steps.length; st++) {
      w.slider.value = String(st);
      w.slider.dispatchEvent(new Event("input"));
      const ctx = canvas.getContext("2d");
      const cell = M.gridLayout(data, canvas.width, canvas.height).cell;
      let s = "";
      for (let b = 0; b < data.blocks; b++) for (let h = 0; h < data.heads; h++) {
        const px = ctx.getImageData(h * cell + (cell >> 1), b * cell + (cell >> 1), 1, 1).data;
        const k = colours.findIndex((c) => c.every((v, i) => Math.abs(v - px[i]) <= 2));
        s += k < 0 ? "?" : String(k);
      }
      steps.push(s);
    }
    return { widget: true, data: true, steps, label: w.root.firstChild.textContent, canvas: [canvas.width, canvas.height],
             cell: M.gridLayout(data, canvas.width, canvas.height).cell, node_size: Array.from(gate.size),
             stored: !!gate.properties?.vorta_gates };
  }, id);
}

// Hovers (block, head) of step `step` on the widget's canvas (a mouse move at the cell's centre) and
// returns the hover line.
async function hoverGate(page, id, step, block, head) {
  return page.evaluate(async ([id, step, block, head]) => {
    const M = await import(new URL("/extensions/comfyui-vorta/vorta_gates_draw.js", location.href).href);
    const gate = window.app.graph.getNodeById(id);
    const w = gate.vortaWidget, canvas = w.canvas;
    w.slider.value = String(step);
    w.slider.dispatchEvent(new Event("input"));
    const cell = M.gridLayout(gate.vortaGates, canvas.width, canvas.height).cell;
    const r = canvas.getBoundingClientRect();
    const sx = r.width ? r.width / canvas.width : 1, sy = r.height ? r.height / canvas.height : 1;
    const at = { clientX: r.left + (head * cell + cell / 2) * sx, clientY: r.top + (block * cell + cell / 2) * sy, bubbles: true };
    canvas.dispatchEvent(new MouseEvent("mousemove", at));
    return w.info.textContent;
  }, [id, step, block, head]);
}

async function liveGate(page) {
  const id = await page.evaluate(async () => {
    const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
    const app = window.app;
    app.graph.clear();
    const add = (type, values, pos) => {
      const n = LG.createNode(type);
      if (!n) throw new Error(`cannot create ${type}`);
      app.graph.add(n);
      n.pos = pos;
      for (const [k, v] of Object.entries(values)) {
        const w = n.widgets?.find((x) => x.name === k);
        if (!w) throw new Error(`${type}: no widget ${k} (has ${n.widgets?.map((x) => x.name)})`);
        w.value = v;
      }
      return n;
    };
    const link = (a, slot, b, name) => {
      const i = b.inputs.findIndex((x) => x.name === name);
      if (i < 0) throw new Error(`${b.type}: no input ${name}`);
      a.connect(slot, b, i);
    };
    const unet = add("UNETLoader", { unet_name: "tiny_wan.safetensors", weight_dtype: "default" }, [-900, 0]);
    const router = add("VortaRouterLoader", { router_name: "wan_live.safetensors" }, [-900, 200]);
    const apply = add("VortaApply", { tile: "1,2,2", window: "1,1,1", bucket: "2,2,2", keep_ratio: 0.5 }, [-600, 0]);
    const pos = add("VortaTestConditioning", { seed: 1, tokens: 8, pooled: false }, [-900, 400]);
    const neg = add("VortaTestConditioning", { seed: 2, tokens: 8, pooled: false }, [-900, 600]);
    const latent = add("EmptyHunyuanLatentVideo", { width: 96, height: 64, length: 9, batch_size: 1 }, [-600, 400]);
    const ks = add("KSampler", { seed: 0, steps: 3, cfg: 2.0, sampler_name: "euler", scheduler: "simple", denoise: 1.0 }, [-300, 0]);
    const save = add("SaveLatent", { filename_prefix: "live_gate" }, [-300, 500]);
    const gate = add("VortaGateVisualizer", { mode: "last run", steps: 3, scheduler: "simple" }, [0, 0]);
    link(unet, 0, apply, "model");
    link(router, 0, apply, "router");
    link(apply, 0, ks, "model");
    link(pos, 0, ks, "positive");
    link(neg, 0, ks, "negative");
    link(latent, 0, ks, "latent_image");
    link(ks, 0, save, "samples");
    link(apply, 0, gate, "model");
    link(ks, 0, gate, "latent");
    const c = app.canvas;
    c.ds.scale = 1; c.ds.offset = [60, 120]; c.setDirty(true, true);
    window.__vortaLiveGate = gate.id;
    await app.queuePrompt(0, 1);
    return gate.id;
  });
  await page.waitForFunction((id) => !!window.app.graph.getNodeById(id)?.vortaGates, id, { timeout: 120000 });
  await page.waitForTimeout(500); // the element placed and resized, the map redrawn
  const out = { node: id, data: await page.evaluate((id) => window.app.graph.getNodeById(id).vortaGates, id) };
  out.read = await readGate(page, id);
  // hover every cell of the last step (2 x 2 here; a few cells of larger maps)
  const d = out.data, last = d.steps.length - 1;
  out.hovers = [];
  for (let b = 0; b < Math.min(d.blocks, 3); b++) for (let h = 0; h < Math.min(d.heads, 3); h++) {
    out.hovers.push({ step: last, block: b, head: h, text: await hoverGate(page, id, last, b, h) });
  }
  // save and reopen the workflow: the map comes back from the node's properties, without a run
  out.saved = await page.evaluate(async (id) => {
    const wf = JSON.parse(JSON.stringify(window.app.graph.serialize()));
    window.app.graph.clear();
    await window.app.loadGraphData(wf);
    return wf;
  }, id);
  await page.waitForTimeout(500);
  out.reread = await readGate(page, id);
  out.rehover = await hoverGate(page, id, last, 0, 0);
  // a 40 x 40 x 50 map: the widget grows the node so that cells stay readable
  out.big = await page.evaluate(async (id) => {
    const gate = window.app.graph.getNodeById(id);
    const B = 40, H = 40, S = 50;
    const steps = Array.from({ length: S }, (_, s) => Array.from({ length: B * H }, (_, i) => String((i + s) % 3)).join(""));
    gate.onExecuted({ vorta_gates: [{ ...gate.vortaGates, blocks: B, heads: H, steps, labels: steps.map((_, i) => `step ${i}`),
                                      overall: undefined, score_kind: undefined, scores: undefined }] });
    window.app.canvas.setDirty(true, true);
    return true;
  }, id);
  await page.waitForTimeout(600);
  out.big = await readGate(page, id);
  out.big.steps = out.big.steps?.slice(0, 2);
  out.big.first = await page.evaluate((id) => window.app.graph.getNodeById(id).vortaGates.steps.slice(0, 2), id);
  return out;
}
