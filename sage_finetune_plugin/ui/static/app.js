// The sage finetune page: plain JavaScript over /api/v1, no build step, nothing fetched from
// elsewhere. Views by the URL's hash: #/ (tasks), #/new (new task), #/task/NAME (a task).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const API = "api/v1";
const COLUMNS = [
  ["NAME", "name"], ["STATUS", "status"], ["MODEL", "model"], ["FORMAT", "format"],
  ["SAMPLES", "samples"], ["STEPS", "steps"], ["LOSS", "train_loss"], ["EVAL", "eval"],
  ["TOK/S", "tokens_per_second"], ["ETA", "eta_seconds"], ["KIND", "kind"],
  ["ADAPTER", "adapter"], ["MERGED", "merged"], ["UPDATED", "updated"], ["TRACKER", "tracker"],
];
const $ = (selector) => document.querySelector(selector);
let current = null;   // the task shown, or null
let events = null;    // its progress stream
let listTimer = null;

// --- talking to the API ---

function withToken(path) {
  return TOKEN ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : path;
}

async function call(method, path, body, raw) {
  const headers = {};
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const options = { method, headers };
  if (raw !== undefined) options.body = raw;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(`${API}${path}`, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function showError(error) {
  const box = $("#error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

async function act(action) {
  showError(null);
  try { return await action(); } catch (error) { showError(error); return null; }
}

// --- formatting, as `sage finetune list` shows the cells ---

function num(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

function statusOf(row) {
  return row.status === "training" && !row.running ? "crashed" : row.status;
}

function cell(key, row) {
  const value = row[key];
  if (key === "status") return statusOf(row);
  if (key === "steps") return row.running && value !== null ? `${value}/${row.max_steps ?? "-"}` : (value ?? "-");
  if (key === "train_loss") return num(value, 4);
  if (key === "tokens_per_second") return num(value, 0);
  if (key === "eta_seconds") return row.running ? duration(value) : "-";
  if (key === "eval" && value) {
    if (value.tuned === null || value.tuned === undefined) return value.base == null ? "-" : `base ${num(value.base, 2)}`;
    return value.base == null ? num(value.tuned, 2) : `${num(value.tuned, 2)} (${value.tuned - value.base >= 0 ? "+" : ""}${num(value.tuned - value.base, 2)})`;
  }
  if (value === true) return "yes";
  if (value === false) return "no";
  if (key === "model" && value) return String(value).split("/").slice(-1)[0];
  if (key === "updated" && value) return String(value).replace("T", " ").slice(0, 19);
  return value ?? "-";
}

// --- the task list ---

async function refreshList() {
  const data = await call("GET", "/tasks");
  $("#root").textContent = data.root;
  const head = $("#tasks thead tr");
  if (!head.children.length) head.innerHTML = COLUMNS.map(([title]) => `<th>${title}</th>`).join("");
  const body = $("#tasks tbody");
  body.replaceChildren(...data.tasks.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.task = row.name;
    for (const [, key] of COLUMNS) {
      const td = document.createElement("td");
      td.textContent = row.status === "broken" && key !== "name" && key !== "status" ? "-" : cell(key, row);
      if (key === "status") td.className = `status-${statusOf(row)}`;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { location.hash = `#/task/${encodeURIComponent(row.name)}`; });
    return tr;
  }));
  $("#no-tasks").hidden = data.tasks.length > 0;
}

// --- a task ---

function kvTable(table, values) {
  table.replaceChildren(...Object.entries(values || {}).map(([key, value]) => {
    const tr = document.createElement("tr");
    const k = document.createElement("td");
    const v = document.createElement("td");
    k.textContent = key;
    v.textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
    tr.append(k, v);
    return tr;
  }));
}

function showProgress(snapshot) {
  const row = snapshot.task;
  $("#step").textContent = row.steps === null || row.steps === undefined ? "-" : `${row.steps}/${row.max_steps ?? "-"}`;
  $("#loss").textContent = num(row.train_loss, 4);
  $("#tps").textContent = num(row.tokens_per_second, 0);
  $("#eta").textContent = row.running ? duration(row.eta_seconds) : "-";
  const job = row.job ? ` · ${row.job.kind} ${row.job.state}` : "";
  const status = $("#task-status");
  status.textContent = `${statusOf(row)}${job} · ${row.model || ""} · ${row.samples ?? "?"} samples · ${row.kind}`;
  status.className = `status-line status-${statusOf(row)}`;
  if (row.job) {
    $("#job-log").textContent = [`${row.job.kind}: ${row.job.state}`, ...(row.job.error ? [`Error: ${row.job.error}`] : []), ...row.job.log].join("\n");
  }
  drawCurve(snapshot.history);
}

// The logged values over the steps, one line each (loss, eval loss, reward, ...): inline SVG.
const SERIES = [["loss", "#0b6bcb"], ["eval_loss", "#d9822b"], ["reward", "#157a3a"], ["rewards/chosen", "#8a3ab9"]];

function drawCurve(history) {
  const svg = $("#curve");
  const width = 640, height = 220, pad = 28;
  const lines = SERIES.map(([key, color]) => [key, color, history.filter((h) => typeof h[key] === "number").map((h) => [h.step, h[key]])])
    .filter(([, , points]) => points.length);
  const all = lines.flatMap(([, , points]) => points);
  if (!all.length) { svg.innerHTML = `<text x="${pad}" y="${height / 2}" fill="#889">no logged steps yet</text>`; $("#legend").textContent = ""; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => pad + (x - x0) / (x1 - x0) * (width - 2 * pad);
  const Y = (y) => height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad);
  const axes = `<line x1="${pad}" y1="${height - pad}" x2="${width - pad}" y2="${height - pad}" stroke="#ccd"/>` +
    `<line x1="${pad}" y1="${pad}" x2="${pad}" y2="${height - pad}" stroke="#ccd"/>` +
    `<text x="2" y="${pad}" font-size="10" fill="#667">${y1.toFixed(3)}</text>` +
    `<text x="2" y="${height - pad}" font-size="10" fill="#667">${y0.toFixed(3)}</text>` +
    `<text x="${pad}" y="${height - 8}" font-size="10" fill="#667">step ${x0}</text>` +
    `<text x="${width - pad - 50}" y="${height - 8}" font-size="10" fill="#667">step ${x1}</text>`;
  svg.innerHTML = axes + lines.map(([key, color, points]) =>
    `<polyline class="series" data-series="${key}" fill="none" stroke="${color}" stroke-width="2" points="${points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ")}"/>`).join("");
  $("#legend").innerHTML = lines.map(([key, color]) => `<span style="color:${color}">■ ${key}</span>`).join(" &nbsp; ");
}

function follow(name) {
  if (events) events.close();
  events = new EventSource(withToken(`${API}/tasks/${encodeURIComponent(name)}/events`));
  events.onmessage = (message) => { if (current === name) showProgress(JSON.parse(message.data)); };
  events.addEventListener("end", () => {
    events.close();
    events = null;
    if (current !== name) return;
    act(async () => {
      await loadDetails(name);
      const job = (await call("GET", `/tasks/${encodeURIComponent(name)}/progress`)).task.job;
      if (job && job.state === "failed") throw new Error(job.error);  // the command's one line
    });
  });
}

async function loadDetails(name) {
  const task = await call("GET", `/tasks/${encodeURIComponent(name)}`);
  if (current !== name) return;
  $("#task-title").textContent = task.name;
  kvTable($("#config"), task.config);
  $("#data-stats").textContent = task.data_summary || "no statistics recorded";
  showProgress(await call("GET", `/tasks/${encodeURIComponent(name)}/progress`));
  call("GET", `/tasks/${encodeURIComponent(name)}/eval`).then(showEval, () => { $("#eval-report").textContent = "No evaluation yet."; });
}

async function openTask(name) {
  current = name;
  $("#memory").textContent = "estimating ...";
  $("#chat-tuned").textContent = $("#chat-base").textContent = "";
  await act(() => loadDetails(name));
  follow(name);
  call("GET", `/tasks/${encodeURIComponent(name)}/plan`).then(
    (plan) => { if (current === name) $("#memory").textContent = [plan.memory, ...plan.memory_lines, ...plan.blockers.map((b) => `would refuse: ${b}`)].join("\n"); },
    (error) => { if (current === name) $("#memory").textContent = error.message; });
}

function showEval(report) {
  const box = $("#eval-report");
  const labels = report.labels || {};
  const head = "<tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>";
  const fmt = (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(4));
  const rows = Object.entries(labels).map(([key, label]) =>
    `<tr><td>${label}</td><td>${fmt(report.base && report.base[key])}</td><td>${fmt(report.tuned && report.tuned[key])}</td><td>${fmt(report.change && report.change[key])}</td></tr>`);
  const table = document.createElement("table");
  table.className = "grid";
  table.id = "eval-table";
  table.innerHTML = head + rows.join("");
  const examples = (report.examples || []).slice(0, 5).map((e) => {
    const div = document.createElement("div");
    div.className = "sample";
    div.textContent = `prompt: ${e.prompt}\nreference: ${e.reference}\nbase: ${e.base ? e.base.answer : "-"}\ntuned: ${e.tuned ? e.tuned.answer : "-"}`;
    return div;
  });
  const note = document.createElement("p");
  note.textContent = `${report.samples} samples, ${report.generated} answers generated (${report.created_at}).`;
  box.className = "";
  box.replaceChildren(note, table, ...examples);
}

async function runAction(kind) {
  const name = current;
  const path = `/tasks/${encodeURIComponent(name)}`;
  const steps = $("#run-max-steps").value;
  const actions = {
    run: () => call("POST", `${path}/runs`, steps ? { max_steps: Number(steps) } : {}),
    resume: () => call("POST", `${path}/runs`, steps ? { resume: true, max_steps: Number(steps) } : { resume: true }),
    cancel: () => call("POST", `${path}/runs/cancel`),
    eval: () => call("POST", `${path}/eval`, {}),
    merge: () => call("POST", `${path}/merge`, {}),
    export: () => call("POST", `${path}/export`, { quant: $("#export-quant").value || "f16" }),
    delete: async () => {
      if (!confirm(`Delete task ${name} with its data, checkpoints and models?`)) return null;
      await call("DELETE", path);
      location.hash = "#/";
      return null;
    },
  };
  const done = await act(actions[kind]);
  if (done && current === name) { follow(name); }
}

// --- chat: the tuned model and its base, the same prompt, streamed ---

async function streamChat(model, prompt, out) {
  const headers = { "Content-Type": "application/json" };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const response = await fetch(`${API}/chat/completions`, {
    method: "POST", headers,
    body: JSON.stringify({ model, stream: true, messages: [{ role: "user", content: prompt }] }),
  });
  if (!response.ok) { out.textContent = (await response.json().catch(() => ({}))).error || response.statusText; return; }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const parts = buffer.split("\n\n");
    buffer = parts.pop();
    for (const part of parts) {
      const data = part.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const delta = JSON.parse(data).choices[0].delta;
      if (delta.content) out.textContent += delta.content;
    }
  }
}

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("#chat-prompt").value.trim();
  if (!prompt || !current) return;
  $("#chat-tuned").textContent = $("#chat-base").textContent = "";
  await act(() => Promise.all([
    streamChat(current, prompt, $("#chat-tuned")),
    streamChat(`${current}:base`, prompt, $("#chat-base")),
  ]));
});

