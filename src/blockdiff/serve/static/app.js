// The page: the same API a client uses (POST /v1/...completions, stream + denoise), drawn live.
"use strict";
const $ = (id) => document.getElementById(id);
const MASK = "\u2591";
window.blockdiffRuns = []; // every run: canvas snapshots and text, or agent events and result (for tests)
let info = null;

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  if ($("key").value) headers.authorization = "Bearer " + $("key").value;
  return fetch(path, body ? { method: "POST", headers, body: JSON.stringify(body) } : { headers });
}

// Reads what the server offers; on a server with --api-key that waits for the key (kept for the tab).
async function init() {
  const r = await api("/v1/samplers");
  if (r.status === 401) {
    $("error").textContent = $("key").value
      ? "the API key was refused: check it and press Run"
      : "this server needs an API key: type it in the API key field and press Run";
    return false;
  }
  if (!r.ok) { $("error").textContent = "cannot read /v1/samplers: " + r.status; return false; }
  $("error").textContent = "";
  info = await r.json();
  $("sampler").textContent = "";
  const models = await (await api("/v1/models")).json();
  info.model = models.data[0].id;
  $("model").textContent = models.data[0].id + (info.ar_model ? ` · AR side: ${info.ar_model}` : "");
  for (const s of Object.keys(info.samplers)) {
    const o = document.createElement("option");
    o.value = o.textContent = s;
    if (s === info.default) o.selected = true;
    $("sampler").append(o);
  }
  $("task").max = info.agent.tasks - 1;
  $("chat").checked = info.chat;
  $("chat").disabled = !info.chat;
  return true;
}

// The option fields the sampler takes, into a request body.
function options(body, sampler) {
  const takes = info.samplers[sampler] || [];
  for (const k of ["block_size", "steps", "threshold", "temperature", "draft_len"]) {
    const v = $(k).value;
    if (v !== "" && takes.includes(k)) body[k] = Number(v);
  }
  return body;
}

// The served model for a side: the AR side (the race's ar panel, the AR agent) uses the AR model
// when the server has one of its own (blockdiff serve --ar-model).
function modelFor(ar) {
  return ar && info.ar_model ? info.ar_model : info.model;
}

// The answer's constraint: OpenAI's response_format (JSON), or blockdiff's regex option.
function constrain(body) {
  const kind = $("constraint").value, text = $("constraint_text").value;
  if (kind === "json_object") body.response_format = { type: "json_object" };
  else if (kind === "json_schema") {
    body.response_format = { type: "json_schema", json_schema: { name: "page", schema: JSON.parse(text) } };
  } else if (kind === "regex") body.regex = text;
  return body;
}

function request(sampler) {
  const body = constrain(options({ model: modelFor(sampler === "ar"), stream: true, denoise: true, sampler,
                         max_tokens: Number($("max_tokens").value), seed: Number($("seed").value) }, sampler));
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
      delete p.cells[pos].dataset.steered;
    }
    for (const [row, pos] of ev.steered || []) {  // the constraint forbade the model's own top token here
      if (row === 0 && p.cells[pos]) p.cells[pos].dataset.steered = "1";
    }
    p.nfe = ev.nfe[0];
    p.run.snapshots.push(p.cells.map((c) => (c.textContent === MASK ? MASK : c.textContent)).join("|"));
  }
  counters(p, false);
}

// The data of every server-sent event of a streamed response, parsed ("[DONE]" as it is).
async function* events(r) {
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const lines = buf.slice(0, cut).split("\n").filter((l) => l.startsWith("data: "));
      buf = buf.slice(cut + 2);
      for (const line of lines) {
        const data = line.slice(6);
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  }
}

async function errorOf(r) {
  const e = await r.json().catch(() => ({ error: { message: r.statusText } }));
  return e.error.message;
}

async function runPanel(p, sampler) {
  p.run = { sampler, snapshots: [], text: null, error: null };
  window.blockdiffRuns.push(p.run);
  const path = $("chat").checked ? "/v1/chat/completions" : "/v1/completions";
  let body;
  try { body = request(sampler); } catch (e) {  // a schema that is not JSON
    p.run.error = `constraint: ${e.message}`;
    p.q(".status").textContent = "error";
    $("error").textContent = p.run.error;
    return;
  }
  const r = await api(path, body);
  if (!r.ok) {
    p.run.error = await errorOf(r);
    p.q(".status").textContent = "error";
    $("error").textContent = `${sampler}: ${p.run.error}`;
    return;
  }
  p.q(".status").textContent = "decoding…";
  for await (const chunk of events(r)) {
    if (chunk === "[DONE]") { p.run.text = p.text; counters(p, true); return; }
    if (chunk.error) { p.run.error = chunk.error.message; $("error").textContent = chunk.error.message; return; }
    if (chunk.blockdiff && chunk.blockdiff.type !== "done") draw(p, chunk.blockdiff);
    if (chunk.blockdiff && chunk.blockdiff.type === "done") p.nfe = chunk.blockdiff.stats[0].nfe;
    for (const c of chunk.choices) {
      if (c.index !== 0) continue;
      const piece = c.delta ? c.delta.content : c.text;
      if (piece) { p.text += piece; p.q(".text").textContent = p.text; }
    }
  }
}

