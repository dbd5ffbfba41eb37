// Drawing for the VORTA gate widget. Pure functions over the data the Python node computed
// (nodes/gate_view.py web_payload): no routing math is redone here.
//   data = { blocks, heads, branches: ["full", "coreset", "sliding_tile"], labels: [...],
//            steps: ["0121...", ...] }   one digit per (block, head), block-major, per step

export const BRANCH_COLORS = ["rgb(213,94,0)", "rgb(0,114,178)", "rgb(0,158,115)"]; // as vorta_ops/viz.py

export function stepShares(data, step) {
  const s = data.steps[step] ?? "";
  const counts = [0, 0, 0];
  for (const ch of s) counts[ch.charCodeAt(0) - 48] += 1;
  const n = Math.max(s.length, 1);
  return counts.map((c) => c / n);
}

// Draws one step: blocks as rows, heads as columns, a legend with the step's shares under it.
// Returns the cell size used, so callers can map clicks back to (block, head).
export function drawGates(ctx, data, step, width, height) {
  const legendH = 18;
  const cell = Math.max(1, Math.floor(Math.min(width / data.heads, (height - legendH) / data.blocks)));
  const s = data.steps[step] ?? "";
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, width, height);
  for (let b = 0; b < data.blocks; b++) {
    for (let h = 0; h < data.heads; h++) {
      const k = s.charCodeAt(b * data.heads + h) - 48;
      ctx.fillStyle = BRANCH_COLORS[k] ?? "#000";
      ctx.fillRect(h * cell, b * cell, cell, cell);
    }
  }
  const shares = stepShares(data, step);
  let x = 0;
  const y = data.blocks * cell + 4;
  ctx.font = "11px sans-serif";
  for (let i = 0; i < 3; i++) {
    ctx.fillStyle = BRANCH_COLORS[i];
    ctx.fillRect(x, y, 10, 10);
    const text = `${data.branches[i]} ${(shares[i] * 100).toFixed(1)}%`;
    ctx.fillStyle = "#ddd";
    ctx.fillText(text, x + 13, y + 9);
    x += 13 + 7 * text.length;
  }
  return cell;
}