// --- a new task ---

async function dataPath() {
  const file = $("#data-file").files[0];
  if (!file) return $("#data-path").value.trim();
  if ($("#data-file").dataset.uploaded === `${file.name}:${file.size}:${file.lastModified}`) return $("#data-file").dataset.path;
  $("#new-status").textContent = `uploading ${file.name} ...`;
  const stored = await call("POST", `/uploads?filename=${encodeURIComponent(file.name)}`, undefined, file);
  $("#data-file").dataset.uploaded = `${file.name}:${file.size}:${file.lastModified}`;
  $("#data-file").dataset.path = stored.path;
  return stored.path;
}

async function taskSpec() {
  const spec = { data: await dataPath(), task_type: $("#task-type").value, preset: $("#preset").value || "auto" };
  for (const [key, id] of [["name", "#task-name"], ["model", "#model"]]) if ($(id).value.trim()) spec[key] = $(id).value.trim();
  if ($("#max-length").value) spec.max_length = Number($("#max-length").value);
  return spec;
}

function showSamples(samples) {
  const box = $("#preview");
  box.replaceChildren(...samples.map((pieces, i) => {
    const div = document.createElement("div");
    div.className = "sample";
    const title = document.createElement("b");
    title.textContent = `sample ${i + 1} (green: trained on; grey: prompt)\n`;
    div.appendChild(title);
    for (const [text, trained] of pieces) {
      const span = document.createElement("span");
      span.className = trained ? "trained" : "prompt";
      span.textContent = text;
      div.appendChild(span);
    }
    return div;
  }));
}

