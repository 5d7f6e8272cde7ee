// The page: the same API a client uses (POST /v1/...completions, stream + denoise), drawn live.
"use strict";
const $ = (id) => document.getElementById(id);
const MASK = "\u2591";
window.blockdiffRuns = []; // every run's canvas snapshots and final text (read by the browser test)
let info = null;

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  if ($("key").value) headers.authorization = "Bearer " + $("key").value;
  return fetch(path, body ? { method: "POST", headers, body: JSON.stringify(body) } : { headers });
}

async function init() {
  const r = await api("/v1/samplers");
  if (!r.ok) { $("error").textContent = "cannot read /v1/samplers: " + r.status; return; }
  info = await r.json();
  const models = await (await api("/v1/models")).json();
  $("model").textContent = models.data[0].id;
  for (const s of Object.keys(info.samplers)) {
    const o = document.createElement("option");
    o.value = o.textContent = s;
    if (s === info.default) o.selected = true;
    $("sampler").append(o);
  }
  $("chat").checked = info.chat;
  $("chat").disabled = !info.chat;
}

function request(sampler) {
  const body = { model: $("model").textContent, stream: true, denoise: true, sampler,
                 max_tokens: Number($("max_tokens").value), seed: Number($("seed").value) };
  const takes = info.samplers[sampler];
  for (const k of ["block_size", "steps", "threshold", "temperature", "draft_len"]) {
    const v = $(k).value;
    if (v !== "" && takes.includes(k)) body[k] = Number(v);
  }
  if ($("chat").checked) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  return body;
}

function panel(name) {
  const el = $("panel").content.firstElementChild.cloneNode(true);
  el.querySelector(".name").textContent = name;
  $("panels").append(el);
  const q = (c) => el.querySelector(c);
  return { el, q, cells: [], tokens: 0, nfe: 0, t0: performance.now(), text: "" };
}

function counters(p, done) {
  const wall = (performance.now() - p.t0) / 1000;
  p.q(".nfe").textContent = p.nfe;
  p.q(".tokens").textContent = p.tokens;
  p.q(".tpn").textContent = p.nfe ? (p.tokens / p.nfe).toFixed(2) : "–";
  p.q(".tps").textContent = wall > 0 ? (p.tokens / wall).toFixed(1) : "–";
  p.q(".wall").textContent = wall.toFixed(2) + " s";
  if (done) p.q(".status").textContent = "done";
}

function draw(p, ev) {
  if (ev.type === "start") {
    const box = p.q(".canvas");
    box.textContent = "";
    p.cells = [];
    for (let i = 0; i < ev.canvas[0]; i++) {
      const s = document.createElement("span");
      s.className = "mask";
      s.textContent = MASK;
      box.append(s);
      p.cells.push(s);
    }
  } else if (ev.type === "denoise") {
    for (const [row, pos, piece] of ev.committed) {
      if (row !== 0 || !p.cells[pos]) continue;
      const s = p.cells[pos];
      s.className = piece === "" ? "eos" : "new";
      s.textContent = piece === "" ? "\u00b7" : piece;
      if (piece !== "") p.tokens++;
      setTimeout(() => { if (s.className === "new") s.className = ""; }, 400);
    }
    for (const [row, pos] of ev.remasked) {
      if (row !== 0 || !p.cells[pos]) continue;
      if (p.cells[pos].className !== "eos") p.tokens--;
      p.cells[pos].className = "remasked";
      p.cells[pos].textContent = MASK;
    }
    p.nfe = ev.nfe[0];
    p.run.snapshots.push(p.cells.map((c) => (c.textContent === MASK ? MASK : c.textContent)).join("|"));
  }
  counters(p, false);
}

async function runPanel(p, sampler) {
  p.run = { sampler, snapshots: [], text: null, error: null };
  window.blockdiffRuns.push(p.run);
  const path = $("chat").checked ? "/v1/chat/completions" : "/v1/completions";
  const r = await api(path, request(sampler));
  if (!r.ok) {
    const e = await r.json().catch(() => ({ error: { message: r.statusText } }));
    p.run.error = e.error.message;
    p.q(".status").textContent = "error";
    $("error").textContent = `${sampler}: ${e.error.message}`;
    return;
  }
  p.q(".status").textContent = "decoding…";
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const lines = buf.slice(0, cut).split("\n").filter((l) => l.startsWith("data: "));
      buf = buf.slice(cut + 2);
      for (const line of lines) {
        const data = line.slice(6);
        if (data === "[DONE]") { p.run.text = p.text; counters(p, true); return; }
        const chunk = JSON.parse(data);
        if (chunk.error) { p.run.error = chunk.error.message; $("error").textContent = chunk.error.message; return; }
        if (chunk.blockdiff && chunk.blockdiff.type !== "done") draw(p, chunk.blockdiff);
        if (chunk.blockdiff && chunk.blockdiff.type === "done") {
          const s = chunk.blockdiff.stats[0];
          p.nfe = s.nfe;
        }
        for (const c of chunk.choices) {
          if (c.index !== 0) continue;
          const piece = c.delta ? c.delta.content : c.text;
          if (piece) { p.text += piece; p.q(".text").textContent = p.text; }
        }
      }
    }
  }
}

async function run() {
  $("error").textContent = "";
  $("panels").textContent = "";
  const samplers = $("mode").value === "race" ? ["ar", $("sampler").value] : [$("sampler").value];
  $("run").disabled = true;
  const panels = samplers.map((s) => panel(s));
  try {
    await Promise.all(panels.map((p, i) => runPanel(p, samplers[i])));
  } finally {
    $("run").disabled = false;
  }
}

$("run").addEventListener("click", run);
init();
