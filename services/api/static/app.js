// Nebula RL dashboard: the job list, and live curves of the selected job from its SSE stream.
"use strict";

const $ = (sel) => document.querySelector(sel);
const ACTIVE = new Set(["queued", "starting", "running"]);
const REFRESH_MS = 3000;
const MAX_LOG = 200;

const ui = {
  token: localStorage.getItem("nebula.token") || "",
  limit: 50,
  selected: null, // job id
  stream: null, // EventSource of the selected job
  rows: new Map(), // id -> <tr>
};

const charts = {
  reward: new LineChart($("#chart-reward"), [
    { key: "reward_mean", label: "reward", color: "#2f6fdf" },
    { key: "pass_rate", label: "pass rate", color: "#1a9a5a" },
  ]),
  loss: new LineChart($("#chart-loss"), [{ key: "loss", label: "loss", color: "#c2412d" }]),
  accuracy: new LineChart($("#chart-accuracy"), [
    { key: "greedy", label: "greedy", color: "#7a3fc4" },
    { key: "sampled", label: "sampled", color: "#d08a00" },
  ], { yMin: 0, yMax: 1, format: (v) => `${(v * 100).toFixed(1)}%` }),
  throughput: new LineChart($("#chart-throughput"), [
    { key: "tokens_per_s", label: "tokens/s", color: "#0f8a9d" },
  ]),
};

// ---- HTTP ---------------------------------------------------------------------------------

