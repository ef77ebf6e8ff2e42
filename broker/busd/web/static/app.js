// busd web: the dashboard. Data from /api/*, live by Server-Sent Events (/api/events).
// Every value goes into the page as text (textContent), never as HTML.
"use strict";
const $ = (sel) => document.querySelector(sel);
const state = { csrf: "", status: null, sortKey: "ready", sortDesc: true, samples: [], filters: {} };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function ago(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, Math.floor(s));
  if (s >= 86400) return Math.floor(s / 86400) + "d";
  if (s >= 3600) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  if (s >= 60) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return s + "s";
}
function since(iso) { return iso ? (Date.now() - Date.parse(iso)) / 1000 : null; }
function size(n) {
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}
async function post(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json", "x-csrf-token": state.csrf }, body: JSON.stringify(body) });
}

// -- tabs --------------------------------------------------------------------------
function show(tab) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.tab === tab);
  if (tab === "dlq") loadDlq();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "overview"));

// -- overview and agents -----------------------------------------------------------
function rate(r) { return r && r["1m"] !== null && r["1m"] !== undefined ? String(r["1m"]) : "-"; }
function renderStatus(s) {
  state.status = s;
  const d = s.daemon;
  $("#root").textContent = s.root;
  const running = d.running && !d.error;
  $("#daemon").textContent = d.error ? "daemon not answering" : running ? "daemon running, pid " + d.pid : "daemon down (files)";
  $("#daemon").className = "badge " + (running ? "ok" : "warn");
  $("#down").hidden = running;
  $("#health").textContent = s.attention.length ? "attention" : "healthy";
  $("#health").className = "badge " + (s.attention.length ? "bad" : "ok");
  const att = $("#attention"); att.replaceChildren(...s.attention.map((a) => el("li", a)));
  $("#r-accepted").textContent = rate(s.rates_per_min.accepted);
  $("#r-delivered").textContent = rate(s.rates_per_min.delivered);
  $("#r-dead").textContent = rate(s.rates_per_min.dead_lettered);
  $("#journal").textContent = s.journal.segments + " seg, " + size(s.journal.bytes);
  $("#outbox").textContent = s.outbox.backlog + " waiting";
  $("#dlqcount").textContent = String(s.dlq.entries);
  let oldest = null;
  for (const [name, a] of Object.entries(s.agents)) {
    if (a.oldest_unsettled && (oldest === null || (a.oldest_ready_age_s || 0) > oldest[1])) oldest = [name + ": " + a.oldest_unsettled, a.oldest_ready_age_s || 0];
  }
  $("#oldest").textContent = oldest ? oldest[0] : "-";
  const num = (r) => (r && typeof r["1m"] === "number" ? r["1m"] : 0);
  state.samples.push([num(s.rates_per_min.accepted), num(s.rates_per_min.delivered), num(s.rates_per_min.dead_lettered)]);
  if (state.samples.length > 300) state.samples.shift();
  drawChart();
  renderAgents();
}
function drawChart() {
  const c = $("#chart"), g = c.getContext("2d"), w = c.width, h = c.height;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...state.samples.flat());
  g.fillStyle = "#8a939c"; g.font = "11px sans-serif"; g.fillText(max.toFixed(0) + "/min", 4, 12);
  ["#0969da", "#1a7f37", "#cf222e"].forEach((color, k) => {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    state.samples.forEach((v, i) => {
      const x = w - (state.samples.length - 1 - i) * (w / 300), y = h - 4 - (v[k] / max) * (h - 20);
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
  });
}
function renderAgents() {
  if (!state.status) return;
  const rows = Object.entries(state.status.agents).map(([name, a]) => Object.assign({ name }, a));
  const k = state.sortKey;
  rows.sort((x, y) => {
    const a = x[k] ?? "", b = y[k] ?? "";
    const c = typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
    return state.sortDesc ? -c : c;
  });
  $("#agent-table tbody").replaceChildren(...rows.map((a) => {
    const tr = el("tr");
    const served = a.served === "socket" ? "socket (" + a.connections + ")" : a.served;
    for (const v of [a.name, a.ready, a.in_flight + "/" + a.max_in_flight, a.redelivered, ago(a.oldest_ready_age_s), served, ago(since(a.last_delivery_at)), ago(since(a.last_ack_at))]) tr.append(el("td", v));
    return tr;
  }));
}
for (const th of document.querySelectorAll("#agent-table th")) {
  th.addEventListener("click", () => {
    state.sortDesc = state.sortKey === th.dataset.key ? !state.sortDesc : true;
    state.sortKey = th.dataset.key; renderAgents();
  });
}

// -- messages ----------------------------------------------------------------------
function midLink(id) {
  const a = el("a", id, "mid"); a.href = "#messages";
  a.addEventListener("click", (e) => { e.preventDefault(); showMessage(id); });
  return a;
}
function wfLink(id) {
  if (!id) return el("span", "-");
  const a = el("a", id); a.href = "#workflow";
  a.addEventListener("click", () => loadWorkflow(id));
  return a;
}
function messageRow(m, fresh) {
  const tr = el("tr", undefined, fresh ? "new" : "");
  tr.dataset.mid = m.message_id || "";
  tr.append(el("td", m.at.replace("T", " ").slice(0, 23)), el("td", m.event));
  const td = el("td"); if (m.message_id) td.append(midLink(m.message_id)); tr.append(td);
  tr.append(el("td", m.message_type || "-"), el("td", m.agent || "-"), el("td", (m.to || []).join(",") || "-"));
  const wf = el("td"); wf.append(wfLink(m.workflow_id)); tr.append(wf);
  return tr;
}
function query(f) { const p = new URLSearchParams(); for (const [k, v] of Object.entries(f)) if (v) p.set(k, v); return p.toString(); }
async function loadMessages() {
  const data = await api("/api/messages?" + query(Object.assign({ limit: 200 }, state.filters)));
  $("#message-table tbody").replaceChildren(...data.entries.reverse().map((m) => messageRow(m, false)));
  connect();
}
async function showMessage(id, body) {
  const d = await api("/api/messages/" + encodeURIComponent(id) + (body ? "?body=1" : ""));
  const box = $("#message-detail"); box.hidden = false;
  const pre = el("pre", JSON.stringify(d.envelope, null, 2));
  const parts = [el("h3", id), pre];
  if (!body) { const b = el("button", "show body"); b.addEventListener("click", () => showMessage(id, true)); parts.push(b); }
  parts.push(el("h4", "journal"), el("pre", d.history.map((h) => h.at + " " + h.event + (h.reason ? " " + h.reason : "")).join("\n")));
  box.replaceChildren(...parts);
}
$("#filters").addEventListener("submit", (e) => {
  e.preventDefault(); state.filters = Object.fromEntries(new FormData(e.target)); loadMessages();
});

// -- workflow ----------------------------------------------------------------------
async function loadWorkflow(id) {
  $("#wf-form").workflow.value = id;
  const d = await api("/api/workflows/" + encodeURIComponent(id));
  $("#timeline").replaceChildren(...d.messages.map((m) => {
    const li = el("li"); li.id = "wf-" + m.message_id;
    li.append(el("span", m.at.replace("T", " ").slice(0, 23) + " "), midLink(m.message_id), el("span", " " + (m.message_type || "") + " " + (m.agent || "") + " -> " + (m.to || []).join(",") + " "));
    if (m.title) li.append(el("em", m.title + " "));
    for (const p of m.parents) {
      const a = el("a", "\u2191 " + p); a.href = "#wf-" + p;
      if (!m.parents_here.includes(p)) a.className = "muted";
      li.append(a, el("span", " "));
    }
    return li;
  }));
  if (!d.messages.length) $("#timeline").replaceChildren(el("li", "no message of workflow " + id));
}
$("#wf-form").addEventListener("submit", (e) => { e.preventDefault(); loadWorkflow(e.target.workflow.value); location.hash = "workflow"; });

// -- dlq ---------------------------------------------------------------------------
async function loadDlq() {
  const d = await api("/api/dlq");
  $("#dlq-table tbody").replaceChildren(...d.entries.map((e) => {
    const tr = el("tr");
    const name = el("a", e.name, "mid"); name.href = "#dlq";
    name.addEventListener("click", () => showDlq(e.name));
    const td = el("td"); td.append(name); tr.append(td);
    for (const v of [e.reason, e.sender || "-", e.recipient || "-", ago(since(e.last_failure_at)), e.replays || 0]) tr.append(el("td", v));
    tr.append(el("td", e.detail || "", "detail-cell"));
    const act = el("td");
    if (!e.foreign) { const b = el("button", "replay"); b.addEventListener("click", () => replay([e.name])); act.append(b); }
    tr.append(act);
    return tr;
  }));
}
async function showDlq(name) {
  const d = await api("/api/dlq/" + encodeURIComponent(name));
  const box = $("#dlq-detail"); box.hidden = false;
  box.replaceChildren(el("h3", name), el("pre", JSON.stringify(d.record, null, 2)), el("h4", "original bytes"), el("pre", d.data === null ? "(not a regular file; not shown)" : d.data));
}
async function replay(names) {
  const r = await post("/api/dlq/replay", { names });
  $("#dlq-result").textContent = r.results.map((x) => x.status + " " + x.name + (x.detail ? ": " + x.detail : "")).join("; ");
  loadDlq();
}
function seconds(text) {
  const m = /^([0-9.]+)\s*(ms|s|m|h|d|w)?$/i.exec(text.trim());
  if (!m) return null;
  return parseFloat(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400, w: 604800 }[(m[2] || "s").toLowerCase()];
}
$("#purge-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const s = seconds(e.target.age.value);
  if (s === null) { $("#dlq-result").textContent = "not a duration: " + e.target.age.value; return; }
  if (!confirm("Delete DLQ entries whose last failure is older than " + e.target.age.value + "?")) return;
  const r = await post("/api/dlq/purge", { older_than_s: s });
  $("#dlq-result").textContent = "purged " + r.count + " entries";
  loadDlq();
});

// -- live --------------------------------------------------------------------------
let source = null;
function connect() {
  if (source) source.close();
  source = new EventSource("/api/events?" + query(state.filters));
  source.addEventListener("open", () => { $("#live").textContent = "live"; });
  source.addEventListener("error", () => { $("#live").textContent = "reconnecting…"; });
  source.addEventListener("status", (e) => renderStatus(JSON.parse(e.data)));
  source.addEventListener("entry", (e) => {
    const tbody = $("#message-table tbody");
    tbody.prepend(messageRow(JSON.parse(e.data), true));
    while (tbody.children.length > 500) tbody.lastChild.remove();
  });
}

async function start() {
  const s = await api("/api/session");
  state.csrf = s.csrf;
  show(location.hash.slice(1) || "overview");
  renderStatus(await api("/api/status"));
  await loadMessages();
}
start().catch((err) => { $("#live").textContent = String(err); });
