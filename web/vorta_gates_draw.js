// Drawing, hit-testing and decoding for the VORTA gate widget. Pure functions over the data the
// Python node computed (nodes/gate_data.py web_payload): no routing math is redone here, and the
// branches (how many, their names and colours) come from the payload, which takes them from
// vorta_ops/branches.py.
//   data = { blocks, heads, branches: ["full", "coreset", "sliding_tile"],
//            branch_labels: ["full", "core-set", "sliding tile"],
//            colours: ["#d55e00", "#0072b2", "#009e73"], labels: [...],
//            steps: ["0121...", ...],   one character (48 + branch id) per (block, head),
//                                       block-major, per step
//            overall: [0.2, 0.5, 0.3],  share of each branch over all steps
//            score_kind: "probability" | "error",
//            scores: [base64 | null, ...]  per step: uint8 bytes [blocks * heads * branches],
//                                       block-major, then head, then branch; probability =
//                                       byte / 255; error = byte / 100 (254: >= 2.54; 255: not
//                                       measured)
//            tau: 0.3 }                 the training-free router's error threshold
// Everything after "steps" may be missing (payloads from older versions): the widget draws
// without it (the names and colours below serve for a payload without colours).

// Fallback only, for payloads without "colours": the branch table's colours of the first version.
export const BRANCH_COLORS = ["rgb(213,94,0)", "rgb(0,114,178)", "rgb(0,158,115)"];
const MISSING = "#000"; // a cell whose branch the payload does not know
export const MIN_CELL = 6; // the smallest cell the widget asks room for (40 x 40 -> 240 x 240 px)
export const MAX_CELL = 28; // the largest cell it asks for (a small model stays a small node)
const LEGEND_ROW = 16;
const CHAR_W = 6.5; // estimated width of a character of the 11px legend font (layout is pure)
const SWATCH = 10; // this step's legend swatches
const SWATCH_ALL = 8; // the all-steps legend swatches

// True for a payload the widget can draw (anything else is ignored, never thrown on).
export function isPayload(data) {
  return !!data && typeof data === "object" && Number.isInteger(data.blocks) && data.blocks > 0
    && Number.isInteger(data.heads) && data.heads > 0 && Array.isArray(data.steps) && data.steps.length > 0
    && data.steps.every((s) => typeof s === "string");
}

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

function countShares(data, strings) {
  const counts = new Array(branchCount(data)).fill(0);
  let n = 0;
  for (const s of strings) {
    if (typeof s !== "string") continue;
    n += s.length;
    for (let i = 0; i < s.length; i++) {
      const k = s.charCodeAt(i) - 48;
      if (k >= 0 && k < counts.length) counts[k] += 1;
    }
  }
  return counts.map((c) => c / Math.max(n, 1));
}

export function stepShares(data, step) {
  return countShares(data, [data.steps?.[step] ?? ""]);
}

// Share of each branch over all steps: the payload's "overall", else counted from the steps.
export function overallShares(data) {
  const n = branchCount(data);
  const given = data.overall;
  if (Array.isArray(given) && given.length === n && given.every((v) => typeof v === "number" && isFinite(v))) return given.slice();
  return countShares(data, Array.isArray(data.steps) ? data.steps : []);
}

// ---- scores -------------------------------------------------------------------------------

