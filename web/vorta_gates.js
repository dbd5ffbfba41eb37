// VORTA Gate Visualizer widget: after the node runs, shows the branch of every block x head for
// the step picked with the slider (the IMAGE output shows all steps at once); hovering a cell says
// why it went there (the router's probabilities, or the training-free router's measured errors).
// The payload is kept in node.properties (saved with the workflow), so a reopened workflow shows
// the map without running. Drawing, hit-testing and decoding are in vorta_gates_draw.js.
import { app } from "../../scripts/app.js";
import { cellText, drawGates, hitTest, isPayload, preferredCanvasSize } from "./vorta_gates_draw.js";

const NODE = "VortaGateVisualizer";
const PROP = "vorta_gates";
const CONTROLS_H = 64; // step label, slider, hover line (px, with the gaps)
const HINT = "hover a cell: why it went there";

function ensureWidget(node) {
  if (node.vortaWidget) return node.vortaWidget;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box;overflow:hidden;";
  const label = document.createElement("div");
  label.style.cssText = "font:11px sans-serif;color:#ccc;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = "0";
  slider.value = "0";
  slider.style.cssText = "width:100%;margin:0;";
  const info = document.createElement("div");
  info.style.cssText = "font:11px sans-serif;color:#eee;min-height:14px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
  info.textContent = HINT;
  const box = document.createElement("div");
  box.style.cssText = "flex:1 1 auto;min-height:0;position:relative;overflow:hidden;";
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 240;
  // bitmap width = the box's, so CSS pixels = canvas pixels (height auto: never stretched)
  canvas.style.cssText = "position:absolute;left:0;top:0;width:100%;height:auto;display:block;";
  box.append(canvas);
  root.append(label, slider, info, box);
  let hover = null;

  const redraw = () => {
    try {
      const data = node.vortaGates;
      if (!isPayload(data)) return;
      // the canvas has the pixels of its box, so a node resized by hand redraws at the new size;
      // a box not laid out yet (or squeezed below the map's minimum) gets the preferred size
      const bw = Math.floor(box.clientWidth), bh = Math.floor(box.clientHeight);
      const w = bw > 0 ? bw : canvas.width;
      const pref = preferredCanvasSize(data, w);
      const h = bh >= pref.minHeight ? bh : pref.height;
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = w;
        canvas.height = h;
      }
      const step = Math.min(Math.max(Number(slider.value) || 0, 0), data.steps.length - 1);
      label.textContent = `step ${step + 1}/${data.steps.length} · ${data.labels?.[step] ?? ""}  (${data.blocks} blocks x ${data.heads} heads)`;
      drawGates(canvas.getContext("2d"), data, step, canvas.width, canvas.height, hover);
      info.textContent = hover ? cellText(data, step, hover.block, hover.head) : HINT;
    } catch (e) {
      console.warn("VORTA gate widget: cannot draw", e);
    }
  };
  const hoverAt = (ev) => {
    try {
      const data = node.vortaGates;
      if (!isPayload(data)) return;
      const r = canvas.getBoundingClientRect();
      if (!r.width || !r.height) return;
      const x = (ev.clientX - r.left) * canvas.width / r.width, y = (ev.clientY - r.top) * canvas.height / r.height;
      const hit = hitTest(data, canvas.width, canvas.height, x, y);
      if (hit?.block === hover?.block && hit?.head === hover?.head) return;
      hover = hit;
      redraw();
    } catch (e) {
      console.warn("VORTA gate widget: hover failed", e);
    }
  };
  canvas.addEventListener("mousemove", hoverAt);
  canvas.addEventListener("pointermove", hoverAt);
  canvas.addEventListener("mouseleave", () => { hover = null; redraw(); });
  slider.addEventListener("input", redraw);
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => redraw()).observe(box);

  const minHeight = () => {
    const data = node.vortaGates;
    if (!isPayload(data)) return CONTROLS_H;
    const width = Math.max((node.size?.[0] ?? 300) - 20, 100);
    return CONTROLS_H + preferredCanvasSize(data, width).minHeight;
  };
  const widget = node.addDOMWidget("vorta_gates", "vorta_gates", root, { serialize: false, hideOnZoom: false, getMinHeight: minHeight });
  if (widget) widget.serialize = false; // never in widgets_values (the payload is in properties)
  const clearHover = () => { hover = null; };
  node.vortaWidget = { slider, redraw, canvas, info, root, widget, hoverAt, clearHover };
  return node.vortaWidget;
}

// Shows a payload: the slider over its steps, the node grown to fit the map (never shrunk).
function showGates(node, data, { keepStep = false } = {}) {
  if (!isPayload(data)) return;
  node.vortaGates = data;
  const w = ensureWidget(node);
  w.clearHover(); // a new map: the old cell means nothing in it
  const last = data.steps.length - 1;
  w.slider.max = String(Math.max(last, 0));
  w.slider.value = keepStep ? String(Math.min(Number(w.slider.value) || 0, last)) : "0";
  try {
    const width = Math.max(node.size?.[0] ?? 300, data.heads * 8 + 30);
    const want = preferredCanvasSize(data, width - 20);
    const min = node.computeSize?.() ?? [width, 0];
    const height = Math.max(node.size?.[1] ?? 0, min[1] ?? 0, want.height + CONTROLS_H + 40);
    if (width !== node.size?.[0] || height !== node.size?.[1]) node.setSize?.([width, height]);
  } catch (e) {
    console.warn("VORTA gate widget: cannot resize the node", e);
  }
  w.redraw();
  globalThis.requestAnimationFrame?.(() => w.redraw()); // once the frontend has placed the element
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "vorta.GateVisualizer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const data = message?.vorta_gates?.[0];
      if (!isPayload(data)) return;
      this.properties = this.properties ?? {};
      this.properties[PROP] = data; // saved with the workflow
      showGates(this, data, { keepStep: true });
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      try {
        const data = this.properties?.[PROP];
        if (isPayload(data)) showGates(this, data);
      } catch (e) {
        console.warn("VORTA gate widget: cannot show the saved map", e);
      }
      return r;
    };
    const onResize = nodeType.prototype.onResize;
    nodeType.prototype.onResize = function () {
      const r = onResize?.apply(this, arguments);
      this.vortaWidget?.redraw();
      return r;
    };
  },
});
