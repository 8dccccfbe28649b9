// The inspector page: sends the chat to /api/inspect and renders its SSE events as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], requestId: null, abort: null, recording: [], context: 0, promptTokens: 0 };
const charts = { ms: new LineChart($("chart-ms"), "#d9480f"), cache: new LineChart($("chart-cache"), "#1864ab") };

fetch("/api/info").then((r) => r.json()).then((info) => {
  const c = info.config;
  state.context = c.block_size;
  $("model-info").textContent =
    `${info.model} · ${c.n_layer} layers × ${c.n_head} heads · d=${c.n_embd} · context ${c.block_size} · ` +
    `vocab ${info.vocab_size} · ${info.device} ${info.dtype} · schema v${info.schema}`;
});

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

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
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
  const span = document.createElement("span");
  span.className = "tok";
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

function esc(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// Escapes control characters (JSON-style) and makes spaces visible, so " the" and "the" differ.
const show = (t) => esc(JSON.stringify(t.token).slice(1, -1).replace(/ /g, "␣"));

function tooltipHtml(s) {
  const bytes = s.bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ");
  let html = `<div class="tt-head"><b>${show(s)}</b> id ${s.id} · bytes ${bytes || "–"}<br>` +
    `p=${s.prob.toFixed(3)} · logprob ${s.logprob.toFixed(2)} · entropy ${s.entropy.toFixed(2)} nats · ` +
    `${s.ms.toFixed(1)} ms · cache ${s.cache_len}</div><table class="alts"><tr><th colspan="2">alternatives</th></tr>`;
  for (const a of s.top) {
    const mine = a.id === s.id ? " class=\"chosen\"" : "";
    html += `<tr${mine}><td>${show(a)}</td><td><span class="bar" style="width:${Math.max(1, a.prob * 80)}px"></span>` +
      `${a.prob.toFixed(3)}</td></tr>`;
  }
  html += "</table>";
  if (s.lens) {
    html += "<table class=\"lens\"><tr><th>layer</th><th>logit lens (top tokens)</th></tr>";
    s.lens.forEach((layer, i) => {
      html += `<tr><td>${i}</td><td>${layer.map((t) => `${show(t)} <small>${t.prob.toFixed(2)}</small>`).join(" · ")}</td></tr>`;
    });
    html += "</table>";
  }
  if (s.attn_entropy) {
    const max = Math.log(Math.max(s.cache_len, 2));
    html += "<div class=\"attn\"><div>attention entropy (rows: layers, columns: heads; dark = focused)</div>";
    for (const row of s.attn_entropy) {
      html += "<div class=\"attn-row\">" + row.map((e) =>
        `<span title="${e.toFixed(2)} nats" style="background:hsl(210 70% ${Math.round(30 + 65 * e / max)}%)"></span>`).join("") + "</div>";
    }
    html += "</div>";
  }
  return html;
}

$("log").addEventListener("mouseover", (ev) => {
  const el = ev.target.closest(".tok");
  if (!el) return;
  const tip = $("tooltip");
  tip.innerHTML = tooltipHtml(el.step);
  tip.hidden = false;
  const r = el.getBoundingClientRect();
  tip.style.left = `${Math.min(r.left, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${r.bottom + 6 + window.scrollY}px`;
});
$("log").addEventListener("mouseout", (ev) => {
  if (ev.target.closest(".tok")) $("tooltip").hidden = true;
});

function setStats(items) {
  $("stats").innerHTML = Object.entries(items).map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Draws one inspector event into `out` (an assistant message); live streams and replays share it.
function render(event, data, out) {
  state.recording.push({ event, data });
  if (event === "prefill") {
    state.requestId = data.request_id;
    state.promptTokens = data.n_tokens;
    setStats({ "prompt tokens": data.n_tokens, "prefill": `${data.ms.toFixed(1)} ms` });
    charts.cache.push(data.cache_len);
  } else if (event === "token") {
    out.appendChild(tokenSpan(data));
    charts.ms.push(data.ms);
    charts.cache.push(data.cache_len);
    $("status").textContent = `token ${data.index + 1} · cache ${data.cache_len}/${state.context}`;
  } else if (event === "done") {
    $("status").textContent = `finished: ${data.finish_reason}`;
    setStats({
      "prompt tokens": state.promptTokens, "new tokens": data.new_tokens,
      "prefill": `${data.prefill_ms.toFixed(1)} ms`, "decode": `${data.decode_tok_s.toFixed(1)} tok/s`,
      "finish": data.finish_reason,
    });
  } else if (event === "error") {
    throw new Error(data.message);
  }
}

function startReply() {
  state.recording = [];
  charts.ms.reset();
  charts.cache.reset();
  return addMessage("assistant", "");
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = startReply();
  const seed = $("seed").value;
  const body = {
    messages: state.messages, temperature: +$("temperature").value, max_tokens: +$("max-tokens").value,
    logit_lens: $("lens").checked, attn_entropy: $("attn").checked, top_alternatives: 8,
    ...(seed === "" ? {} : { seed: +seed }),
  };
  state.abort = new AbortController();
  setBusy(true);
  $("status").textContent = "generating…";
  let reply = "";
  try {
    const res = await fetch("/api/inspect", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(body), signal: state.abort.signal,
    });
    if (!res.ok) {
      const err = await res.json();
      throw new Error(`${err.error.param ?? ""}: ${err.error.message}`);
    }
    for await (const { event, data } of sseEvents(res)) {
      render(event, data, out);
      if (event === "token") reply += data.text;
    }
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : `error ${e.message}`;
  } finally {
    state.messages.push({ role: "assistant", content: reply });
    state.requestId = null;
    setBusy(false);
  }
}

// Record: the last generation's events as JSONL, one {"event", "data"} object per line.
$("save").addEventListener("click", () => {
  const jsonl = state.recording.map((e) => JSON.stringify(e)).join("\n") + "\n";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([jsonl], { type: "application/x-ndjson" }));
  a.download = `pocketlm-inspect-${state.recording[0]?.data.request_id ?? "stream"}.jsonl`;
  a.click();
  URL.revokeObjectURL(a.href);
});

// Replay: draw a saved recording as if it were streaming now (no server involved).
$("replay").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const lines = (await file.text()).split("\n").filter((l) => l.trim());
  addMessage("user", `replay of ${file.name}`);
  const out = startReply();
  for (const line of lines) {
    const { event, data } = JSON.parse(line);
    render(event, data, out);
  }
  ev.target.value = "";
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
  if (state.requestId) fetch(`/api/inspect/${state.requestId}/cancel`, { method: "POST" });
  else state.abort.abort();
});
$("reset").addEventListener("click", () => {
  state.messages = [];
  $("log").innerHTML = "";
  $("status").textContent = "";
});
