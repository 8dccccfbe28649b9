// The inspector page: sends the chat to /api/inspect and renders its SSE events as they arrive.
// Every node is built from text (createElement + textContent), never from strings of HTML: event
// data comes from the server or from a replay file someone shared, and must never run as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const SCHEMA = 1;
const state = {
  messages: [], // [{role, content, el}] the chat as sent to the server; `el` is its bubble
  chat: 0, // bumped by New chat: a generation of an older chat must not touch the new one
  // The running generation, if any: {abort, requestId (from its own stream), done (a promise)}. Only
  // send() sets it; a replay never reads or writes it, and waits for it to end before drawing.
  live: null,
  recording: [], context: 0, prefill: null, pinned: null,
};
// What the server's request ids look like: the only ids this page ever puts in a URL.
const REQUEST_ID = /^gen-[A-Za-z0-9_-]{1,64}$/;
const charts = {
  ms: new LineChart($("chart-ms"), "#d9480f", { y: "ms", x: "new token (0 includes the prefill)" }),
  cache: new LineChart($("chart-cache"), "#1864ab", { y: "tokens", x: "event (0 = after the prompt)" }),
};

// el("div", {className: "x"}, "text", child, ...): an element from text and other elements only.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") Object.assign(node.style, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

fetch("/api/info").then((r) => r.json()).then((info) => {
  const c = info.config;
  state.context = info.context;
  charts.cache.limit = info.context;
  $("max-tokens").max = info.context;
  $("max-tokens").value = info.defaults.max_tokens;
  $("temperature").value = info.defaults.temperature;
  $("model-info").textContent =
    `${info.model} · ${c.n_layer} layers × ${c.n_head} heads · d=${c.n_embd} · context ${info.context} · ` +
    `vocab ${info.vocab_size} · ${info.device} ${info.dtype} · schema v${info.schema}`;
  $("send").disabled = false;
}).catch((e) => { $("model-info").textContent = `could not read /api/info: ${e.message}`; });

// POST with a streamed body: EventSource can only GET, so parse the SSE framing here.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

// ---- The event schema (docs/INSPECTOR.md), checked before a replay file is shown at all ----------
const INT = (v) => Number.isInteger(v), NUM = (v) => typeof v === "number" && Number.isFinite(v);
const STR = (v) => typeof v === "string", BYTE = (v) => Number.isInteger(v) && v >= 0 && v <= 255;
const PROB = (v) => NUM(v) && v >= 0 && v <= 1;
const oneOf = (...xs) => Object.assign((v) => xs.includes(v), { label: `one of ${xs.join(", ")}` });
const ID = Object.assign((v) => STR(v) && REQUEST_ID.test(v),
  { label: "a request id (gen- then up to 64 letters, digits, _ or -)" });
const TOKEN = { id: INT, token: STR, bytes: [BYTE] };
const ENTRY = { ...TOKEN, logprob: NUM, prob: PROB };
const EVENTS = {
  prefill: { v: INT, request_id: ID, n_tokens: INT, ms: NUM, cache_len: INT, cache_bytes: INT, context: INT,
             "dropped?": INT, tokens: [TOKEN] },
  token: { v: INT, ...ENTRY, index: INT, text: STR, entropy: NUM, top: [ENTRY], cache_len: INT, cache_bytes: INT,
           ms: NUM, "lens?": [[{ id: INT, token: STR, prob: PROB }]], "attn_entropy?": [[NUM]],
           "penalized_logprob?": NUM },
  done: { v: INT, finish_reason: oneOf("eot", "length", "cancelled"), new_tokens: INT, prefill_ms: NUM,
          decode_ms: NUM, decode_tok_s: NUM, text: STR },
  error: { v: INT, message: STR },
};

function check(value, spec, path) {
  if (typeof spec === "function") {
    if (!spec(value)) {
      const want = spec.label ?? { INT: "an integer", NUM: "a number", STR: "a string", BYTE: "a byte (0-255)",
                                   PROB: "a probability (0-1)" }[spec.name] ?? "a valid value";
      throw new Error(`${path}: expected ${want}, got ${JSON.stringify(value)?.slice(0, 40)}`);
    }
  } else if (Array.isArray(spec)) {
    if (!Array.isArray(value)) throw new Error(`${path}: expected a list`);
    value.forEach((v, i) => check(v, spec[0], `${path}[${i}]`));
  } else {
    if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error(`${path}: expected an object`);
    for (const [key, sub] of Object.entries(spec)) {
      const name = key.replace(/\?$/, "");
      if (!(name in value)) {
        if (key.endsWith("?")) continue;
        throw new Error(`${path}.${name}: missing`);
      }
      check(value[name], sub, `${path}.${name}`);
    }
  }
}

