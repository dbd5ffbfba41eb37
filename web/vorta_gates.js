// VORTA Gate Visualizer widget: after the node runs, shows the branch of every block x head for
// the step picked with the slider (the IMAGE output shows all steps at once).
import { app } from "../../scripts/app.js";
import { drawGates } from "./vorta_gates_draw.js";

const NODE = "VortaGateVisualizer";

function ensureWidget(node) {
  if (node.vortaWidget) return node.vortaWidget;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;";
  const label = document.createElement("div");
  label.style.cssText = "font:11px sans-serif;color:#ccc;";
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = "0";
  slider.value = "0";
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 240;
  root.append(label, slider, canvas);
  const redraw = () => {
    const data = node.vortaGates;
    if (!data) return;
    const step = Number(slider.value);
    label.textContent = `${data.labels[step] ?? ""}  (${data.blocks} blocks x ${data.heads} heads)`;
    drawGates(canvas.getContext("2d"), data, step, canvas.width, canvas.height);
  };
  slider.addEventListener("input", redraw);
  node.addDOMWidget("vorta_gates", "vorta_gates", root, { serialize: false });
  node.vortaWidget = { slider, redraw };
  return node.vortaWidget;
}

app.registerExtension({
  name: "vorta.GateVisualizer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const data = message?.vorta_gates?.[0];
      if (!data) return;
      this.vortaGates = data;
      const w = ensureWidget(this);
      w.slider.max = String(Math.max(data.steps.length - 1, 0));
      w.slider.value = "0";
      w.redraw();
      this.setDirtyCanvas(true, true);
    };
  },
});
