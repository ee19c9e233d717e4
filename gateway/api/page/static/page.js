// Corral fleet page: polls the gateway's status document (gateway/api/status_doc.py is its shape)
// about once a second and draws it. Plain DOM, no library. Text from the document (model names come
// from clients) only ever goes in through textContent, never as HTML.
"use strict";

const STATUS_URL = "../api/corral/status";
const POLL_MS = 1000;
const KEY_SLOT = "corral-admin-key"; // sessionStorage: kept for this tab, gone when it closes
const GIB = 1024 ** 3;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (name === "class") el.className = value;
    else if (name === "style") Object.assign(el.style, value); // CSSOM: allowed by the page's CSP
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function gib(bytes) { return (bytes / GIB).toFixed(1); }

function duration(seconds) {
  seconds = Math.max(Math.floor(seconds), 0);
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(seconds / 86400)}d${String(Math.floor(seconds % 86400 / 3600)).padStart(2, "0")}h`;
}

function secs(value) {
  if (value === null || value === undefined) return "-";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function expiry(expiresAt, now) {
  if (!expiresAt) return "-";
  const left = expiresAt - now;
  return left > 10 * 365 * 86400 ? "never" : duration(left);
}

function table(el, headers, rows, emptyText) {
  el.replaceChildren();
  if (!rows.length) {
    el.append(h("tbody", {}, h("tr", {}, h("td", { class: "empty" }, emptyText))));
    return;
  }
  el.append(h("thead", {}, h("tr", {}, headers.map(([label, cls]) => h("th", { class: cls }, label)))));
  el.append(h("tbody", {}, rows));
}

function renderGateway(doc) {
  const g = doc.gateway;
  const store = g.store_ok ? g.store : `${g.store} UNREACHABLE`;
  document.getElementById("gateway").textContent =
    `${g.listen} · corral ${g.version} · policy ${g.policy} · up ${duration(g.uptime_s)} · ` +
    `${g.active_requests} active · store ${store}`;
}

function renderWarnings(doc) {
  const el = document.getElementById("warnings");
  el.replaceChildren(...doc.warnings.map((w) =>
    h("div", { class: `warning ${w.kind}`, "data-warning": w.kind, "data-subject": w.subject }, w.message)));
}

function renderGpus(doc) {
  const cards = [];
  for (const [host, gpus] of Object.entries(doc.gpus)) {
    for (const gpu of gpus) {
      const total = gpu.memory_total_bytes || 1;
      const used = Math.min(gpu.memory_used_bytes / total, 1) * 100;
      const planned = Math.min(gpu.memory_planned_bytes / total, 1) * 100;
      const sensors = [];
      if (gpu.utilization_pct !== null) sensors.push(`util ${gpu.utilization_pct}%`);
      if (gpu.temperature_c !== null) sensors.push(`${gpu.temperature_c} °C`);
      if (gpu.power_w !== null) sensors.push(`${Math.round(gpu.power_w)} W`);
      cards.push(h("div", { class: "card", "data-gpu": gpu.uuid, "data-used-bytes": gpu.memory_used_bytes },
        h("h3", {}, gpu.name, h("span", { class: "muted" }, `#${gpu.index} · ${host}`)),
        h("div", { class: "kv" }, "backend ", h("b", {}, gpu.backend || "-"),
          gpu.simulated ? " · simulated" : ""),
        h("div", { class: "bar", title: "used (dark) and planned (light) of total memory" },
          h("div", { class: "planned", style: { width: `${planned.toFixed(1)}%` } }),
          h("div", { class: "used", style: { width: `${used.toFixed(1)}%` } })),
        h("div", { class: "kv" },
          "used ", h("b", {}, gib(gpu.memory_used_bytes)), ` / ${gib(gpu.memory_total_bytes)} GiB · planned `,
          h("b", {}, gib(gpu.memory_planned_bytes)), " · free ", h("b", {}, gib(gpu.memory_free_bytes)), " GiB"),
        h("div", { class: "kv" }, sensors.length ? sensors.join(" · ") : "no sensor readings")));
    }
  }
  const el = document.getElementById("gpus");
  el.replaceChildren(...(cards.length ? cards : [h("div", { class: "empty" }, "no GPUs reported")]));
}

