// Nebula RL dashboard: the job list, and of the selected job live curves from its SSE stream,
// its evaluations (pass@k table) and the progress of each of its stages.
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

function pct(v) {
  return typeof v === "number" && Number.isFinite(v) ? `${(v * 100).toFixed(1)}%` : "–";
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
  evals: new Set(), // keys of the eval records shown
  evalRows: [], // the eval records, in the job's order
  job: null, // the job view shown
  metricsPos: null, // [stage index, step within it] of the newest metrics point
  lastState: "", // state|stage of the last entry in the state list
  eventsPos: "0", // position in the job's events stream (first part of an SSE id)
  rank: null, // progress rank of the job view shown (older snapshots never replace it)
  buffer: null, // SSE metrics held back while the history loads
};

function resetLive() {
  Object.values(charts).forEach((c) => c.reset());
  Object.assign(live, { seen: new Set(), x: 0, stage: null, evals: new Set(), evalRows: [],
    job: null, metricsPos: null, lastState: "", eventsPos: "0", rank: null, buffer: [] });
  $("#states").replaceChildren();
  $("#stages tbody").replaceChildren();
  $("#stages-box").hidden = true;
  renderEvals();
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
  if (advanceStages(p) && live.job) renderStages(live.job);
  charts.reward.add(live.x, p);
  charts.loss.add(live.x, p);
  charts.throughput.add(live.x, p);
}

const evalKey = (ev) => `${ev.when}|${ev.version ?? ""}|${ev.greedy}|${ev.sampled}`;

function addEval(ev) {
  if (!ev || typeof ev !== "object") return false;
  const key = evalKey(ev);
  if (live.evals.has(key)) return false;
  live.evals.add(key);
  live.evalRows.push(ev);
  charts.accuracy.add(live.evals.size, ev);
  return true;
}

// The job's evals (from its view): new ones are added, and the table follows the job's
// order (a live `eval` event can arrive before the view that lists the earlier ones).
function mergeEvals(evals) {
  let added = false;
  for (const ev of evals) added = addEval(ev) || added;
  const rank = new Map(evals.map((ev, i) => [evalKey(ev), i]));
  const order = (ev) => rank.get(evalKey(ev)) ?? evals.length;
  const sorted = live.evalRows.map((ev, i) => [order(ev), i, ev])
    .sort((a, b) => a[0] - b[0] || a[1] - b[1]).map((t) => t[2]);
  const moved = sorted.some((ev, i) => ev !== live.evalRows[i]);
  live.evalRows = sorted;
  if (added || moved) renderEvals();
}

// ---- eval table ---------------------------------------------------------------------------

const ksOf = (rows) => [...new Set(rows.flatMap((r) => Object.keys(r)
  .map((k) => /^pass@(\d+)$/.exec(k)).filter(Boolean).map((m) => +m[1])))].sort((a, b) => a - b);

// One row per eval record: when, policy version, prompts, greedy, sampled (mean@n) and every
// pass@k; then a row per domain where the record covers more than one.
function renderEvals() {
  const rows = live.evalRows;
  const ks = ksOf(rows);
  const ns = new Set(rows.map((r) => r.samples).filter((n) => typeof n === "number"));
  const sampledHead = ns.size === 1 ? `sampled (mean@${[...ns][0]})` : "sampled (mean@n)";
  const cols = [["when", "when"], ["version", "policy"], ["prompts", "prompts"],
    ["greedy", "greedy"], ["sampled", sampledHead], ...ks.map((k) => [`pass@${k}`, `pass@${k}`])];
  const head = el("tr");
  for (const [key, label] of cols) {
    const th = el("th", label);
    th.dataset.col = key;
    head.appendChild(th);
  }
  $("#evals thead").replaceChildren(head);
  const body = [];
  const line = (values, cls) => {
    const tr = el("tr", undefined, cls);
    for (const [key] of cols) {
      const td = el("td", values[key] ?? "–");
      td.dataset.col = key;
      tr.appendChild(td);
    }
    body.push(tr);
    return tr;
  };
  const metrics = (m, sampled) => Object.fromEntries([["greedy", pct(m.greedy)],
    ["sampled", pct(sampled)], ...ks.map((k) => [`pass@${k}`, pct(m[`pass@${k}`])])]);
  rows.forEach((r, i) => {
    const tr = line({ when: String(r.when ?? "–"),
      version: r.version != null ? `v${r.version}` : "–",
      prompts: r.prompts != null ? String(r.prompts) : "–", ...metrics(r, r.sampled) }, "eval");
    tr.dataset.evalIndex = String(i);
    if (typeof r.eval_s === "number") tr.title = `evaluated in ${r.eval_s.toFixed(1)} s`;
    const by = r.by_domain && typeof r.by_domain === "object" ? r.by_domain : {};
    const domains = Object.keys(by).sort();
    if (domains.length < 2) return;
    for (const d of domains) {
      const m = by[d] || {};
      const n = typeof m.samples === "number" ? m.samples : r.samples;
      const sampled = m[`mean@${n}`] ?? (r.sampled_by_domain || {})[d];
      const sub = line({ when: `· ${d}`, version: "",
        prompts: m.prompts != null ? String(m.prompts) : "–",
        ...metrics({ greedy: (r.greedy_by_domain || {})[d], ...m }, sampled) }, "eval-domain");
      sub.dataset.evalIndex = String(i);
      sub.dataset.domain = d;
    }
  });
  $("#evals tbody").replaceChildren(...body);
  $("#evals").hidden = !rows.length;
  $("#evals-empty").hidden = rows.length > 0;
}

