// duckfleet's web console: one page over the HTTP API only (catalog, queries, running queries,
// fleet and cache stats). Every value from the server is put into the page as text
// (textContent, text nodes), never parsed as HTML. The token, when auth is on, lives in this
// tab's sessionStorage and goes with every call; a 401 asks for it again.
import {chartable, draw} from "./chart.js";

const TOKEN_KEY = "duckfleet.token";
const SHOWN_ROWS = 1000; // rows put in the result table; the chart uses every row received
const MAX_RESULT_BYTES = 32 * 1024 * 1024; // larger results are for the download button
const FLEET_EVERY_MS = 3000;
const RUNNING_EVERY_MS = 1000;
const VIEWS = ["catalog", "query", "fleet", "running"];
const DOWNLOADS = {csv: "csv", parquet: "parquet", arrow: "arrows"}; // format -> file extension

const $ = (id) => document.getElementById(id);
const state = {view: "catalog", catalog: null, result: null, chart: false, running: null, plot: null};

// --- DOM helpers: strings become text nodes, never markup ---

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const count = (n, one, many) => `${number(n)} ${n === 1 ? one : many}`;

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Integers past 2**53 keep every digit (as BigInt) where the browser hands a reviver the source
// text; they are written back as bare numbers.
const exactIntegers = (key, value, context) => (
  Number.isInteger(value) && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)
    ? BigInt(context.source) : value);
const bareBigInts = (key, value) => (
  typeof value === "bigint" ? (JSON.rawJSON ? JSON.rawJSON(String(value)) : String(value)) : value);

function cellText(value) {
  if (value === null) return "NULL";
  if (typeof value === "object") return JSON.stringify(value, bareBigInts);
  return String(value);
}

function table(node, head, rows) {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}

function showError(node, status, body) {
  const kind = body && body.error_type ? body.error_type : "error";
  const message = body && body.error ? body.error : String(body);
  node.replaceChildren(el("strong", {}, `${status} ${kind}`), el("pre", {}, message));
  node.hidden = false;
}

// --- the token and every call to the API ---

let login = null; // {promise, resolve} while the prompt is open

function askToken(message) {
  $("login-error").textContent = message;
  if (!login) {
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    login = {promise, resolve};
  }
  if (!$("login").open) $("login").showModal();
  $("login-token").focus();
  return login.promise;
}

function tokenEntered(event) {
  event.preventDefault();
  const token = $("login-token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login-token").value = "";
  $("login").close();
  $("forget-token").hidden = false;
  const {resolve} = login;
  login = null;
  resolve();
}

async function api(path, options = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(path, {...options, headers});
    if (response.status !== 401) return response;
    const body = await response.json().catch(() => ({}));
    if (sessionStorage.getItem(TOKEN_KEY) !== token) continue; // a newer token came meanwhile
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
    await askToken(token ? `Refused: ${body.error || "not a valid token"}` : "");
  }
}

async function getJSON(path) {
  const response = await api(path);
  return {response, body: await response.json().catch(() => null)};
}

// --- views and the URL (view, sql, chart: a link reproduces what it shows) ---

function writeUrl() {
  const params = new URLSearchParams();
  params.set("view", state.view);
  const sql = $("sql").value;
  if (sql.trim()) params.set("sql", sql);
  if (state.chart) params.set("chart", "1");
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

function show(view) {
  state.view = view;
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const tab of $("tabs").children) tab.classList.toggle("active", tab.dataset.view === view);
  writeUrl();
  if (view === "fleet") attempt(refreshFleet, "fleet-status");
  if (view === "running") attempt(refreshRunning, "running-status");
  if (view === "query") $("sql").focus();
}

// A refresh that fails (the server is gone) says so in the status line it names.
function attempt(task, status) {
  return task().catch((error) => { $(status).textContent = `Not refreshed: ${error}`; });
}

// Each poller waits for its previous call to finish before the next is scheduled.
function every(ms, status, task) {
  const tick = () => attempt(task, status).then(() => setTimeout(tick, ms));
  setTimeout(tick, ms);
}

// --- catalog ---

const SIMPLE_NAME = /^[a-z_][a-z0-9_]*$/;
const ident = (name) => (SIMPLE_NAME.test(name) ? name : `"${name.replaceAll('"', '""')}"`);