// ---- agents: POST /v1/agent/run streams one agent's rounds; a race is two of them at once ----

function agentBody(agent) {
  const sampler = $("sampler").value;
  const body = options({ model: modelFor(agent === "ar"), agent, sampler, task: Number($("task").value),
                         max_rounds: Number($("max_rounds").value), max_new_tokens: Number($("call_tokens").value),
                         max_errors: Number($("max_errors").value), seed: Number($("seed").value) }, sampler);
  if ($("constrain").checked) body.json_schema = JSON.stringify(info.agent.call_schema); // as agent eval --constrain
  return body;
}

function item(p, round, cls, text) {
  const li = document.createElement("li");
  li.value = round;
  li.className = cls;
  li.textContent = text;
  p.q(".steps").append(li);
  return li;
}

function showAgent(p, ev) {
  const run = p.run;
  run.events.push(ev);
  if (ev.type === "start") {
    Object.assign(run, { sampler: ev.sampler, task: ev.task, question: ev.question });
    p.q(".name").textContent = `${p.agent === "ar" ? "AR agent" : "diffusion agent"} · ${ev.sampler}`;
    p.q(".question").textContent = `${ev.task}: ${ev.question}`;
  } else if (ev.type === "round") {
    p.q(".round").textContent = ev.round;
    p.q(".status").textContent = `round ${ev.round}: decoding…`;
  } else if (ev.type === "call" || ev.type === "call_error") {
    p.tokens += ev.tokens;
    p.nfe += ev.nfe;
    if (ev.type === "call") {
      p.calls++;
      item(p, ev.round, "call", `${ev.call.tool} ${JSON.stringify(ev.call.args)}`);
    } else {
      item(p, ev.round, "bad", `${ev.kind}: ${ev.message} — ${JSON.stringify(ev.text)}`);
    }
  } else if (ev.type === "observation") {
    const obs = document.createElement("div");
    obs.className = "obs";
    obs.textContent = "→ " + JSON.stringify(ev.observation);
    p.q(".steps").lastElementChild.append(obs);
  } else if (ev.type === "done") {
    const res = (run.result = ev.result);
    Object.assign(p, { tokens: res.tokens, nfe: res.nfe, calls: res.tool_calls });
    p.q(".round").textContent = res.rounds;
    p.q(".status").textContent = "done";
    const v = p.q(".verdict");
    v.textContent = res.success ? "solved" : `failed: ${res.failure}`;
    v.className = "verdict " + (res.success ? "solved" : "failed");
    p.q(".answer").textContent = res.answer === null ? "" : JSON.stringify(res.answer);
    p.q(".final").title = "expected " + JSON.stringify(res.expected);
  }
  p.q(".calls").textContent = p.calls;
  p.q(".tokens").textContent = p.tokens;
  p.q(".nfe").textContent = p.nfe;
}

function agentPanel(agent) {
  const el = $("agent-panel").content.firstElementChild.cloneNode(true);
  $("panels").append(el);
  const p = { el, q: (c) => el.querySelector(c), agent, calls: 0, tokens: 0, nfe: 0, t0: performance.now() };
  p.run = { agent, sampler: null, task: null, question: null, events: [], result: null, error: null };
  p.q(".name").textContent = agent === "ar" ? "AR agent" : "diffusion agent";
  return p;
}

async function runAgent(agent) {
  const p = agentPanel(agent);
  window.blockdiffRuns.push(p.run);
  const tick = () => { p.q(".wall").textContent = ((performance.now() - p.t0) / 1000).toFixed(2) + " s"; };
  const timer = setInterval(tick, 100);
  try {
    const r = await api("/v1/agent/run", agentBody(agent));
    if (!r.ok) throw new Error(await errorOf(r));
    for await (const ev of events(r)) {
      if (ev.error) throw new Error(ev.error.message);
      showAgent(p, ev);
      if (ev.type === "done") return;
    }
    throw new Error("the stream ended before the run did");
  } catch (e) {
    p.run.error = e.message;
    p.q(".status").textContent = "error";
    $("error").textContent = `${agent} agent: ${e.message}`;
  } finally {
    clearInterval(timer);
    tick();
  }
}

async function run() {
  $("error").textContent = "";
  if (!info && !(await init())) return; // no key yet, or a wrong one: init said so
  $("panels").textContent = "";
  if ($("mode").value === "agent") {
    $("run").disabled = true;
    try {
      await Promise.all(["ar", "diffusion"].map(runAgent)); // started together
    } finally {
      $("run").disabled = false;
    }
    return;
  }
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
$("key").value = sessionStorage.getItem("blockdiff-key") || "";
$("key").addEventListener("change", () => {
  sessionStorage.setItem("blockdiff-key", $("key").value);
  info = null;
  init();
});
$("mode").addEventListener("change", () => {
  const agents = $("mode").value === "agent";
  $("agent_controls").hidden = !agents;
  $("prompt").hidden = agents; // an agent's prompt is its task
});
init();