async function api(path, opts = {}) {
  const headers = { ...(opts.headers || {}) };
  if (ui.token) headers.Authorization = `Bearer ${ui.token}`;
  const res = await fetch(path, { ...opts, headers });
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
    const err = new Error(`${res.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    err.status = res.status;
    throw err;
  }
  return res.status === 204 ? null : res.json();
}

const withToken = (path) =>
  ui.token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(ui.token)}` : path;

// ---- formatting ---------------------------------------------------------------------------

function num(v, digits = 3) {
  return typeof v === "number" && Number.isFinite(v) ? Number(v.toPrecision(digits)).toString() : "–";
}

function when(t) {
  if (t === null || t === undefined || t === "") return "–";
  const d = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  return Number.isNaN(d.getTime()) ? String(t) : d.toLocaleString();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function stateText(job) {
  return job.state === "queued" && job.queue_position != null
    ? `queued #${job.queue_position}` : job.state;
}

// ---- job table ----------------------------------------------------------------------------

function rowCells(job) {
  const m = job.latest_metrics || {};
  const total = job.total_steps ? `/${job.total_steps}` : "";
  return [job.id, job.name || "", job.tenant || "", stateText(job), job.stage || "–",
    `${job.step ?? 0}${total}`, job.policy_version ?? "–", num(m.reward_mean)];
}

function renderRow(job) {
  let tr = ui.rows.get(job.id);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.jobId = job.id;
    tr.addEventListener("click", () => select(job.id));
    rowCells(job).forEach(() => tr.appendChild(el("td")));
    ui.rows.set(job.id, tr);
  }
  rowCells(job).forEach((v, i) => { tr.children[i].textContent = String(v); });
  tr.children[3].className = `state ${job.state}`;
  tr.dataset.state = job.state;
  tr.classList.toggle("selected", job.id === ui.selected);
  return tr;
}

async function refreshJobs() {
  const state = $("#state-filter").value;
  const q = new URLSearchParams({ limit: String(ui.limit) });
  if (state) q.set("state", state);
  try {
    const page = await api(`/v1/jobs?${q}`);
    const body = $("#jobs tbody");
    const keep = new Set();
    const rows = page.jobs.map((job) => {
      keep.add(job.id);
      if (job.id === ui.selected) showJob(job);
      return renderRow(job);
    });
    body.replaceChildren(...rows);
    for (const id of [...ui.rows.keys()]) if (!keep.has(id)) ui.rows.delete(id);
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", "no jobs", "muted");
      td.colSpan = 8;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    $("#more").hidden = !page.next_cursor;
    $("#jobs-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("#jobs-status").textContent = e.status === 401 || e.status === 403
      ? "not authorized: enter a token" : `error: ${e.message}`;
  }
}

async function refreshHealth() {
  const h = $("#health");
  try {
    const res = await fetch("/healthz");
    h.textContent = res.ok ? "healthy" : `unhealthy (${res.status})`;
    h.className = `pill ${res.ok ? "ok" : "bad"}`;
  } catch (_) {
    h.textContent = "unreachable";
    h.className = "pill bad";
  }
}

// ---- selected job -------------------------------------------------------------------------

const live = {
  seen: new Set(), // metric seqs already drawn
  x: 0, // x of the last metrics point drawn
  stage: null, // stage of the last metrics point
  evals: new Set(),
  lastState: "", // state|stage of the last entry in the state list
  eventsPos: "0", // position in the job's events stream (first part of an SSE id)
  rank: null, // progress rank of the job view shown (older snapshots never replace it)
  buffer: null, // SSE metrics held back while the history loads
};

function resetLive() {
  Object.values(charts).forEach((c) => c.reset());
  Object.assign(live, { seen: new Set(), x: 0, stage: null, evals: new Set(), lastState: "",
    eventsPos: "0", rank: null, buffer: [] });
  $("#states").replaceChildren();
  $("#log").textContent = "";
}

// How far a job view is: attempt, state, stage index, step. The SSE stream replays old
// state snapshots after the current one; they go to the state list but not the facts.
const STATE_RANK = { queued: 0, starting: 1, running: 2 };
function rankOf(job) {
  const stage = /(\d+)$/.exec(job.stage || "");
  return [job.attempt || 0, STATE_RANK[job.state] ?? 3, stage ? +stage[1] : -1, job.step || 0];
}
function notOlder(a, b) {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] > b[i];
  return true;
}

function addPoint(p) {
  const key = String(p.seq ?? `${p.stage}:${p.step}:${p.time}`);
  if (live.seen.has(key)) return;
  live.seen.add(key);
  live.x += 1;
  if (p.stage && p.stage !== live.stage) {
    live.stage = p.stage;
    for (const k of ["reward", "loss", "throughput"]) charts[k].mark(live.x, p.stage);
  }
  charts.reward.add(live.x, p);
  charts.loss.add(live.x, p);
  charts.throughput.add(live.x, p);
}

function addEval(ev) {
  const key = `${ev.when}|${ev.version ?? ""}|${ev.greedy}|${ev.sampled}`;
  if (live.evals.has(key)) return;
  live.evals.add(key);
  charts.accuracy.add(live.evals.size, ev);
}

function addLog(line) {
  const pre = $("#log");
  const lines = pre.textContent ? pre.textContent.split("\n") : [];
  lines.push(line);
  pre.textContent = lines.slice(-MAX_LOG).join("\n");
  pre.scrollTop = pre.scrollHeight;
}

function showJob(job) {
  (job.evals || []).forEach(addEval);
  if (ui.rows.has(job.id)) renderRow(job);
  const rank = rankOf(job);
  if (live.rank && !notOlder(rank, live.rank)) return;
  live.rank = rank;
  $("#job-title").textContent = `${job.name || "job"} · ${job.id}`;
  const st = $("#job-state");
  st.textContent = stateText(job);
  st.className = `state ${job.state}`;
  $("#cancel").hidden = !ACTIVE.has(job.state);
  const m = job.latest_metrics || {};
  const facts = [
    ["tenant", job.tenant], ["priority", job.priority],
    ["stage", job.stage || "–"],
    ["step", `${job.step ?? 0}${job.total_steps ? ` / ${job.total_steps}` : ""}`],
    ["policy version", job.policy_version ?? "–"],
    ["reward", num(m.reward_mean)], ["loss", num(m.loss)],
    ["checkpoints", (job.checkpoints || []).length],
    ["created", when(job.created_at)], ["started", when(job.started_at)],
    ["finished", when(job.finished_at)],
  ];
  $("#job-facts").replaceChildren(...facts.map(([k, v]) => {
    const div = el("div");
    div.append(el("dt", k), el("dd", String(v ?? "–")));
    return div;
  }));
  const err = $("#job-error");
  err.hidden = !job.error;
  err.textContent = job.error ? `error: ${job.error}` : "";
}

// One entry per state (or stage) change, timed by its position in the events stream
// (a Redis stream id starts with the milliseconds it was written at).
function addState(job, pos) {
  const sig = `${job.state}|${job.stage || ""}`;
  if (sig === live.lastState) return;
  live.lastState = sig;
  const ms = Number(String(pos).split("-")[0]);
  const li = el("li");
  li.append(el("time", ms > 0 ? new Date(ms).toLocaleTimeString() : ""), ` ${stateText(job)}`,
    job.stage ? ` · ${job.stage}` : "");
  $("#states").appendChild(li);
}

async function loadHistory(id) {
  let since = null;
  for (let page = 0; page < 100; page++) {
    const q = new URLSearchParams({ limit: "1000" });
    if (since !== null) q.set("since", String(since));
    const res = await api(`/v1/jobs/${encodeURIComponent(id)}/metrics?${q}`);
    if (ui.selected !== id) return;
    res.points.forEach(addPoint);
    if (!res.points.length || res.next_since == null || res.next_since === since) break;
    since = res.next_since;
  }
}

function openStream(id) {
  const es = new EventSource(withToken(`/v1/jobs/${encodeURIComponent(id)}/events`));
  const status = $("#stream-status");
  const mine = (fn) => (ev) => { if (ui.stream === es) fn(ev); };
  const data = (ev) => { try { return JSON.parse(ev.data); } catch (_) { return null; } };
  es.onopen = mine(() => { status.textContent = "live"; });
  es.onerror = mine(() => {
    status.textContent = es.readyState === EventSource.CLOSED ? "stream closed" : "reconnecting…";
  });
  // Event ids are "events,metrics,logs" stream positions. The first state frame of each
  // connection is the current view (its events position is where the client stands); the
  // ones after it are state changes from the job's events stream.
  const eventsPos = (ev) => String(ev.lastEventId || "").split(",")[0] || "0";
  es.addEventListener("state", mine((ev) => {
    const job = data(ev);
    if (!job) return;
    const pos = ev.lastEventId ? eventsPos(ev) : `${Date.now()}-0`; // no ids: all are news
    // A terminal state always reaches the list (addState drops repeats), even when its
    // frame carries a position already seen (e.g. the current view after a reconnect).
    if (pos !== live.eventsPos || ["succeeded", "failed", "cancelled"].includes(job.state)) {
      addState(job, pos);
    }
    live.eventsPos = pos;
    showJob(job);
  }));
  es.addEventListener("metrics", mine((ev) => {
    if (ev.lastEventId) live.eventsPos = eventsPos(ev);
    const d = data(ev);
    const points = Array.isArray(d) ? d : d ? [d] : [];
    points.forEach((p) => (live.buffer ? live.buffer.push(p) : addPoint(p)));
  }));
  es.addEventListener("eval", mine((ev) => {
    if (ev.lastEventId) live.eventsPos = eventsPos(ev);
    const d = data(ev);
    if (d) addEval(d);
  }));
  es.addEventListener("log", mine((ev) => {
    if (ev.lastEventId) live.eventsPos = eventsPos(ev);
    const d = data(ev);
    addLog(d && typeof d === "object" ? String(d.line ?? "") : ev.data);
  }));
  es.addEventListener("end", mine(async () => {
    es.close();
    // The end frame can overtake the last state change: read the final view once.
    try {
      const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
      if (ui.stream === es) {
        addState(job, `${Date.now()}-0`);
        showJob(job);
      }
    } catch (_) { /* the list refresh shows it too */ }
    if (ui.stream === es) status.textContent = "finished";
  }));
  return es;
}

async function select(id) {
  if (ui.stream) ui.stream.close();
  ui.stream = null;
  ui.selected = id;
  history.replaceState(null, "", `${location.pathname}${location.search}#job=${encodeURIComponent(id)}`);
  for (const [rid, tr] of ui.rows) tr.classList.toggle("selected", rid === id);
  resetLive();
  // The title names the job at once; the rest of the panel fills in when its view arrives.
  $("#job-title").textContent = id;
  $("#job-panel").hidden = false;
  $("#stream-status").textContent = "loading…";
  // Open the stream first (holding its points back) so nothing falls between history and live.
  ui.stream = openStream(id);
  try {
    const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    if (ui.selected !== id) return;
    showJob(job);
    await loadHistory(id);
  } catch (e) {
    $("#stream-status").textContent = `error: ${e.message}`;
  }
  if (ui.selected !== id) return;
  const held = live.buffer || [];
  live.buffer = null;
  held.forEach(addPoint);
}

// ---- wiring -------------------------------------------------------------------------------

function setToken(token) {
  ui.token = token.trim();
  if (ui.token) localStorage.setItem("nebula.token", ui.token);
  else localStorage.removeItem("nebula.token");
  $("#token").value = ui.token;
}

function init() {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    setToken(params.get("token"));
    params.delete("token"); // keep the token out of the address bar and history
    const rest = params.toString();
    history.replaceState(null, "", `${location.pathname}${rest ? `?${rest}` : ""}${location.hash}`);
  } else {
    $("#token").value = ui.token;
  }
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken($("#token").value);
    refreshJobs();
    if (ui.selected) select(ui.selected);
  });
  $("#state-filter").addEventListener("change", refreshJobs);
  $("#more").addEventListener("click", () => { ui.limit += 50; refreshJobs(); });
  $("#cancel").addEventListener("click", async () => {
    if (!ui.selected || !confirm(`Cancel job ${ui.selected}?`)) return;
    try {
      const id = ui.selected;
      await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      if (ui.selected === id) showJob(await api(`/v1/jobs/${encodeURIComponent(id)}`));
    } catch (e) {
      addLog(`cancel failed: ${e.message}`);
    }
  });
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.changed()));
  refreshHealth();
  refreshJobs();
  setInterval(refreshJobs, REFRESH_MS);
  setInterval(refreshHealth, 10000);
  const m = /#job=([^&]+)/.exec(location.hash);
  if (m) select(decodeURIComponent(m[1]));
}

init();