function tableQuery(database, t) {
  const name = database === state.catalog.default_database
    ? ident(t.name) : `${ident(database)}.${ident(t.name)}`;
  const order = t.time_column ? ` ORDER BY ${ident(t.time_column)} DESC` : "";
  return `SELECT * FROM ${name}${order} LIMIT 100`;
}

function tableCard(database, t) {
  const open = (event) => {
    event.preventDefault();
    $("sql").value = tableQuery(database, t);
    setChart(false);
    show("query");
    run();
  };
  const range = t.time_min ? ` · ${t.time_column} ${t.time_min} … ${t.time_max}` : "";
  return el("details", {class: "table-card"},
    el("summary", {},
      el("span", {class: "name"}, t.name),
      el("span", {class: "meta"}, `${count(t.rows, "row", "rows")} · ${count(t.files, "file", "files")} · ` +
        `${bytes(t.bytes)}${range}`),
      el("button", {type: "button", class: "query-table", onclick: open}, "Query")),
    t.error ? el("p", {class: "error-text"}, t.error) : null,
    el("table", {class: "grid columns"},
      el("thead", {}, el("tr", {}, el("th", {}, "column"), el("th", {}, "type"))),
      el("tbody", {}, ...t.columns.map((c) => el("tr", {}, el("td", {}, c.name), el("td", {}, c.type))))));
}

function renderCatalog() {
  const filter = $("catalog-filter").value.trim().toLowerCase();
  const sections = [];
  for (const db of state.catalog.databases) {
    const tables = db.tables.filter((t) => !filter || `${db.name}.${t.name}`.toLowerCase().includes(filter));
    if (tables.length) {
      sections.push(el("section", {class: "database"}, el("h2", {}, db.name),
        ...tables.map((t) => tableCard(db.name, t))));
    }
  }
  $("catalog-list").replaceChildren(...sections);
  $("catalog-status").textContent = sections.length ? "" : "No table matches.";
}

async function loadCatalog() {
  $("catalog-status").textContent = "Loading…";
  const {response, body} = await getJSON("api/v1/catalog");
  if (!response.ok) {
    showError($("catalog-status"), response.status, body);
    return;
  }
  state.catalog = body;
  renderCatalog();
}

// --- query: run, cancel, download, result table, chart ---

