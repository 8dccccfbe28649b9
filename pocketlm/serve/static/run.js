// The run page: follows /api/run/stream (metrics.jsonl as it grows) and draws the run as it learns.
// Every node is built from text (createElement + textContent), never from strings of HTML: sample
// replies are whatever the model wrote. No inline script or style: the page runs under default-src 'self'.
"use strict";

const $ = (id) => document.getElementById(id);
const PHASES = ["pretrain", "sft"];
const COLORS = ["#1864ab", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];
const state = {
  config: null, // config.json: {train, model, pipeline, plan}
  records: [], // every metrics line so far, in file order
  phase: null, // the phase drawn; follows the newest until the user picks one
  picked: false,
  checkpoints: [],
  comparison: null,
};

// el("div", {className: "x"}, "text", child, ...): an element from text and other elements only.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) node[k] = v;
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = (v, digits = 3) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–");
const shown = (s) => s.replace(/ /g, "␣").replace(/\n/g, "↵");

function duration(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// ---- A line chart of several series over the step (canvas, no library) ------------------------------
function drawChart(canvas, series, xLabel, yLabel, xMax) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 48, right = 10, top = 8, bottom = 32;
  const pw = w - left - right, ph = h - top - bottom;
  ctx.clearRect(0, 0, w, h);
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#555";
  ctx.textAlign = "center";
  ctx.fillText(xLabel, left + pw / 2, h - 4);
  ctx.save();
  ctx.translate(11, top + ph / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(yLabel, 0, 0);
  ctx.restore();
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(left, top, pw, ph);
  if (!values.length) {
    ctx.fillText("no data yet", left + pw / 2, top + ph / 2);
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 1;
  lo -= pad; hi += pad;
  const xs = Math.max(xMax || 0, ...series.flatMap((s) => s.points.map((p) => p[0])), 1);
  const x = (v) => left + (v / xs) * pw, y = (v) => top + ph * (1 - (v - lo) / (hi - lo));
  ctx.textAlign = "right";
  for (const v of [lo, (lo + hi) / 2, hi]) {
    ctx.fillText(v.toFixed(2), left - 4, y(v) + 3);
    ctx.strokeStyle = "#f0f0f0";
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(left + pw, y(v)); ctx.stroke();
  }
  ctx.textAlign = "center";
  for (const v of [0, Math.round(xs / 2), xs]) ctx.fillText(String(v), x(v), top + ph + 12);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = s.dots ? 1.5 : 1;
    ctx.beginPath();
    s.points.forEach(([px, py], i) => (i === 0 ? ctx.moveTo(x(px), y(py)) : ctx.lineTo(x(px), y(py))));
    ctx.stroke();
    if (s.dots) for (const [px, py] of s.points) { ctx.beginPath(); ctx.arc(x(px), y(py), 2.5, 0, 7); ctx.fill(); }
  }
}

function legend(node, series) {
  node.replaceChildren(...series.map((s) => {
    const sw = el("span", { className: "swatch" });
    sw.style.background = s.color; // CSSOM, not a style attribute: allowed under the page's CSP
    return el("span", { className: "series" }, sw, s.label);
  }));
}

// ---- What the metrics say --------------------------------------------------------------------------
const ofPhase = (phase, kind) => state.records.filter((r) => r.phase === phase && r.kind === kind);

function phasesSeen() {
  return PHASES.filter((p) => state.records.some((r) => r.phase === p));
}

function earlyStopping(phase) {
  // The loop's rule: an evaluation that does not beat the best so far counts towards the patience.
  let best = Infinity, bestStep = null, stale = 0;
  for (const r of ofPhase(phase, "eval").filter((r) => r.source === "all")) {
    if (r.loss < best) { best = r.loss; bestStep = r.step; stale = 0; } else stale += 1;
  }
  const stop = ofPhase(phase, "stop").at(-1);
  return { best, bestStep, stale, stop };
}

function eta(train) {
  // Wall-clock steps per second over the last lines (evaluations and saves included).
  const recent = train.filter((r) => typeof r.time === "number").slice(-20);
  if (recent.length < 2) return NaN;
  const a = recent[0], b = recent.at(-1);
  const rate = (b.step - a.step) / (b.time - a.time);
  return rate > 0 ? (b.steps - b.step) / rate : NaN;
}

function renderNow() {
  const phase = phasesSeen().at(-1);
  const rows = [];
  const add = (k, v) => rows.push(el("dt", {}, k), el("dd", {}, v));
  if (!phase) {
    add("status", "waiting for the first metrics line");
    $("now").replaceChildren(...rows);
    return;
  }
  const train = ofPhase(phase, "train");
  const last = train.at(-1);
  const patience = state.config?.train?.patience;
  const es = earlyStopping(phase);
  const phases = state.config?.pipeline === "pretrain_then_sft" ? ["pretrain", "sft"] : [phase];
  const done = last && last.step >= last.steps && phase === phases.at(-1);
  add("phase", phase);
  if (last) {
    add("step", last.steps ? `${last.step} of ${last.steps}` : String(last.step)); // older runs: no plan
    add("train loss", fmt(last.loss));
    add("tokens/s", Math.round(last.tok_per_s).toLocaleString("en"));
    add("ETA", es.stop || done ? "–" : `${duration(eta(train))} (this phase)`);
    add("memory", typeof last.mem_gib === "number" ? `${fmt(last.mem_gib, 2)} GiB` : "–");
    add("lr", typeof last.lr === "number" ? last.lr.toExponential(2) : "–");
    add("precision", last.precision);
  }
  let stopping = "no evaluation yet";
  if (es.stop) {
    stopping = `stopped early at step ${es.stop.step}: no better validation loss for ${es.stop.stale_evals} ` +
      "evaluations";
  } else if (es.bestStep !== null) {
    stopping = `best ${fmt(es.best, 4)} at step ${es.bestStep}; ${es.stale} evaluation(s) without improvement` +
      (patience ? ` of ${patience} allowed` : " (early stopping off)");
  }
  add("early stopping", stopping);
  add("status", es.stop ? "stopped early" : done ? "finished" : "training");
  $("now").replaceChildren(...rows);
}

function renderPlan() {
  const cfg = state.config;
  $("run-name").textContent = cfg ? `· ${cfg.train?.name ?? ""} · ${cfg.pipeline ?? ""}` : "";
  const lines = cfg?.plan ?? ["(this run's config.json has no plan: it was started before plans were stored)"];
  $("plan").replaceChildren(...lines.map((line) =>
    el("li", { className: line.startsWith("warning") ? "warning" : "" }, line)));
}

function renderTabs() {
  const seen = phasesSeen();
  if (!state.picked || !seen.includes(state.phase)) state.phase = seen.at(-1) ?? null;
  $("phases").replaceChildren(...seen.map((p) => {
    const b = el("button", { type: "button", className: p === state.phase ? "current" : "", textContent: p });
    b.setAttribute("role", "tab");
    b.addEventListener("click", () => { state.phase = p; state.picked = true; render(); });
    return b;
  }));
}

function renderCurves() {
  const phase = state.phase;
  const evals = phase ? ofPhase(phase, "eval") : [];
  const sources = [...new Set(evals.map((r) => r.source))];
  const color = (i) => COLORS[i % COLORS.length];
  const train = phase ? ofPhase(phase, "train") : [];
  const xMax = train.at(-1)?.steps;
  const loss = [{ label: "train", color: "#adb5bd", points: train.map((r) => [r.step, r.loss]) }];
  sources.forEach((s, i) => loss.push({ label: `val ${s}`, color: color(i), dots: true,
    points: evals.filter((r) => r.source === s).map((r) => [r.step, r.loss]) }));
  const bpb = sources.filter((s) => evals.some((r) => r.source === s && "bpb" in r)).map((s) => ({
    label: `val ${s}`, color: color(sources.indexOf(s)), dots: true,
    points: evals.filter((r) => r.source === s).map((r) => [r.step, r.bpb]) }));
  drawChart($("chart-loss"), loss, "step", "nats per token", xMax);
  drawChart($("chart-bpb"), bpb, "step", "bits per byte", xMax);
  legend($("legend-loss"), loss);
  legend($("legend-bpb"), bpb);
  const lastStep = train.at(-1)?.step;
  $("chart-loss").dataset.points = String(loss.reduce((n, s) => n + s.points.length, 0));
  $("chart-loss").dataset.lastStep = String(lastStep ?? "");
}

function renderTimeline() {
  const samples = state.phase ? ofPhase(state.phase, "sample") : [];
  const prompts = [...new Set(samples.map((r) => r.prompt))];
  if (!prompts.length) {
    $("timeline").replaceChildren(el("p", { className: "note" }, "no evaluation yet: replies appear at each one"));
    return;
  }
  $("timeline").replaceChildren(...prompts.map((p) => el("div", { className: "prompt-block" },
    el("h3", {}, shown(p)),
    ...samples.filter((r) => r.prompt === p).map((r) =>
      el("div", { className: "sample" }, el("span", { className: "step" }, `step ${r.step}`),
        el("span", { className: "text" }, r.text))))));
}

function render() {
  renderTabs();
  renderNow();
  renderCurves();
  renderTimeline();
}

let pending = false;
function scheduleRender() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; render(); });
}