// ---- stage progress -----------------------------------------------------------------------

const stageIndex = (name) => { const m = /(\d+)$/.exec(name || ""); return m ? +m[1] : -1; };
const configStages = (job) => (Array.isArray(job?.config?.stages) ? job.config.stages : []);
const ahead = (a, b) => !b || a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);

// The job's record is updated by polling the learner; its metrics points arrive as each
// step ends. A point's `step` counts the steps of every stage: the stage's own step is that
// minus the earlier stages' configured steps. True when the position moved forward.
function advanceStages(p) {
  const stages = configStages(live.job);
  const idx = stageIndex(p.stage);
  if (idx < 0 || idx >= stages.length || !Number.isInteger(p.step)) return false;
  const before = stages.slice(0, idx).reduce((a, st) => a + (+st.steps || 0), 0);
  const steps = +stages[idx].steps || Infinity;
  const pos = [idx, Math.min(Math.max(p.step - before, 0), steps)];
  if (!ahead(pos, live.metricsPos)) return false;
  live.metricsPos = pos;
  return true;
}

// A row per stage of the job's config: stages before the current one are done (full), the
// current one is at its step (the record's or the metrics', whichever is further), later
// ones are empty.
function renderStages(job) {
  const stages = configStages(job);
  $("#stages-box").hidden = !stages.length;
  if (!stages.length) return;
  let [cur, step] = [stageIndex(job.stage), job.step || 0];
  if (live.metricsPos && ahead(live.metricsPos, [cur, step])) {
    [cur, step] = live.metricsPos;
  }
  const body = $("#stages tbody");
  if (body.children.length !== stages.length) {
    body.replaceChildren(...stages.map(() => {
      const tr = el("tr");
      const bar = el("progress");
      const cell = el("td", undefined, "progress");
      cell.append(bar, el("span"));
      tr.append(el("td"), el("td"), el("td"), cell);
      return tr;
    }));
  }
  stages.forEach((st, i) => {
    const steps = Number.isInteger(st.steps) ? st.steps : (i === cur ? job.total_steps : null);
    let done = i < cur ? steps : i === cur ? Math.min(step, steps ?? Infinity) : 0;
    if (done == null) done = 0;
    let phase = i < cur ? "done" : i > cur ? "pending"
      : steps != null && done >= steps ? "done" : ACTIVE.has(job.state) ? "running" : "stopped";
    if (i === cur && job.state === "succeeded") phase = "done";
    const tr = body.children[i];
    const name = `${st.type ?? "stage"}${i}`;
    Object.assign(tr.dataset, { stage: name, type: String(st.type ?? ""), done: String(done),
      steps: String(steps ?? ""), phase });
    tr.className = `stage-row ${phase}`;
    tr.children[0].textContent = String(i);
    tr.children[1].textContent = String(st.type ?? "–");
    tr.children[2].textContent = steps != null ? String(steps) : "–";
    const [bar, label] = tr.children[3].children;
    bar.max = steps || 1;
    bar.value = steps ? done : 0;
    label.textContent = `${done} / ${steps ?? "?"}${phase === "running" ? " · running" : ""}`;
  });
}

function addLog(line) {
  const pre = $("#log");
  const lines = pre.textContent ? pre.textContent.split("\n") : [];
  lines.push(line);
  pre.textContent = lines.slice(-MAX_LOG).join("\n");
  pre.scrollTop = pre.scrollHeight;
}

function showJob(job) {
  mergeEvals(Array.isArray(job.evals) ? job.evals : []);
  if (ui.rows.has(job.id)) renderRow(job);
  const rank = rankOf(job);
  if (live.rank && !notOlder(rank, live.rank)) return;
  live.rank = rank;
  live.job = job;
  renderStages(job);
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
    if (addEval(data(ev))) renderEvals();
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