$("#preview-btn").addEventListener("click", () => act(async () => {
  $("#new-status").textContent = "rendering ...";
  const preview = await call("POST", "/tasks/preview", await taskSpec());
  $("#new-status").textContent = `${preview.records} records for ${preview.model} (${preview.method}), max_length ${preview.max_length}. ${preview.warnings.join(" ")}`;
  showSamples(preview.preview);
}).finally(() => { if ($("#new-status").textContent === "rendering ...") $("#new-status").textContent = ""; }));

$("#new-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act(async () => {
    $("#new-status").textContent = "creating ...";
    const task = await call("POST", "/tasks", await taskSpec());
    $("#new-status").textContent = "";
    showSamples(task.preview);
    location.hash = `#/task/${encodeURIComponent(task.name)}`;
  }).finally(() => { if ($("#new-status").textContent === "creating ...") $("#new-status").textContent = ""; });
});

// --- views ---

for (const kind of ["run", "resume", "cancel", "eval", "merge", "export", "delete"]) {
  $(`#${kind}-btn`).addEventListener("click", () => runAction(kind));
}

function route() {
  const hash = location.hash || "#/";
  const task = hash.match(/^#\/task\/(.+)$/);
  $("#view-list").hidden = hash !== "#/";
  $("#view-new").hidden = hash !== "#/new";
  $("#view-task").hidden = !task;
  showError(null);
  clearInterval(listTimer);
  if (events && !task) { events.close(); events = null; }
  current = task ? decodeURIComponent(task[1]) : null;
  if (task) openTask(current);
  if (hash === "#/") {
    act(refreshList);
    listTimer = setInterval(() => refreshList().catch(showError), 2000);
  }
}

window.addEventListener("hashchange", route);
route();