// ---- Checkpoints: list, open in the inspector, compare ---------------------------------------------
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data?.error?.message ?? `HTTP ${r.status}`);
  return data;
}

async function loadCheckpoints() {
  try {
    const data = await api("/api/run/checkpoints");
    state.checkpoints = data.checkpoints;
    renderCheckpoints(data.inspector);
  } catch (e) {
    $("open-status").textContent = `could not list the checkpoints: ${e.message}`;
  }
}

function renderCheckpoints(inspector) {
  const head = el("tr", {}, ...["checkpoint", "step", "val loss", ""].map((h) => el("th", {}, h)));
  const rows = state.checkpoints.map((c) => {
    const open = el("button", { type: "button", textContent: "open in inspector" });
    open.addEventListener("click", () => openInInspector(c.id));
    return el("tr", { className: c.id === inspector ? "loaded" : "" }, el("td", {}, c.id),
      el("td", { className: "num" }, c.step), el("td", { className: "num" }, fmt(c.val_loss, 4)),
      el("td", {}, c.id === inspector ? "in the inspector" : open));
  });
  $("ckpts").replaceChildren(head, ...rows);
  for (const [select, pick] of [[$("cmp-a"), 0], [$("cmp-b"), state.checkpoints.length - 1]]) {
    const keep = select.value;
    select.replaceChildren(...state.checkpoints.map((c) => el("option", { value: c.id, textContent: c.id })));
    if (state.checkpoints.some((c) => c.id === keep)) select.value = keep;
    else if (state.checkpoints.length) select.value = state.checkpoints[Math.max(pick, 0)].id;
  }
}

