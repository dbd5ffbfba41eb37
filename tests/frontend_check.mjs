// Opens ComfyUI's real frontend in headless Chromium, loads each workflow, and drives the VORTA
// gate widget once. Usage: node frontend_check.mjs URL SHOT_DIR WORKFLOW.json...
// Prints one JSON line: per workflow the node count, missing node types and console errors.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + "/");
const { chromium } = require("playwright-core");
const [url, shotDir, ...files] = process.argv.slice(2);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
const extLoaded = await page.evaluate(() => (window.app.extensions || []).some((e) => e.name === "vorta.GateVisualizer"));
const results = { extension_loaded: extLoaded, workflows: {} };
for (const f of files) {
  const before = errors.length;
  const wf = JSON.parse(readFileSync(f, "utf8"));
  const r = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    const nodes = window.app.graph._nodes;
    const missing = nodes.filter((n) => n.has_errors || n.constructor?.nodeData == null && !["Note", "MarkdownNote"].includes(n.type)).map((n) => n.type);
    const gate = nodes.find((n) => n.type === "VortaGateVisualizer");
    let widget = false;
    if (gate) {
      gate.onExecuted({ vorta_gates: [{ blocks: 2, heads: 3, branches: ["full", "coreset", "sliding_tile"],
                                         labels: ["step 0", "step 1"], steps: ["012210", "111222"] }] });
      widget = !!gate.vortaWidget;
    }
    return { nodes: nodes.length, missing, widget };
  }, wf);
  r.errors = errors.slice(before);
  await page.keyboard.press("Escape"); // the first-run template dialog
  await page.evaluate(() => { const c = window.app.canvas; c.ds.scale = 0.65; c.ds.offset = [30, 260]; c.setDirty(true, true); });
  await page.waitForTimeout(300);
  results.workflows[f.split("/").pop()] = r;
  await page.screenshot({ path: `${shotDir}/${f.split("/").pop()}.png` });
}
console.log(JSON.stringify(results));
await browser.close();