// A recording: one {"event", "data"} per line, starting with prefill and ending with done or error.
function parseRecording(text) {
  const lines = text.split("\n").map((l, i) => [i + 1, l]).filter(([, l]) => l.trim());
  if (!lines.length) throw new Error("the file is empty");
  const events = lines.map(([n, line]) => {
    let obj;
    try { obj = JSON.parse(line); } catch { throw new Error(`line ${n}: not JSON`); }
    if (typeof obj !== "object" || obj === null || !(obj.event in EVENTS)) {
      throw new Error(`line ${n}: "event" must be one of ${Object.keys(EVENTS).join(", ")}`);
    }
    try { check(obj.data, EVENTS[obj.event], obj.event); } catch (e) { throw new Error(`line ${n}: ${e.message}`); }
    if (obj.data.v !== SCHEMA) throw new Error(`line ${n}: schema v${obj.data.v}; this page reads v${SCHEMA}`);
    return obj;
  });
  if (events[0].event !== "prefill") throw new Error("line 1: a recording starts with a prefill event");
  const last = events[events.length - 1].event;
  if (last !== "done" && last !== "error") throw new Error("the recording has no done or error event at its end");
  return events;
}

// ---- Chat bubbles and tokens --------------------------------------------------------------------
function addMessage(role, text) {
  const div = el("div", { className: `msg ${role}` }, text);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Log scale, p = 1e-4 or less -> red, p = 1 -> green: small models rarely give any token p > 0.5,
// and a linear scale would paint all of their text the same red. Light enough to read text on.
function shade(p) {
  const x = Math.min(1, Math.max(0, 1 + Math.log10(Math.max(p, 1e-12)) / 4));
  return `hsl(${Math.round(120 * x)} 65% ${Math.round(80 + 8 * x)}%)`;
}

function tokenSpan(step) {
  const span = el("span", { className: "tok" });
  span.step = step; // the tooltip reads it back
  span.style.background = shade(step.prob);
  if (step.token === "<|eot|>") {
    span.classList.add("special");
    span.textContent = "⏎ end";
  } else if (step.text === "") {
    span.classList.add("partial"); // bytes of a character that is not complete yet
    span.textContent = "·";
  } else {
    span.textContent = step.text;
  }
  return span;
}

function promptSpan(t, position) {
  const special = /^<\|.*\|>$/.test(t.token);
  const span = el("span", { className: special ? "tok ptok special" : "tok ptok" }, t.token);
  span.step = { ...t, position };
  return span;
}

// Escapes control characters (JSON-style) and makes spaces visible, so " the" and "the" differ.
const show = (t) => JSON.stringify(t.token).slice(1, -1).replace(/ /g, "␣");
const hex = (bytes) => bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ") || "–";

function attnGrid(rows, cacheLen) {
  const max = Math.log(Math.max(cacheLen, 2)); // the entropy of attention spread evenly over the cache
  const head = el("tr", {}, el("th", {}, "layer"), ...rows[0].map((_, h) => el("th", {}, `h${h}`)));
  const table = el("table", { className: "attn" }, head);
  rows.forEach((row, l) => table.append(el("tr", {}, el("th", {}, `${l}`), ...row.map((e, h) => {
    const light = Math.round(30 + 65 * Math.min(e / max, 1));
    return el("td", { title: `layer ${l} head ${h}: ${e.toFixed(3)} nats`,
                      style: { background: `hsl(210 70% ${light}%)`, color: light < 55 ? "#fff" : "#111" } },
              e.toFixed(2));
  }))));
  return el("div", { className: "attn-box" },
    el("div", { className: "tt-title" }, "attention entropy per head (nats)"), table,
    el("div", { className: "attn-legend" },
      el("span", { className: "ramp" }),
      `0 = all on one key (dark) … ${max.toFixed(2)} = ln(${cacheLen}), spread evenly over the cache (light)`));
}

function tooltipContent(s) {
  if (s.position !== undefined) { // a prompt token: what the model read, not what it chose
    return [el("div", { className: "tt-head" }, el("b", {}, show(s)), ` prompt token ${s.position} · id ${s.id} · bytes ${hex(s.bytes)}`)];
  }
  const parts = [el("div", { className: "tt-head" }, el("b", {}, show(s)),
    ` id ${s.id} · bytes ${hex(s.bytes)}`, el("br"),
    `p=${s.prob.toFixed(3)} · logprob ${s.logprob.toFixed(2)} · entropy ${s.entropy.toFixed(2)} nats · ` +
    `${s.ms.toFixed(1)} ms · cache ${s.cache_len}`)];
  // Penalties were on: the chosen token's probability before them (the model's own) and after them.
  if (s.penalized_logprob !== undefined) {
    parts.push(el("div", { className: "tt-penalty" },
      `penalties: p=${s.prob.toFixed(3)} → ${Math.exp(s.penalized_logprob).toFixed(3)} ` +
      `(logprob ${s.logprob.toFixed(2)} → ${s.penalized_logprob.toFixed(2)})`));
  }
  const alts = el("table", { className: "alts" }, el("tr", {}, el("th", { colSpan: 2 }, "alternatives")));
  for (const a of s.top) {
    alts.append(el("tr", { className: a.id === s.id ? "chosen" : "" }, el("td", {}, show(a)),
      el("td", {}, el("span", { className: "bar", style: { width: `${Math.max(1, a.prob * 80)}px` } }), a.prob.toFixed(3))));
  }
  parts.push(alts);
  if (s.lens) {
    const lens = el("table", { className: "lens" }, el("tr", {}, el("th", {}, "layer"), el("th", {}, "logit lens (top tokens)")));
    s.lens.forEach((layer, i) => {
      const cell = el("td");
      layer.forEach((t, j) => cell.append(j ? " · " : "", show(t), " ", el("small", {}, t.prob.toFixed(2))));
      lens.append(el("tr", {}, el("td", {}, `${i}`), cell));
    });
    parts.push(lens);
  }
  if (s.attn_entropy && s.attn_entropy.length) parts.push(attnGrid(s.attn_entropy, s.cache_len));
  return parts;
}

// ---- The tooltip: follows the mouse, or stays put once a token is clicked (pinned) ---------------
function showTooltip(span) {
  const tip = $("tooltip");
  const pinNote = state.pinned === span
    ? el("div", { className: "tt-pin" }, "pinned · click the token again or press Esc to unpin ",
      el("button", { type: "button", className: "unpin", onclick: unpin }, "×"))
    : el("div", { className: "tt-pin hint" }, "click the token to pin this");
  tip.replaceChildren(pinNote, ...tooltipContent(span.step));
  tip.classList.toggle("pinned", state.pinned === span); // only a pinned tooltip takes the mouse
  tip.hidden = false;
  place(tip, span.getBoundingClientRect());
}

// Below the token if it fits above the composer, else above it; never over the composer.
function place(tip, r) {
  tip.style.maxHeight = "";
  const floor = Math.min(window.innerHeight, $("composer").getBoundingClientRect().top) - 6;
  const below = floor - (r.bottom + 6), above = r.top - 6 - 4;
  let top;
  if (tip.offsetHeight <= below) top = r.bottom + 6;
  else if (tip.offsetHeight <= above) top = r.top - 6 - tip.offsetHeight;
  else if (below >= above) { top = r.bottom + 6; tip.style.maxHeight = `${below}px`; }
  else { top = 4; tip.style.maxHeight = `${above}px`; }
  tip.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 8))}px`;
  tip.style.top = `${top}px`;
}

function unpin() {
  if (state.pinned) state.pinned.classList.remove("pinned");
  state.pinned = null;
  $("tooltip").hidden = true;
}

$("log").addEventListener("mouseover", (ev) => {
  const span = ev.target.closest(".tok");
  if (span && !state.pinned) showTooltip(span);
});
$("log").addEventListener("mouseout", (ev) => {
  if (ev.target.closest(".tok") && !state.pinned) $("tooltip").hidden = true;
});
$("log").addEventListener("click", (ev) => {
  const span = ev.target.closest(".tok");
  if (!span) return;
  const again = state.pinned === span;
  unpin();
  if (again) return;
  state.pinned = span;
  span.classList.add("pinned");
  showTooltip(span);
});
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") unpin(); });

// ---- Statistics panel ------------------------------------------------------------------------------
function setStats(groups) {
  $("stats").replaceChildren(...Object.entries(groups).flatMap(([title, items]) => [
    el("h3", {}, title),
    el("dl", {}, ...Object.entries(items).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
  ]));
}

const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);

function prefillStats(p) {
  return {
    tokens: `${p.n_tokens} of ${p.context}`, "time to first token": `${p.ms.toFixed(1)} ms`,
    rate: `${(p.n_tokens / Math.max(p.ms, 1e-3) * 1e3).toFixed(0)} tok/s`,
    "KV cache": `${p.cache_len} tokens · ${(p.cache_bytes / 1024).toFixed(1)} KiB`,
    ...(p.dropped ? { "left out": `${p.dropped} oldest messages` } : {}),
  };
}

function replyStats(steps, done) {
  const out = {
    tokens: `${steps.length}`, "mean p(chosen)": mean(steps.map((s) => s.prob)).toFixed(3),
    "mean entropy": `${mean(steps.map((s) => s.entropy)).toFixed(2)} nats`,
    "mean step": `${mean(steps.slice(1).map((s) => s.ms)).toFixed(1)} ms`,
  };
  if (done) Object.assign(out, { decode: `${done.decode_tok_s.toFixed(1)} tok/s`, finish: done.finish_reason });
  return out;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- Rendering one generation: live streams and replays share it ---------------------------------
function startReply() {
  state.recording = [];
  state.prefill = null;
  charts.ms.reset();
  charts.cache.reset();
  const out = addMessage("assistant", "");
  out.steps = [];
  out.reply = el("span", { className: "reply" });
  out.append(out.reply);
  return out;
}

function render(event, data, out) {
  state.recording.push({ event, data });
  if (event === "prefill") {
    state.prefill = data;
    const summary = el("summary", {}, `prompt · ${data.n_tokens} tokens · prefill ${data.ms.toFixed(1)} ms`);
    const tokens = el("div", { className: "ptoks" }, ...data.tokens.map(promptSpan));
    out.prepend(el("details", { className: "prompt" }, summary, tokens));
    setStats({ "prompt (prefill)": prefillStats(data) });
    charts.cache.push(data.cache_len);
  } else if (event === "token") {
    out.steps.push(data);
    out.reply.append(tokenSpan(data));
    charts.ms.push(data.ms);
    charts.cache.push(data.cache_len);
    $("status").textContent = `token ${data.index + 1} · cache ${data.cache_len}/${state.prefill?.context ?? state.context}`;
    if (data.index % 8 === 0) setStats({ "prompt (prefill)": prefillStats(state.prefill), "reply (decode)": replyStats(out.steps) });
  } else if (event === "done") {
    $("status").textContent = `finished: ${data.finish_reason}`;
    setStats({ "prompt (prefill)": prefillStats(state.prefill), "reply (decode)": replyStats(out.steps, data) });
  } else if (event === "error") {
    throw new Error(data.message);
  }
}

// A turn that failed leaves no empty bubble: the reply bubble says what went wrong instead.
function showFailure(out, message) {
  out.classList.add("error");
  out.append(el("div", { className: "err" }, `⚠ ${message}`));
}

function markDropped(n) {
  const gone = state.messages.slice(0, n);
  state.messages = state.messages.slice(n);
  for (const m of gone) {
    m.el.classList.add("dropped");
    m.el.title = "left out: no longer fits the model's context";
  }
  $("log").insertBefore(el("div", { className: "note" },
    `${n} oldest message${n > 1 ? "s" : ""} no longer fit the ${state.context}-token context and ${n > 1 ? "were" : "was"} left out`),
  gone[gone.length - 1].el.nextSibling);
}

async function send(text) {
  const chat = state.chat;
  const userEl = addMessage("user", text);
  const out = startReply();
  const seed = $("seed").value;
  const body = {
    messages: [...state.messages.map(({ role, content }) => ({ role, content })), { role: "user", content: text }],
    temperature: +$("temperature").value, max_tokens: +$("max-tokens").value, fit_context: true,
    logit_lens: $("lens").checked, attn_entropy: $("attn").checked, top_alternatives: 8,
    ...(seed === "" ? {} : { seed: +seed }),
  };
  const live = { abort: new AbortController(), requestId: null };
  live.done = new Promise((resolve) => { live.ended = resolve; });
  state.live = live;
  setBusy(true);
  $("status").textContent = "generating…";
  let reply = "", failure = null;
  try {
    const res = await fetch("/api/inspect", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(body), signal: live.abort.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: { message: `HTTP ${res.status}` } }));
      throw new Error(`${err.error.param ? err.error.param + ": " : ""}${err.error.message}`);
    }
    for await (const { event, data } of sseEvents(res)) {
      if (chat !== state.chat) return; // New chat was pressed: this reply belongs to nobody now
      if (event === "prefill") live.requestId = data.request_id;
      if (event === "prefill" && data.dropped) markDropped(data.dropped);
      render(event, data, out);
      if (event === "token") reply += data.text;
    }
  } catch (e) {
    if (chat !== state.chat) return;
    failure = e.name === "AbortError" ? "stopped before the first token" : e.message;
  } finally {
    if (state.live === live) {
      state.live = null;
      setBusy(false);
    }
    live.ended(); // a replay waiting for this generation may draw now
  }
  if (failure !== null || !out.steps.length) {
    // Never kept: the next turn must not carry a message the model never answered.
    failure ??= "no reply";
    showFailure(out, failure);
    userEl.classList.add("failed");
    userEl.title = "not sent again: this turn failed";
    $("status").textContent = `error: ${failure}`;
    return;
  }
  state.messages.push({ role: "user", content: text, el: userEl }, { role: "assistant", content: reply, el: out });
}

// Record: the last generation's events as JSONL, one {"event", "data"} object per line.
$("save").addEventListener("click", () => {
  const jsonl = state.recording.map((e) => JSON.stringify(e)).join("\n") + "\n";
  const a = el("a", { href: URL.createObjectURL(new Blob([jsonl], { type: "application/x-ndjson" })),
                      download: `pocketlm-inspect-${state.recording[0]?.data.request_id ?? "stream"}.jsonl` });
  a.click();
  URL.revokeObjectURL(a.href);
});

// Replay: draw a saved recording as if it were streaming now (no server involved). The whole file is
// checked against the schema first: a file that does not match shows an error and nothing of it.
$("replay").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  let events;
  try {
    events = parseRecording(await file.text());
  } catch (e) {
    addMessage("error", `cannot replay ${file.name}: ${e.message}`);
    $("status").textContent = `replay refused: ${e.message}`;
    return;
  }
  // A replay never mixes with a running generation (its stats, charts, Stop): it waits for it to end.
  while (state.live) {
    $("status").textContent = `replay of ${file.name} waits for the running generation (Stop ends it)`;
    await state.live.done;
  }
  addMessage("user", `replay of ${file.name}`);
  const out = startReply();
  try {
    for (const { event, data } of events) render(event, data, out);
  } catch (e) {
    if (!out.steps.length) showFailure(out, e.message);
    $("status").textContent = `error: ${e.message}`;
  }
});

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("send").disabled) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => {
  // Ask the server to stop (the stream then ends with finish_reason "cancelled"); before the first
  // event there is no id yet, so drop the connection instead, which stops it too.
  // Only the live stream's own id is used, never one from a replay file.
  const live = state.live;
  if (!live) return;
  if (live.requestId && REQUEST_ID.test(live.requestId)) {
    fetch(`/api/inspect/${encodeURIComponent(live.requestId)}/cancel`, { method: "POST" });
  } else {
    live.abort.abort();
  }
});
$("reset").addEventListener("click", () => {
  // A running generation is stopped (closing its stream cancels it on the server) and forgotten.
  state.live?.abort.abort();
  state.chat += 1;
  state.messages = [];
  state.live = null;
  unpin();
  setBusy(false);
  $("log").replaceChildren();
  $("stats").replaceChildren();
  charts.ms.reset();
  charts.cache.reset();
  $("status").textContent = "";
});