function requestId() {
  const random = new Uint8Array(8);
  crypto.getRandomValues(random);
  return `console-${Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function setRunning(running) {
  state.running = running;
  $("run").disabled = $("download").disabled = Boolean(running);
  $("cancel").disabled = !running;
  const bar = $("query-progress");
  bar.hidden = !running;
  bar.removeAttribute("value"); // indeterminate until the worker reports progress
}

// The body, or null when it is over MAX_RESULT_BYTES (reading stops there).
async function readCapped(response) {
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    size += value.length;
    if (size > MAX_RESULT_BYTES) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  return new TextDecoder().decode(await new Blob(chunks).arrayBuffer());
}

async function send(path, body, id) {
  return api(path, {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-Request-Id": id},
  });
}

async function run() {
  const sql = $("sql").value;
  if (!sql.trim() || state.running) return;
  const id = requestId();
  const started = performance.now();
  setRunning({id, what: "query"});
  $("query-error").hidden = true;
  $("query-status").textContent = "Running…";
  writeUrl();
  try {
    const response = await send("api/v1/query", {sql, format: "json"}, id);
    const text = await readCapped(response);
    const took = performance.now() - started;
    if (text === null) {
      clearResult();
      $("query-status").textContent = `The result is over ${bytes(MAX_RESULT_BYTES)} ` +
        `(${number(response.headers.get("X-Row-Count"))} rows): download it instead.`;
      return;
    }
    let body;
    try { body = JSON.parse(text, exactIntegers); } catch { body = text; }
    if (!response.ok || !body.success) {
      clearResult();
      $("query-status").textContent = `Failed after ${took.toFixed(0)} ms (request ${id}).`;
      showError($("query-error"), response.status, body);
      return;
    }
    state.result = body;
    renderResult(response, took, id);
  } catch (error) {
    clearResult();
    $("query-status").textContent = "";
    showError($("query-error"), "network", {error: String(error)});
  } finally {
    setRunning(null);
  }
}

function clearResult() {
  state.result = null;
  $("result").replaceChildren();
  drawChart();
}

function renderResult(response, took, id) {
  const {columns, data, row_count: rows} = state.result;
  table($("result"), columns, data.slice(0, SHOWN_ROWS).map((row) => row.map(cellText)));
  for (const [i, row] of data.slice(0, SHOWN_ROWS).entries()) {
    row.forEach((value, j) => {
      if (value === null) $("result").tBodies[0].rows[i].cells[j].classList.add("null");
    });
  }
  const parts = [`${number(rows)} rows` + (rows > SHOWN_ROWS ? ` (first ${number(SHOWN_ROWS)} shown)` : ""),
    `execution ${state.result.execution_time_ms} ms`, `wait ${state.result.wait_time_ms} ms`,
    `round trip ${took.toFixed(0)} ms`];
  const scanned = response.headers.get("X-Files-Scanned");
  if (scanned !== null) {
    parts.push(`files scanned ${scanned}, pruned ${response.headers.get("X-Files-Pruned")}`);
  }
  const cache = response.headers.get("X-Cache");
  if (cache) parts.push(`cache ${cache}`);
  parts.push(`request ${id}`);
  $("query-status").textContent = parts.join(" · ");
  drawChart();
}

async function cancel() {
  if (!state.running) return;
  $("query-status").textContent = "Cancelling…";
  const response = await api(`api/v1/queries/${encodeURIComponent(state.running.id)}`, {method: "DELETE"});
  if (!response.ok && response.status !== 404) { // 404: it had already finished
    showError($("query-error"), response.status, await response.json().catch(() => null));
  }
}

async function download() {
  const sql = $("sql").value;
  if (!sql.trim() || state.running) return;
  const format = $("download-format").value;
  const id = requestId();
  setRunning({id, what: "download"});
  $("query-error").hidden = true;
  $("query-status").textContent = `Downloading ${format}…`;
  try {
    const response = format === "arrow"
      ? await send("api/v1/query/arrow", {sql}, id)
      : await send("api/v1/query", {sql, format}, id);
    if (!response.ok) {
      showError($("query-error"), response.status, await response.json().catch(() => null));
      $("query-status").textContent = "";
      return;
    }
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = el("a", {href: url, download: `duckfleet-result.${DOWNLOADS[format]}`});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    $("query-status").textContent = `Downloaded ${bytes(blob.size)} as ${format} (request ${id}).`;
  } catch (error) {
    showError($("query-error"), "network", {error: String(error)});
  } finally {
    setRunning(null);
  }
}

function setChart(on) {
  state.chart = on;
  writeUrl();
}

function drawChart() {
  if (state.plot) { state.plot.destroy(); state.plot = null; }
  const spec = chartable(state.result);
  $("chart-toggle").disabled = !spec;
  $("chart-toggle").textContent = state.chart && spec ? "Hide chart" : "Chart";
  const box = $("chart");
  box.hidden = !(state.chart && spec);
  if (!box.hidden) state.plot = draw(box, state.result, spec);
}

// --- running queries ---

function progressCell(q) {
  const bar = el("progress", {max: 100});
  if (q.progress !== null) bar.value = q.progress;
  return el("span", {class: "progress"}, bar, q.progress === null ? " –" : ` ${q.progress.toFixed(0)}%`);
}

async function cancelListed(id) {
  const response = await api(`api/v1/queries/${encodeURIComponent(id)}`, {method: "DELETE"});
  if (!response.ok) showError($("running-status"), response.status, await response.json().catch(() => null));
  await refreshRunning();
}

async function refreshRunning() {
  const {response, body} = await getJSON("api/v1/queries");
  if (!response.ok) {
    showError($("running-status"), response.status, body);
    return;
  }
  const queries = body.queries;
  const mine = state.running && queries.find((q) => q.request_id === state.running.id);
  if (mine && mine.progress !== null) $("query-progress").value = mine.progress;
  if (state.view !== "running") return;
  $("running-status").textContent = queries.length
    ? `${count(queries.length, "query", "queries")} · updated ${new Date().toLocaleTimeString()}`
    : "No query is waiting, running or being sent.";
  table($("running-list"), ["", "progress", "state", "elapsed", "rows", "worker", "priority", "token", "SQL", "request id"],
    queries.map((q) => [
      el("button", {type: "button", class: "cancel-query", onclick: () => cancelListed(q.request_id)}, "Cancel"),
      progressCell(q), q.state, `${(q.elapsed_ms / 1000).toFixed(1)} s`, number(q.rows), q.worker ?? "–",
      q.priority, q.token ?? "–", el("code", {class: "sql-head", title: q.sql}, q.sql), q.request_id]));
}

// --- fleet ---

function definitions(node, pairs) {
  node.replaceChildren(...pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

const byKey = (counts) => Object.entries(counts || {}).map(([k, v]) => `${k} ${number(v)}`).join(", ");

async function refreshFleet() {
  const [stats, cache] = await Promise.all([getJSON("api/v1/stats/connections"), getJSON("api/v1/cache/stats")]);
  if (!stats.response.ok) {
    showError($("fleet-status"), stats.response.status, stats.body);
    return;
  }
  const s = stats.body;
  definitions($("fleet-summary"), [
    ["workers", `${number(s.worker_count)} (${number(s.busy)} busy, ${number(s.idle)} idle)`],
    ["queue depth", `${number(s.queued)}` + (s.queued_by_priority ? ` (${byKey(s.queued_by_priority)})` : "")],
    ["served", number(s.served)],
    ["running, cancelled", `${number(s.queries_running)}, ${number(s.queries_cancelled)}`],
    ["recycled", number(s.recycled) + (s.recycled ? ` (${byKey(s.recycled_by_reason)})` : "")],
    ["crashed, timeouts", `${number(s.crashed)}, ${number(s.timeouts)}`],
    ["killed over memory", number(s.killed_over_memory)],
    ["connections", s.connections ? `${number(s.connections.open)} of ${number(s.connections.max)}` : "–"],
  ]);
  table($("fleet-workers"), ["id", "pid", "state", "served", "RSS / memory_limit", "DuckDB memory", "connections"],
    s.workers.map((w) => [w.id, w.pid, w.state, number(w.served),
      el("span", {class: "rss"}, el("meter", {min: 0, max: w.memory_limit || 1, value: w.rss_bytes || 0}),
        ` ${bytes(w.rss_bytes)} / ${bytes(w.memory_limit)}`),
      bytes(w.duckdb_memory_bytes), number(w.connections)]));
  const c = cache.body || {};
  definitions($("fleet-cache"), !c.enabled ? [["cache", "off (query_cache.enabled)"]] : [
    ["hits", number(c.hits)], ["misses", number(c.misses)],
    ["hit ratio", c.hits + c.misses ? `${((100 * c.hits) / (c.hits + c.misses)).toFixed(1)}%` : "–"],
    ["entries", number(c.entries)], ["bytes", bytes(c.bytes)], ["coalesced", number(c.coalesced)],
    ["evicted", number(c.evicted)]]);
  $("fleet-status").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

// --- start ---

function start() {
  for (const tab of $("tabs").children) tab.addEventListener("click", () => show(tab.dataset.view));
  $("login-form").addEventListener("submit", tokenEntered);
  $("login").addEventListener("cancel", (event) => event.preventDefault()); // Escape: the prompt stays
  $("forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
  $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  $("catalog-filter").addEventListener("input", () => state.catalog && renderCatalog());
  $("catalog-reload").addEventListener("click", loadCatalog);
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", cancel);
  $("download").addEventListener("click", download);
  $("chart-toggle").addEventListener("click", () => { setChart(!state.chart); drawChart(); });
  $("sql").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(); }
  });
  every(FLEET_EVERY_MS, "fleet-status", async () => { if (state.view === "fleet") await refreshFleet(); });
  every(RUNNING_EVERY_MS, "running-status", async () => { if (state.view === "running" || state.running) await refreshRunning(); });

  const params = new URLSearchParams(location.search);
  $("sql").value = params.get("sql") || "";
  state.chart = params.get("chart") === "1";
  const view = VIEWS.includes(params.get("view")) ? params.get("view") : (params.get("sql") ? "query" : "catalog");
  const catalog = loadCatalog().catch((error) => { $("catalog-status").textContent = String(error); });
  show(view);
  if (params.get("sql")) catalog.then(run); // after the catalog: one token prompt, not two
}

start();
