// Drawing for the VORTA gate widget. Pure functions over the data the Python node computed
// (nodes/gate_data.py web_payload): no routing math is redone here, and the branches (how many,
// their names and colours) come from the payload, which takes them from vorta_ops/branches.py.
//   data = { blocks, heads, branches: ["full", "coreset", "sliding_tile"],
//            branch_labels: ["full", "core-set", "sliding tile"],
//            colours: ["#d55e00", "#0072b2", "#009e73"], labels: [...],
//            steps: ["0121...", ...] }   one character (48 + branch id) per (block, head),
//                                        block-major, per step
// branch_labels and colours may be missing (payloads from older versions of the node): the
// names and the colours below serve then.

// Fallback only, for payloads without "colours": the branch table's colours of the first version.
export const BRANCH_COLORS = ["rgb(213,94,0)", "rgb(0,114,178)", "rgb(0,158,115)"];
const MISSING = "#000"; // a cell whose branch the payload does not know

export function branchCount(data) {
  return Math.max(data.branches?.length ?? 0, data.colours?.length ?? 0) || BRANCH_COLORS.length;
}

export function branchColours(data) {
  const n = branchCount(data);
  const given = Array.isArray(data.colours) ? data.colours : [];
  return Array.from({ length: n }, (_, i) => given[i] ?? BRANCH_COLORS[i] ?? MISSING);
}

export function branchLabels(data) {
  const n = branchCount(data);
  return Array.from({ length: n }, (_, i) => data.branch_labels?.[i] ?? data.branches?.[i] ?? `branch ${i}`);
}

export function stepShares(data, step) {
  const s = data.steps[step] ?? "";
  const counts = new Array(branchCount(data)).fill(0);
  for (const ch of s) {
    const k = ch.charCodeAt(0) - 48;
    if (k >= 0 && k < counts.length) counts[k] += 1;
  }
  const n = Math.max(s.length, 1);
  return counts.map((c) => c / n);
}

// Draws one step: blocks as rows, heads as columns, a legend with the step's shares under it.
// Returns the cell size used, so callers can map clicks back to (block, head).
export function drawGates(ctx, data, step, width, height) {
  const colours = branchColours(data);
  const names = branchLabels(data);
  const legendH = 18;
  const cell = Math.max(1, Math.floor(Math.min(width / data.heads, (height - legendH) / data.blocks)));
  const s = data.steps[step] ?? "";
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, width, height);
  for (let b = 0; b < data.blocks; b++) {
    for (let h = 0; h < data.heads; h++) {
      const k = s.charCodeAt(b * data.heads + h) - 48;
      ctx.fillStyle = colours[k] ?? MISSING;
      ctx.fillRect(h * cell, b * cell, cell, cell);
    }
  }
  const shares = stepShares(data, step);
  let x = 0;
  const y = data.blocks * cell + 4;
  ctx.font = "11px sans-serif";
  for (let i = 0; i < colours.length; i++) {
    ctx.fillStyle = colours[i];
    ctx.fillRect(x, y, 10, 10);
    const text = `${names[i]} ${(shares[i] * 100).toFixed(1)}%`;
    ctx.fillStyle = "#ddd";
    ctx.fillText(text, x + 13, y + 9);
    x += 13 + 7 * text.length;
  }
  return cell;
}