async function openInInspector(id) {
  const status = $("open-status");
  status.className = "note";
  status.textContent = `loading ${id}…`;
  try {
    const data = await api("/api/run/open", { id });
    status.replaceChildren(`${data.loaded} (step ${data.step}) is now the inspector's model: `,
      el("a", { href: "/", textContent: "chat with it" }));
    await loadCheckpoints();
  } catch (e) {
    status.className = "note error";
    status.textContent = `could not open ${id}: ${e.message}`;
  }
}

function renderComparison() {
  const c = state.comparison;
  if (!c) return;
  const n = c.tokens.length;
  const maxAbs = Math.max(...c.tokens.map((t) => Math.abs(t.delta_bits)), 1e-9);
  // The text as read, each token shaded by its change: green where B finds it likelier, red less likely.
  const text = el("div", { className: "cmp-text" }, ...c.tokens.map((t) => {
    const span = el("span", { className: "ctok", title: `${fmt(t.prob_a, 4)} → ${fmt(t.prob_b, 4)}` }, t.token);
    const strength = Math.min(Math.abs(t.delta_bits) / maxAbs, 1);
    span.style.backgroundColor = `hsl(${t.delta_bits >= 0 ? 130 : 0} 70% ${95 - 30 * strength}%)`;
    return span;
  }));
  const order = c.tokens.map((t, i) => i);
  const change = (i) => Math.abs(c.tokens[i].delta_bits);
  if ($("cmp-sorted").checked) order.sort((i, j) => change(j) - change(i));
  const head = el("tr", {}, ...["#", "token", `p (A: ${c.a.id})`, `p (B: ${c.b.id})`, "Δ bits (B − A)", ""]
    .map((h) => el("th", {}, h)));
  const rows = order.map((i) => {
    const t = c.tokens[i];
    const bar = el("span", { className: `bar ${t.delta_bits >= 0 ? "up" : "down"}` });
    bar.style.width = `${Math.round(60 * Math.abs(t.delta_bits) / maxAbs)}px`;
    return el("tr", { className: "cmp-row" }, el("td", { className: "num" }, t.index), el("td", {}, shown(t.token)),
      el("td", { className: "num" }, fmt(t.prob_a, 4)), el("td", { className: "num" }, fmt(t.prob_b, 4)),
      el("td", { className: "num delta" }, (t.delta_bits >= 0 ? "+" : "") + fmt(t.delta_bits, 2)), el("td", {}, bar));
  });
  $("cmp-out").replaceChildren(
    el("p", { className: "note" }, `${n} tokens: A needs ${fmt(c.bits_a, 1)} bits, B ${fmt(c.bits_b, 1)} bits ` +
      `(${fmt(c.bits_a / n, 2)} → ${fmt(c.bits_b / n, 2)} per token). Each token is read after the ones before ` +
      "it (teacher-forced); the text starts after an <|eot|>."),
    text, el("table", { id: "cmp-table" }, head, ...rows));
}

$("compare-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = $("cmp-status");
  status.className = "";
  status.textContent = "comparing…";
  try {
    state.comparison = await api("/api/run/compare", { a: $("cmp-a").value, b: $("cmp-b").value,
                                                      text: $("cmp-text").value });
    status.textContent = "";
    renderComparison();
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  }
});
$("cmp-sorted").addEventListener("change", renderComparison);

// ---- The stream ------------------------------------------------------------------------------------
function follow() {
  const source = new EventSource("/api/run/stream");
  source.addEventListener("open", () => { $("live").textContent = "live"; $("live").className = "on"; });
  source.addEventListener("error", () => {
    $("live").textContent = "disconnected: retrying…";
    $("live").className = "off";
  });
  source.addEventListener("config", (ev) => { state.config = JSON.parse(ev.data); renderPlan(); scheduleRender(); });
  source.addEventListener("reset", () => { state.records = []; scheduleRender(); });
  source.addEventListener("metrics", (ev) => {
    const records = JSON.parse(ev.data);
    state.records.push(...records);
    $("live").dataset.lines = String(state.records.length);
    if (records.some((r) => r.kind === "snapshot" || r.kind === "eval")) loadCheckpoints();
    scheduleRender();
  });
}

renderPlan();
render();
loadCheckpoints();
follow();