function base64Bytes(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

const decoded = new WeakMap(); // data -> per step Uint8Array | null

// The bytes of one step's scores (blocks * heads * branches), or null: no score_kind, no scores for
// this step, or a string that is not base64 of the right length.
export function stepScoreBytes(data, step) {
  if (!data || (data.score_kind !== "probability" && data.score_kind !== "error") || !Array.isArray(data.scores)) return null;
  let cache = decoded.get(data);
  if (!cache) decoded.set(data, (cache = []));
  if (cache[step] !== undefined) return cache[step];
  let bytes = null;
  const text = data.scores[step];
  if (typeof text === "string" && text) {
    try {
      bytes = base64Bytes(text);
      if (bytes.length !== data.blocks * data.heads * branchCount(data)) bytes = null;
    } catch {
      bytes = null;
    }
  }
  cache[step] = bytes;
  return bytes;
}

// One score byte as a number: probability byte / 255; error byte / 100, 255 -> NaN (not measured).
export function scoreValue(kind, byte) {
  if (kind === "probability") return byte / 255;
  return byte === 255 ? NaN : byte / 100;
}

// The scores of one (block, head) at a step, one per branch, or null.
export function cellScores(data, step, block, head) {
  const bytes = stepScoreBytes(data, step);
  if (!bytes || !(block >= 0 && block < data.blocks && head >= 0 && head < data.heads)) return null;
  const n = branchCount(data);
  const at = (block * data.heads + head) * n;
  return Array.from(bytes.subarray(at, at + n), (b) => scoreValue(data.score_kind, b));
}

function fmtError(byte) {
  return byte === 255 ? "n/a" : byte === 254 ? ">=2.54" : (byte / 100).toFixed(2);
}

// The hover line of one cell, e.g.
//   "block 3 · head 7 · sliding tile · p 0.87 (full 0.05, core-set 0.08, sliding tile 0.87)"
//   "block 3 · head 7 · sliding tile · errors: core-set 0.12, sliding tile 0.03 (tau 0.30)"
export function cellText(data, step, block, head) {
  if (!isPayload(data) || !(block >= 0 && block < data.blocks && head >= 0 && head < data.heads)) return "";
  const names = branchLabels(data);
  const k = (data.steps[step] ?? "").charCodeAt(block * data.heads + head) - 48;
  const chosen = names[k] ?? "unknown branch";
  let text = `block ${block} · head ${head} · ${chosen}`;
  const bytes = stepScoreBytes(data, step);
  if (!bytes) return data.score_kind && Array.isArray(data.scores) ? `${text} · no scores for this step` : text;
  const n = branchCount(data);
  const at = (block * data.heads + head) * n;
  const cell = bytes.subarray(at, at + n);
  if (data.score_kind === "probability") {
    const all = names.map((name, i) => `${name} ${(cell[i] / 255).toFixed(2)}`).join(", ");
    const p = k >= 0 && k < n ? `p ${(cell[k] / 255).toFixed(2)}` : "p ?";
    return `${text} · ${p} (${all})`;
  }
  // errors: full's is 0 by definition (it is the reference), so only the sparse branches are listed
  const listed = names.map((name, i) => [name, i]).filter(([, i]) => !(data.branches?.[i] === "full" || (data.branches == null && i === 0)));
  const errs = listed.map(([name, i]) => `${name} ${fmtError(cell[i])}`).join(", ");
  const tau = typeof data.tau === "number" && isFinite(data.tau) ? ` (tau ${data.tau.toFixed(2)})` : "";
  return `${text} · errors: ${errs}${tau}`;
}

// ---- layout -------------------------------------------------------------------------------

function fmtShares(names, shares) {
  return names.map((name, i) => `${name} ${(shares[i] * 100).toFixed(1)}%`);
}

// The two legend parts, as wrapped rows of items {x, y, w, swatch, colour, text} relative to the
// legend's top-left: this step's shares (10 px swatches), then "all steps" (8 px swatches).
export function legendLayout(data, width, step = 0) {
  const colours = branchColours(data);
  const names = branchLabels(data);
  const items = [];
  let x = 0, y = 0;
  const place = (w, item) => {
    if (x > 0 && x + w > width) { x = 0; y += LEGEND_ROW; }
    items.push({ ...item, x, y, w });
    x += w + 8;
  };
  // widths for "name 100.0%" whatever the share, so the layout is the same at every step
  fmtShares(names, stepShares(data, step)).forEach((text, i) =>
    place(SWATCH + 3 + CHAR_W * (names[i].length + 7), { swatch: SWATCH, colour: colours[i], text }));
  x = 0; y += LEGEND_ROW;
  place(CHAR_W * 10, { swatch: 0, colour: null, text: "all steps:" });
  fmtShares(names, overallShares(data)).forEach((text, i) =>
    place(SWATCH_ALL + 3 + CHAR_W * (names[i].length + 7), { swatch: SWATCH_ALL, colour: colours[i], text }));
  return { items, height: y + LEGEND_ROW + 4 };
}

// Where the grid is in a canvas of this size: blocks as rows, heads as columns, from (0, 0), the
// legend under it. {cell, width, height} of the grid (cell >= 1 px).
export function gridLayout(data, width, height) {
  const legendH = legendLayout(data, width).height;
  const cell = Math.max(1, Math.floor(Math.min(width / data.heads, (height - legendH) / data.blocks)));
  return { cell, width: cell * data.heads, height: cell * data.blocks, legendH };
}

// The canvas size the widget asks for at this width: cells of MIN_CELL..MAX_CELL px.
export function preferredCanvasSize(data, width) {
  const w = Math.max(width, data.heads * MIN_CELL);
  const cell = Math.min(MAX_CELL, Math.max(MIN_CELL, Math.floor(w / data.heads)));
  return { width: w, height: cell * data.blocks + legendLayout(data, w).height, minHeight: MIN_CELL * data.blocks + legendLayout(data, w).height };
}

// The (block, head) under canvas pixel (x, y), or null outside the grid.
export function hitTest(data, width, height, x, y) {
  if (!isPayload(data)) return null;
  const { cell } = gridLayout(data, width, height);
  const head = Math.floor(x / cell), block = Math.floor(y / cell);
  if (!(x >= 0 && y >= 0) || head >= data.heads || block >= data.blocks) return null;
  return { block, head };
}

// ---- drawing ------------------------------------------------------------------------------

// Draws one step: blocks as rows, heads as columns, under it a legend with the step's shares and
// the shares over all steps; `hover` ({block, head}) is outlined. Returns the cell size used
// (hitTest maps a pixel back to (block, head)).
export function drawGates(ctx, data, step, width, height, hover = null) {
  const colours = branchColours(data);
  const { cell } = gridLayout(data, width, height);
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
  if (hover && hover.block >= 0 && hover.block < data.blocks && hover.head >= 0 && hover.head < data.heads && ctx.strokeRect) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1;
    ctx.strokeRect(hover.head * cell + 0.5, hover.block * cell + 0.5, Math.max(cell - 1, 1), Math.max(cell - 1, 1));
  }
  const top = data.blocks * cell + 4;
  ctx.font = "11px sans-serif";
  for (const it of legendLayout(data, width, step).items) {
    let tx = it.x;
    if (it.swatch) {
      ctx.fillStyle = it.colour;
      ctx.fillRect(it.x, top + it.y + (SWATCH - it.swatch), it.swatch, it.swatch);
      tx += it.swatch + 3;
    }
    ctx.fillStyle = it.swatch === SWATCH_ALL || !it.swatch ? "#aaa" : "#ddd";
    ctx.fillText(it.text, tx, top + it.y + 9);
  }
  return cell;
}