function renderBackends(doc) {
  const now = doc.gateway.now;
  const cards = doc.backends.map((b) => {
    const rows = b.models.map((m) => h("tr", { "data-model": m.name, "data-resident": m.resident },
      h("td", {}, m.name),
      h("td", {}, m.loading ? "loading" : m.resident ? "resident" : "planned"),
      h("td", { class: "num" }, m.context_length || "-"),
      h("td", { class: "num" }, m.resident ? `${gib(m.size_vram_bytes)} GiB` : "-"),
      h("td", { class: "num" }, expiry(m.expires_at, now)),
      h("td", { class: "num" }, `${m.busy}/${m.slots}`),
      h("td", { class: "num" }, m.queued)));
    const modelTable = h("table", {});
    table(modelTable, [["model"], ["state"], ["ctx", "num"], ["VRAM", "num"], ["expires", "num"],
      ["slots", "num"], ["queue", "num"]], rows, "no model resident or planned");
    const problem = b.status === "ready" ? "" : (b.last_error || b.health_error);
    return h("div", { class: "card", "data-backend": b.id, "data-status": b.status },
      h("h3", {}, b.id, h("span", { class: `pill s-${b.status}` }, b.status),
        h("span", { class: "muted" }, (b.gpu_names.join(" + ") || "CPU") + (b.kind !== "single" ? ` (${b.kind})` : ""))),
      h("div", { class: "kv" }, "up ", h("b", {}, b.uptime_s === null ? "-" : duration(b.uptime_s)),
        " · restarts ", h("b", {}, b.restarts), ` · ${b.url}`, b.ollama_version ? ` · ollama ${b.ollama_version}` : ""),
      problem ? h("div", { class: "kv s-down" }, problem) : null,
      h("div", { class: "scroll" }, modelTable));
  });
  const el = document.getElementById("backends");
  el.replaceChildren(...(cards.length ? cards : [h("div", { class: "empty" }, "no backends registered")]));
}

function renderModels(doc) {
  document.getElementById("window").textContent = `(last ${duration(doc.gateway.stats_window_s)}, this gateway)`;
  const rows = doc.models.map((m) => h("tr", { "data-model": m.model },
    h("td", {}, m.model),
    h("td", { class: "num" }, m.requests_per_s.toFixed(2)),
    h("td", { class: "num" }, secs(m.ttft_p50_s)),
    h("td", { class: "num" }, secs(m.ttft_p95_s)),
    h("td", { class: "num" }, m.tokens_per_s.toFixed(1)),
    h("td", { class: "num" }, m.in_flight),
    h("td", { class: "num" }, m.queued),
    h("td", { class: "num" }, `${m.errors}/${m.requests}`)));
  table(document.getElementById("models"), [["model"], ["req/s", "num"], ["TTFT p50", "num"], ["TTFT p95", "num"],
    ["tokens/s", "num"], ["in flight", "num"], ["queued", "num"], ["errors", "num"]], rows, "no requests yet");
}

function renderDecisions(doc) {
  const rows = doc.decisions.map((d) => h("tr", {},
    h("td", {}, new Date(d.at * 1000).toLocaleTimeString()),
    h("td", {}, d.model),
    h("td", {}, d.decision),
    h("td", {}, d.reason),
    h("td", {}, d.backend || "-"),
    h("td", { class: "num" }, secs(d.expected_ttft_s))));
  table(document.getElementById("decisions"), [["time"], ["model"], ["decision"], ["reason"], ["backend"],
    ["expected", "num"]], rows, "no routing decisions yet");
}

function setLive(live, text) {
  const el = document.getElementById("live");
  el.dataset.live = String(live);
  el.textContent = text;
}

function askForKey(message) {
  const form = document.getElementById("keyform");
  document.getElementById("keymsg").textContent = message;
  form.hidden = false;
  document.getElementById("key").focus();
}

let stopped = false;

async function poll() {
  const key = sessionStorage.getItem(KEY_SLOT);
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  let resp;
  try {
    resp = await fetch(STATUS_URL, { headers, cache: "no-store" });
  } catch (err) {
    setLive(false, "gateway unreachable");
    return;
  }
  if (resp.status === 401 || resp.status === 403) {
    sessionStorage.removeItem(KEY_SLOT);
    stopped = true; // until a key is entered
    setLive(false, "key needed");
    askForKey(resp.status === 403
      ? "That key is not an admin key: the fleet's status needs one."
      : key ? "That key was refused. Enter an admin key." : "This gateway needs an admin key to show the fleet.");
    return;
  }
  if (!resp.ok) {
    setLive(false, `status answered ${resp.status}`);
    return;
  }
  let doc;
  try {
    doc = await resp.json();
  } catch (err) {
    setLive(false, "the gateway sent no status document");
    return;
  }
  renderGateway(doc);
  renderWarnings(doc);
  renderGpus(doc);
  renderBackends(doc);
  renderModels(doc);
  renderDecisions(doc);
  setLive(true, `live · ${new Date(doc.gateway.now * 1000).toLocaleTimeString()}`);
}

async function loop() {
  while (!stopped) {
    const started = performance.now();
    await poll();
    await new Promise((resolve) => setTimeout(resolve, Math.max(POLL_MS - (performance.now() - started), 100)));
  }
}

document.getElementById("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_SLOT, key);
  document.getElementById("keyform").hidden = true;
  document.getElementById("key").value = "";
  if (stopped) {
    stopped = false;
    loop();
  }
});

loop();
