// dreamfleet dashboard: one page, hash routes, polling JSON endpoints. Plain JS, no dependencies.
"use strict";

const CONFIG = JSON.parse(document.body.dataset.config || "{}");
const POLL_MS = CONFIG.poll_ms || 2000;
const STATES = ["training", "queued", "failed", "done", "skipped"];
const $ = (sel, root = document) => root.querySelector(sel);
const view = $("#view");
let meta = { can_act: false, keys: false };

// ------------------------------------------------------------------ small helpers

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmtNum(v, digits = 4) { return v == null || Number.isNaN(v) ? "–" : Number(v).toFixed(digits); }
function fmtDur(s) {
  if (s == null) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
}
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return esc(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour12: false })
    : d.toLocaleString([], { hour12: false, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });
}
function shortPath(p) { if (!p) return "–"; const parts = String(p).replace(/\/+$/, "").split("/"); return parts.slice(-2).join("/"); }
function codeVersion(c) {
  if (!c || !Object.keys(c).length) return "–";
  const commit = c.git_commit ? c.git_commit.slice(0, 10) + (c.git_dirty ? " (dirty)" : "") : "";
  return [c.package && `dreamfleet ${c.package}`, commit].filter(Boolean).join(" · ") || JSON.stringify(c);
}
function badge(state) { return `<span class="badge ${esc(state)}">${esc(state)}</span>`; }
function key() { return sessionStorage.getItem("dreamfleet-key") || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (key()) headers.Authorization = `Bearer ${key()}`;
  const r = await fetch(path, Object.assign({}, opts, { headers, cache: "no-store" }));
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) { const err = new Error(body && body.error || `${r.status}`); err.status = r.status; throw err; }
  return body;
}

function toast(msg, isErr = false) {
  const t = document.createElement("div");
  t.className = "toast" + (isErr ? " err" : "");
  t.textContent = msg;
  document.body.appendChild(t);
  setTimeout(() => t.remove(), 6000);
}

async function act(method, path, confirmText) {
  if (confirmText && !confirm(confirmText)) return;
  try { const r = await api(path, { method }); toast(r.message || "done"); }
  catch (e) { toast(e.message, true); }
  tick(true);
}

// ------------------------------------------------------------------ charts (inline SVG)

function sparkline(values, w = 120, h = 24) {
  if (!values || values.length < 2) return `<span class="muted">–</span>`;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const pts = values.map((v, i) => `${(i * (w - 2) / (values.length - 1) + 1).toFixed(1)},${(h - 2 - (v - lo) * (h - 4) / span).toFixed(1)}`);
  return `<svg class="spark" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" data-points="${values.length}"><polyline points="${pts.join(" ")}"/></svg>`;
}

function niceTicks(lo, hi, n = 5) {
  const span = hi - lo || Math.abs(hi) || 1, raw = span / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// TensorBoard's smoothing: an exponential moving average, debiased so that the start is not pulled to 0.
function ema(values, weight) {
  let last = 0;
  return values.map((v, i) => { last = last * weight + (1 - weight) * v; return last / (1 - weight ** (i + 1)); });
}
// TensorBoard's default weight (0.6), heavier on long curves: about the last tenth of the points.
function smoothingFor(n) { return +Math.min(0.95, Math.max(0.6, 1 - 10 / n)).toFixed(2); }

// opt.smooth: draw each series smoothed (ema), the raw per-step values faint behind it.
function lossChart(points, series, w = 640, h = 280, opt = {}) {
  const used = series.filter(s => points.some(p => p[s] != null));
  if (!points.length || !used.length) return `<p class="muted">No losses to plot yet.</p>`;
  const m = { l: 52, r: 12, t: 10, b: 30 };
  const xs = points.map(p => p.step), vals = [];
  used.forEach(s => points.forEach(p => { if (p[s] != null) vals.push(p[s]); }));
  if (opt.hline != null) vals.push(opt.hline.y);
  let x0 = Math.min(...xs), x1 = Math.max(...xs); if (x0 === x1) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...vals), y1 = Math.max(...vals); const pad = (y1 - y0) * 0.05 || Math.abs(y1) * 0.1 || 1; y0 -= pad; y1 += pad;
  const X = x => m.l + (x - x0) * (w - m.l - m.r) / (x1 - x0), Y = y => h - m.b - (y - y0) * (h - m.t - m.b) / (y1 - y0);
  let svg = `<svg class="chart ${opt.cls || "loss-curve"}" viewBox="0 0 ${w} ${h}" role="img" aria-label="${opt.aria || "loss curve"}">`;
  svg += `<g class="grid">`;
  niceTicks(y0, y1).forEach(t => { svg += `<line x1="${m.l}" x2="${w - m.r}" y1="${Y(t)}" y2="${Y(t)}"/><text x="${m.l - 6}" y="${Y(t) + 4}" text-anchor="end">${+t.toPrecision(3)}</text>`; });
  niceTicks(x0, x1, 6).filter(t => Number.isInteger(t)).forEach(t => { svg += `<text x="${X(t)}" y="${h - m.b + 16}" text-anchor="middle">${t}</text>`; });
  svg += `</g><text x="${(w + m.l) / 2}" y="${h - 2}" text-anchor="middle">step</text>`;
  const dots = points.length <= 150, weight = opt.smooth ? smoothingFor(points.length) : 0;
  used.forEach(s => {
    const pts = points.filter(p => p[s] != null), raw = pts.map(p => p[s]), ys = weight ? ema(raw, weight) : raw;
    const line = vs => vs.map((v, i) => `${X(pts[i].step).toFixed(1)},${Y(v).toFixed(1)}`).join(" ");
    if (weight) svg += `<polyline class="s-${s} raw" data-raw="${s}" data-points="${pts.length}" points="${line(raw)}"/>`;
    svg += `<polyline class="s-${s}" data-series="${s}" data-points="${pts.length}"${weight ? ` data-smoothing="${weight}"` : ""} points="${line(ys)}"/>`;
    if (dots) pts.forEach((p, i) => { svg += `<circle class="p-${s}${weight ? " raw" : ""}" cx="${X(p.step).toFixed(1)}" cy="${Y(raw[i]).toFixed(1)}" r="2"><title>${s} step ${p.step}: ${fmtNum(raw[i])}${weight ? ` (smoothed ${fmtNum(ys[i])})` : ""}</title></circle>`; });
  });
  if (opt.hline != null) svg += `<line class="bar-line" x1="${m.l}" x2="${w - m.r}" y1="${Y(opt.hline.y).toFixed(1)}" y2="${Y(opt.hline.y).toFixed(1)}"><title>${esc(opt.hline.label)}</title></line>`;
  if (opt.mark != null) svg += `<line class="chosen-step" data-step="${opt.mark}" x1="${X(opt.mark).toFixed(1)}" x2="${X(opt.mark).toFixed(1)}" y1="${m.t}" y2="${h - m.b}"><title>chosen step ${opt.mark}</title></line>
    <text class="chosen-label" x="${(X(opt.mark) + (X(opt.mark) > w / 2 ? -4 : 4)).toFixed(1)}" y="${m.t + 12}" text-anchor="${X(opt.mark) > w / 2 ? "end" : "start"}">chosen: step ${opt.mark}</text>`;
  svg += `</svg>`;
  const names = { loss: "total loss", loss_instance: "instance loss", loss_prior: "prior loss", ...(opt.names || {}) };
  const how = weight ? `<span class="smoothing">faint: each step; solid: smoothed (moving average, weight ${weight})</span>` : "";
  return svg + `<div class="legend">${used.map(s => `<span><b class="k-${s}"></b>${names[s] || s}</span>`).join("")}${how}</div>`;
}

// The scores of best-step selection over the evaluated steps, the prompt-fidelity bar and the chosen step.
function selectionChart(sel) {
  const base = sel.base || {}, points = [{ step: base.step || 0, subject: base.subject, prompt: base.prompt }, ...(sel.scores || [])];
  const bar = base.prompt != null ? { y: base.prompt * sel.prompt_bar, label: `prompt-fidelity bar: ${sel.prompt_bar} of the base model's` } : null;
  const chart = lossChart(points, ["subject", "prompt"], 640, 280, { cls: "selection-curve", aria: "best-step scores", mark: sel.chosen_step, hline: bar,
    names: { subject: "subject similarity", prompt: "prompt fidelity" } });
  const chosen = (sel.scores || []).find(x => x.step === sel.chosen_step);
  const facts = [["Chosen step", sel.chosen_step ?? "–"], ["Subject similarity", chosen ? fmtNum(chosen.subject) : "–"],
    ["Prompt fidelity ÷ base", chosen ? fmtNum(chosen.prompt_ratio) : "–"], ["Trained to", `${sel.final_step}${sel.stopped_early ? " (early stop)" : ""}`],
    ["Scorer", sel.scorer], ["Evaluation time", fmtDur(sel.eval_seconds)]].map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`).join("");
  return `<div class="grid2"><div class="panel"><h2>Best step: scores while training</h2>${chart}</div>
    <div class="panel"><h2>Best step</h2><dl class="kv">${facts}</dl><p class="note">${esc(sel.rule)}${sel.fallback ? " — no step reached the bar: fallback" : ""}</p></div></div>`;
}

function progressBar(counts, total) {
  const n = total || STATES.reduce((a, s) => a + (counts[s] || 0), 0) || 1;
  const order = ["done", "skipped", "failed", "training", "queued"];
  return `<div class="bar" title="${order.map(s => `${counts[s] || 0} ${s}`).join(", ")}">${order.map(s => counts[s] ? `<span class="${s}" style="width:${(100 * counts[s] / n).toFixed(2)}%"></span>` : "").join("")}</div>`;
}
function legend(counts) {  // counts: null for a colour key only
  return `<div class="legend">${["done", "training", "queued", "failed", "skipped"].map(s =>
    `<span><b style="background:var(--${s})"></b>${counts ? `${counts[s] || 0} ` : ""}${s}</span>`).join("")}</div>`;
}

// ------------------------------------------------------------------ subjects table (run page and subjects page)

const tableState = { filter: "all", search: "" };

function subjectTable(rows, { showRun = false } = {}) {
  const f = tableState.filter, q = tableState.search.toLowerCase();
  const shown = rows.filter(r => (f === "all" || r.state === f) && (!q || r.subject.toLowerCase().includes(q) || (r.class_noun || "").toLowerCase().includes(q)));
  const order = { training: 0, failed: 1, queued: 2, done: 3, skipped: 4 };
  shown.sort((a, b) => (order[a.state] - order[b.state]) || a.subject.localeCompare(b.subject));
  const tenants = rows.some(r => r.tenant);  // the column only where there are tenants
  const head = `<tr><th>Subject</th><th>State</th>${showRun ? "<th>Run</th>" : ""}<th>Class</th>${tenants ? "<th>Tenant</th>" : ""}<th class="num">Step</th>
    <th class="num" title="the loss of the last step reported: one batch, noisy (an expert's final loss is a mean over its last steps)">Last loss</th><th>Last losses</th><th class="num">Attempts</th><th>Node</th><th>Updated</th><th>Error</th><th></th></tr>`;
  const body = shown.map(r => {
    const pct = r.total_steps ? Math.min(100, 100 * r.step / r.total_steps) : 0;
    const retry = r.state === "failed" ? `<button class="small" data-retry="${esc(r.subject)}" ${meta.can_act ? "" : "disabled title='needs an admin key or a loopback client'"}>Retry</button>` : "";
    return `<tr data-subject="${esc(r.subject)}" data-state="${esc(r.state)}">
      <td><a href="#/subject/${encodeURIComponent(r.subject)}">${esc(r.subject)}</a></td>
      <td>${badge(r.state)}</td>${showRun ? `<td class="mono">${r.run_id ? `<a href="#/run/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a>` : "–"}</td>` : ""}
      <td>${esc(r.class_noun || "–")}</td>${tenants ? `<td>${esc(r.tenant || "–")}</td>` : ""}
      <td class="num">${r.step ?? 0}/${r.total_steps ?? "?"}<span class="stepbar"><i style="width:${pct.toFixed(1)}%"></i></span></td>
      <td class="num">${fmtNum(r.loss)}</td><td>${sparkline(r.recent_losses, 100)}</td>
      <td class="num">${r.attempts ?? 0}</td><td class="mono">${esc(r.node || "–")}</td><td>${fmtTime(r.updated_at)}</td>
      <td class="err">${r.error ? `<div class="clip" title="${esc(r.error)}">${esc(r.error)}</div>` : (r.note ? `<span class="muted">${esc(r.note)}</span>` : "")}</td>
      <td>${retry}</td></tr>`;
  }).join("");
  const empty = shown.length ? "" : `<tr><td colspan="13" class="muted">No subjects${f !== "all" ? ` in state ${esc(f)}` : ""}${q ? ` matching “${esc(q)}”` : ""}.</td></tr>`;
  return `<div class="table-wrap"><table id="subjects-table"><thead>${head}</thead><tbody>${body}${empty}</tbody></table></div>
    <p class="note">Retry puts a failed subject back to <i>queued</i> with 0 attempts: the next <code>dreamfleet train</code> of its manifest trains it; the dashboard itself starts no training.</p>`;
}

function filterBar(rows) {
  const counts = {}; rows.forEach(r => { counts[r.state] = (counts[r.state] || 0) + 1; });
  const btn = s => `<button class="small ${tableState.filter === s ? "on" : ""}" data-filter="${s}">${s} (${s === "all" ? rows.length : counts[s] || 0})</button>`;
  return `<div class="filters">${["all", ...STATES].map(btn).join("")}<input type="search" id="search" placeholder="filter by subject or class" value="${esc(tableState.search)}"></div>`;
}

function bindTable(root, rerender) {
  root.querySelectorAll("[data-filter]").forEach(b => b.onclick = () => { tableState.filter = b.dataset.filter; rerender(); });
  const s = $("#search", root);
  if (s) s.oninput = () => { tableState.search = s.value; rerender(true); };
  root.querySelectorAll("[data-retry]").forEach(b => b.onclick = () =>
    act("POST", `api/subjects/${encodeURIComponent(b.dataset.retry)}/retry`, `Queue ${b.dataset.retry} again? The next \`dreamfleet train\` of its manifest will train it.`));
}

// Re-render a table area but keep the search box (and its focus) untouched while typing.
function renderTableArea(el, rows, opts) {
  const typing = document.activeElement && document.activeElement.id === "search";
  if (!typing || !$("#table-area", el)) {
    el.innerHTML = `${filterBar(rows)}<div id="table-area">${subjectTable(rows, opts)}</div>`;
    bindTable(el, () => renderTableArea(el, rows, opts));
  } else {
    $("#table-area", el).innerHTML = subjectTable(rows, opts);
    el.querySelectorAll("[data-filter]").forEach(b => b.classList.toggle("on", b.dataset.filter === tableState.filter));
    bindTable($("#table-area", el), () => renderTableArea(el, rows, opts));
  }
}

// ------------------------------------------------------------------ views

const views = {
  runs: {
    url: () => "api/runs",
    render(d) {
      const c = d.counts;
      const cards = [["Subjects", d.subjects], ["Training", c.training], ["Queued", c.queued], ["Failed", c.failed], ["Done", c.done], ["Runs", d.runs.length]]
        .map(([l, v]) => `<div class="card"><div class="label">${l}</div><div class="value">${v ?? 0}</div></div>`).join("");
      const rows = d.runs.map(r => {
        const finished = (r.counts.done || 0) + (r.counts.failed || 0) + (r.counts.skipped || 0);
        const job = r.job ? `<a href="${esc(r.job.url)}" target="_blank" rel="noopener">${esc(r.job.status || "job")} &#8599;</a>` : `<span class="muted">local</span>`;
        const cancel = r.state === "running" && r.job_id
          ? `<button class="small danger" data-cancel="${esc(r.run_id)}" ${meta.can_act ? "" : "disabled title='needs an admin key or a loopback client'"}>Cancel</button>` : "";
        return `<tr data-run="${esc(r.run_id)}"><td class="mono"><a href="#/run/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
          <td>${badge(r.state)}</td><td class="mono" title="${esc(r.manifest)}">${esc(shortPath(r.manifest))}</td>
          <td class="mono" title="${esc(r.base_model)}">${esc(shortPath(r.base_model))}${r.base_family ? ` <span class="family">${esc(r.base_family)}</span>` : ""}</td><td>${fmtTime(r.started_at)}</td>
          <td>${progressBar(r.counts, r.total)}</td><td class="num">${finished}/${r.total}</td>
          <td class="num">${(100 * r.fraction).toFixed(0)}%</td><td class="num">${fmtDur(r.elapsed_s)}</td>
          <td class="num">${r.state === "running" ? fmtDur(r.eta_s) : "–"}</td><td>${job}</td><td>${cancel}</td></tr>`;
      }).join("");
      const table = d.runs.length ? `<div class="table-wrap"><table id="runs-table"><thead><tr><th>Run</th><th>State</th><th>Manifest</th><th>Base model</th>
        <th>Started</th><th>Progress</th><th class="num">Subjects</th><th class="num">Done</th><th class="num">Elapsed</th><th class="num">ETA</th><th>Ray job</th><th></th></tr></thead>
        <tbody>${rows}</tbody></table></div>${legend(null)}`
        : `<div class="panel">No runs in this registry yet. Start one with <code>dreamfleet train MANIFEST --out ${esc(CONFIG.registry || "REGISTRY")}</code>; it appears here as soon as it writes its run record.</div>`;
      view.innerHTML = `<h1>Runs</h1><div class="cards">${cards}</div>${table}`;
      view.querySelectorAll("[data-cancel]").forEach(b => b.onclick = () =>
        act("POST", `api/runs/${encodeURIComponent(b.dataset.cancel)}/cancel`, `Cancel run ${b.dataset.cancel}? Ray stops its job; unfinished subjects are marked failed.`));
    },
  },

  run: {
    url: id => `api/runs/${encodeURIComponent(id)}`,
    render(d) {
      const r = d.run;
      const job = r.job ? `<a href="${esc(r.job.url)}" target="_blank" rel="noopener">${esc(r.job.id)} (${esc(r.job.status || "status unknown")}) &#8599;</a>` : "none (started from a terminal)";
      if (!$("#run-head") || view.dataset.key !== r.run_id) {
        view.dataset.key = r.run_id;
        view.innerHTML = `<div class="crumbs"><a href="#/runs">Runs</a> / ${esc(r.run_id)}</div><div id="run-head"></div><div id="run-table"></div>
          <details class="panel" style="margin-top:16px"><summary>Config of this run</summary><pre class="config" id="run-config"></pre></details>`;
      }
      $("#run-head").innerHTML = `<h1><span class="mono-title">${esc(r.run_id)}</span> ${badge(r.state)}</h1>
        <div class="panel"><dl class="kv"><dt>Manifest</dt><dd class="mono">${esc(r.manifest)}</dd><dt>Base model</dt><dd class="mono">${esc(r.base_model)}</dd><dt>Family</dt><dd>${esc(r.base_family || "–")}</dd>
        <dt>Started</dt><dd>${fmtTime(r.started_at)}${r.finished_at ? ` · finished ${fmtTime(r.finished_at)}` : ""}</dd>
        <dt>Elapsed / ETA</dt><dd>${fmtDur(r.elapsed_s)} / ${r.state === "running" ? fmtDur(r.eta_s) : "–"}</dd><dt>Ray job</dt><dd>${job}</dd>
        <dt>Progress</dt><dd>${progressBar(r.counts, r.total)}${legend(r.counts)}</dd></dl></div>`;
      renderTableArea($("#run-table"), d.subjects, {});
      $("#run-config").textContent = JSON.stringify(d.config, null, 2);
    },
  },

  subjects: {
    url: () => "api/subjects",
    render(d) {
      if (!$("#all-table")) view.innerHTML = `<h1>Subjects</h1><p class="muted">Every subject of the registry, whichever run trained it.</p><div id="all-table"></div>`;
      renderTableArea($("#all-table"), d.subjects, { showRun: true });
    },
  },

  subject: {
    url: (sid, v) => `api/subjects/${encodeURIComponent(sid)}` + (v ? `?version=${encodeURIComponent(v)}` : ""),
    render(d) {
      const st = d.state, e = d.expert;
      const base = d.version ? `api/subjects/${encodeURIComponent(d.subject)}/versions/${encodeURIComponent(d.version)}/files` : "";
      const versions = d.versions.length ? `<select id="version">${d.versions.slice().reverse().map(v => `<option ${v === d.version ? "selected" : ""}>${esc(v)}</option>`).join("")}</select>
        <button class="small danger" id="delete-version" ${meta.can_act ? "" : "disabled title='needs an admin key or a loopback client'"}>Delete ${esc(d.version)}</button>` : "";
      const facts = e ? [["Class", e.class_noun], ["Identifier", e.identifier], ["Prompt", e.instance_prompt], ["Method", e.method],
        ["Base model", e.base_model && e.base_model.spec], ["Family", e.base_model && e.base_model.family], [`Final loss (mean of the last ${e.final_loss_steps} steps)`, fmtNum(e.final_loss)], ["Training time", fmtDur(e.wall_time_s)],
        ["Photos", e.num_images], ["Tenant", e.tenant || "–"], ["Created", fmtTime(e.created_at)], ["Latest", d.latest || "–"],
        ["Code", codeVersion(e.code_version)]]
        .map(([k, v]) => `<dt>${k}</dt><dd>${esc(v ?? "–")}</dd>`).join("") : "";
      const stateFacts = st ? `<dt>State</dt><dd>${badge(st.state)} step ${st.step}/${st.total_steps ?? "?"} · attempts ${st.attempts}</dd>
        ${st.loss != null ? `<dt>Last step loss</dt><dd id="last-step-loss">${fmtNum(st.loss)} (step ${st.step}, one batch)</dd>` : ""}
        ${st.run_id ? `<dt>Run</dt><dd class="mono"><a href="#/run/${encodeURIComponent(st.run_id)}">${esc(st.run_id)}</a></dd>` : ""}` : "";
      const err = st && st.error ? `<div class="panel error"><h2>Error (attempt ${st.attempts})</h2><div class="mono">${esc(st.error)}</div>
        ${st.state === "failed" ? `<p><button class="small" data-retry="${esc(d.subject)}" ${meta.can_act ? "" : "disabled"}>Retry</button>
        <span class="note">back to queued with 0 attempts; the next <code>dreamfleet train</code> of its manifest trains it.</span></p>` : ""}</div>` : "";
      const inst = (d.images.instance || []).map(n => `<img src="${base}/instance/${encodeURIComponent(n)}" alt="training photo ${esc(n)}" title="${esc(n)}">`).join("");
      const grids = (d.images.validation || []).map(n => `<figure><img src="${base}/validation/${encodeURIComponent(n)}" alt="validation ${esc(n)}"><figcaption>${esc(n)}</figcaption></figure>`).join("");
      const images = d.version ? `<div class="grid2"><div class="panel"><h2>Training photos</h2><div class="thumbs" id="instance-images">${inst || `<span class="muted">none stored</span>`}</div></div>
        <div class="panel"><h2>Latest validation</h2><div class="grids" id="validation-images">${grids || `<span class="muted">no validation grids in this version</span>`}</div>
        ${d.images.validation_all > 2 ? `<p class="note">${d.images.validation_all} grids in all; the last two are shown.</p>` : ""}</div></div>` : "";
      const evaluation = d.evaluation ? `<dl class="kv">${Object.entries(d.evaluation).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(typeof v === "number" ? fmtNum(v) : JSON.stringify(v))}</dd>`).join("")}</dl>`
        : `<p class="muted">No evaluation stored with this expert (<code>dreamfleet demo</code> stores its metrics here;
          <code>dreamfleet eval</code> writes its table to its <code>--out</code>).</p>`;
      const selection = e && e.selection ? `<div id="selection">${selectionChart(e.selection)}</div>` : "";
      view.innerHTML = `<div class="crumbs"><a href="#/subjects">Subjects</a> / ${esc(d.subject)}</div>
        <div class="row"><h1>${esc(d.subject)} ${st ? badge(st.state) : ""}</h1><span class="spacer"></span>${versions}</div>
        ${d.message ? `<div class="panel error" id="subject-message">${esc(d.message)}</div>` : ""}${err}
        <div class="grid2"><div class="panel"><h2>Loss curve</h2>${lossChart(d.curve.points, ["loss", "loss_instance", "loss_prior"], 640, 280, { smooth: true })}<p class="note">${esc(d.curve.source)}</p></div>
        <div class="panel"><h2>Expert ${esc(d.version || "")}</h2><dl class="kv">${stateFacts}${facts}</dl></div></div>
        ${selection}${images}
        <div class="grid2"><div class="panel"><h2>Evaluation</h2>${evaluation}</div>
        <div class="panel"><h2>Config used</h2>${d.config ? `<pre class="config">${esc(JSON.stringify(d.config, null, 2))}</pre>` : `<p class="muted">no expert yet</p>`}</div></div>`;
      const sel = $("#version");
      if (sel) sel.onchange = () => { location.hash = `#/subject/${encodeURIComponent(d.subject)}/${encodeURIComponent(sel.value)}`; };
      const del = $("#delete-version");
      if (del) del.onclick = () => act("DELETE", `api/subjects/${encodeURIComponent(d.subject)}/versions/${encodeURIComponent(d.version)}`,
        `Delete expert ${d.subject} ${d.version}? This cannot be undone.`).then(() => { location.hash = `#/subject/${encodeURIComponent(d.subject)}`; });
      view.querySelectorAll("[data-retry]").forEach(b => b.onclick = () => act("POST", `api/subjects/${encodeURIComponent(b.dataset.retry)}/retry`, `Queue ${b.dataset.retry} again?`));
    },
  },

  serving: {
    url: () => "api/serving",
    history: [],
    render(d) {
      if (!d.available) { view.innerHTML = `<h1>Serving</h1><div class="panel" id="serving-message">${esc(d.message)}</div>`; return; }
      const h = this.history; h.push(d.requests_ok || 0); if (h.length > 120) h.shift();
      const pct = v => v == null ? "–" : `${(100 * v).toFixed(1)}%`, ms = v => v == null ? "–" : `${v} ms`;
      const cards = [["Requests", d.requests_ok, "requests-ok"], ["Errors (5xx)", d.requests_error, "requests-error"], ["Rejected (4xx)", d.requests_rejected ?? "–", "requests-rejected"], ["Rate / min", d.rate_per_min ?? "–", "rate"],
        ["p50 latency", ms(d.p50_ms), "p50"], ["p99 latency", ms(d.p99_ms), "p99"], ["Cache hit rate", pct(d.cache_hit_rate), "hit-rate"]]
        .map(([l, v, id]) => `<div class="card"><div class="label">${l}</div><div class="value" id="${id}">${esc(typeof v === "number" ? Math.round(v) : v)}</div></div>`).join("");
      const reps = Object.entries(d.replicas || {}).map(([id, r]) => {
        const s = r.stats || {};
        const loaded = r.loaded ? r.loaded.map(x => `<span>${esc(Array.isArray(x) ? x.join(" ") : x)}</span>`).join("") : `${r.loaded_count ?? 0} loaded`;
        return `<tr><td class="mono">${esc(id)}</td><td class="chips">${loaded || `<span class="muted">none</span>`}</td><td class="num">${s.loads_disk ?? "–"}</td>
          <td class="num">${s.loads_host ?? "–"}</td><td class="num">${s.evictions ?? "–"}</td><td class="num">${s.generations ?? "–"}</td>
          <td class="num">${s.images ?? "–"}</td><td class="num">${s.last_swap_ms != null ? `${fmtNum(s.last_swap_ms, 1)} ms` : "–"}</td></tr>`;
      }).join("");
      const c = d.cache || {};
      view.innerHTML = `<div class="row"><h1>Serving</h1><span class="spacer"></span>${d.url ? `<a href="${esc(d.url)}/metrics" target="_blank" rel="noopener">Prometheus /metrics &#8599;</a>` : ""}</div>
        <div class="cards">${cards}</div>
        <div class="grid2"><div class="panel"><h2>Requests served (this page's samples)</h2>${sparkline(h, 560, 60).replace("<svg ", "<svg style='width:100%;height:60px' preserveAspectRatio='none' ")}</div>
        <div class="panel"><h2>Where experts were found</h2><dl class="kv"><dt>on the replica (hit)</dt><dd>${c.hit ?? 0}</dd>
        <dt>host-memory cache</dt><dd>${c.host ?? 0}</dd><dt>disk</dt><dd>${c.disk ?? 0}</dd></dl></div></div>
        <h2>Replicas</h2><div class="table-wrap"><table id="replicas-table"><thead><tr><th>Replica</th><th>Loaded experts</th><th class="num">Loads (disk)</th>
        <th class="num">Loads (host)</th><th class="num">Evictions</th><th class="num">Generations</th><th class="num">Images</th><th class="num">Last swap</th></tr></thead>
        <tbody>${reps || `<tr><td colspan="8" class="muted">No replica has served a request yet.</td></tr>`}</tbody></table></div>
        <p class="note">Source: ${esc(d.source || "")}${d.note ? ` — ${esc(d.note)}` : ""}. A replica appears after its first generation.</p>`;
    },
  },

  apprentice: {
    url: () => "api/apprentice",
    render(d) {
      if (!d.available) { view.innerHTML = `<h1>Apprentice</h1><div class="panel">${esc(d.message)}</div>`; return; }
      const num = (v, k = 3) => (v === null || v === undefined) ? "" : (typeof v === "number" ? v.toFixed(k) : esc(v));
      const sets = d.demo_sets.map((g) => g.error
        ? `<tr><td>${esc(g.path)}</td><td colspan="5" class="error">${esc(g.error)}</td></tr>`
        : `<tr><td>${esc(g.path)}</td><td class="num">${g.experts ?? ""}</td><td class="num">${g.generated ?? ""}</td>
           <td class="num">${g.kept ?? ""}</td><td class="num">${num(g.threshold, 2)}</td>
           <td>${Object.entries(g.kept_at_threshold).map(([t, n]) => `${esc(t)}: ${n}`).join(", ")}</td></tr>`).join("");
      const apps = d.apprentices.map((a) => a.error
        ? `<div class="panel error"><h2>${esc(a.path)}</h2>${esc(a.error)}</div>`
        : `<div class="grid2"><div class="panel"><h2>${esc(a.path)}</h2><dl class="kv">
           <dt>identifier</dt><dd>${esc(a.identifier)}</dd><dt>base model</dt><dd>${esc(a.base_model)}</dd>
           <dt>trained on</dt><dd>${esc(a.dataset.subjects ?? "")} subjects, ${esc(a.dataset.targets ?? "")} targets (${esc(a.dataset.uri ?? "")})</dd>
           <dt>steps</dt><dd>${a.steps ?? ""}</dd><dt>final loss</dt><dd>${num(a.final_loss, 4)}</dd>
           <dt>wall time</dt><dd>${num(a.wall_time_s, 0)} s</dd><dt>recipe</dt><dd>${esc(JSON.stringify(a.recipe))}</dd>
           <dt>created</dt><dd>${esc(a.created_at)}</dd></dl></div>
           <div class="panel"><h2>Training curve</h2>${lossChart(a.curve.points, ["loss"], 640, 280, { smooth: true })}</div></div>`).join("");
      view.innerHTML = `<h1>Apprentice</h1>
        <h2>Demonstration sets (gather and filter)</h2><div class="table-wrap"><table id="demo-sets-table"><thead><tr><th>Set</th>
        <th class="num">Experts</th><th class="num">Renders</th><th class="num">Kept</th><th class="num">Threshold</th><th>Kept at other thresholds</th></tr></thead>
        <tbody>${sets || `<tr><td colspan="6" class="muted">No demonstration set given: ${esc(d.hints.demo_sets)}.</td></tr>`}</tbody></table></div>
        <h2>Apprentices</h2>${apps || `<div class="panel muted">No apprentice given: ${esc(d.hints.apprentices)}.</div>`}`;
    },
  },
};

// ------------------------------------------------------------------ routing and polling

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = views[parts[0]] ? parts[0] : "runs";
  return { name, args: parts.slice(1) };
}

let current = null, lastBody = null, inflight = false;

async function tick(force = false) {
  if (inflight && !force) return;
  const r = route(), v = views[r.name];
  const key = r.name + "/" + r.args.join("/");
  inflight = true;
  try {
    const d = await api(v.url(...r.args));
    const body = JSON.stringify(d);
    if (key !== current) { current = key; lastBody = null; view.dataset.key = ""; }
    if (body !== lastBody || force || r.name === "serving") {
      lastBody = body;
      v.render(d);
    }
    setLive(true);
    hideBanner();
  } catch (e) {
    // Offline only when the server cannot be reached: a 404 for one resource is an answer.
    // (502/504: a proxy in front of the dashboard that cannot reach it.)
    const reached = e.status != null && e.status !== 502 && e.status !== 504;
    setLive(reached);
    if (key !== current || e.status === 404 || e.status === 503 || e.status === 401) {
      current = key; lastBody = null;
      view.innerHTML = `<div class="panel error" id="error-message"><h2>${e.status === 404 ? "Not found" : e.status === 401 ? "Key needed" : "Cannot read the data"}</h2>${esc(e.message)}</div>`;
    } else {
      showBanner(reached ? `The dashboard server answered ${e.status} (${e.message}); retrying every ${POLL_MS / 1000}s.`
        : `Lost contact with the dashboard server (${e.message}); retrying every ${POLL_MS / 1000}s.`);
    }
  } finally { inflight = false; }
}

function setLive(ok) {
  const el = $("#live");
  el.className = "live " + (ok ? "ok" : "err");
  $("#live-text").textContent = ok ? `live · ${new Date().toLocaleTimeString([], { hour12: false })}` : "offline";
}
function showBanner(msg) { const b = $("#banner"); b.textContent = msg; b.hidden = false; }
function hideBanner() { $("#banner").hidden = true; }

function markNav() {
  const n = route().name, top = n === "run" ? "runs" : n === "subject" ? "subjects" : n;
  document.querySelectorAll("[data-nav]").forEach(a => a.classList.toggle("active", a.dataset.nav === top));
}

async function loadMeta() {
  try { meta = await api("api/meta"); showRayLink(meta.ray_dashboard); } catch (e) { /* the view shows the error */ }
  $("#key-button").textContent = key() ? "Key ✓" : "Key";
}

// Ray's dashboard where one answers; "not running" where none does (the embedded local Ray has none).
function showRayLink(url) {
  if (url) $("#ray-link").href = url;
  $("#ray-link").hidden = !url;
  $("#ray-off").hidden = !!url;
}

$("#key-button").onclick = () => { $("#key-input").value = key(); $("#key-dialog").showModal(); };
$("#key-dialog").addEventListener("close", () => {
  const v = $("#key-dialog").returnValue;
  if (v === "save") sessionStorage.setItem("dreamfleet-key", $("#key-input").value.trim());
  if (v === "clear") sessionStorage.removeItem("dreamfleet-key");
  loadMeta().then(() => tick(true));
});

window.addEventListener("hashchange", () => { markNav(); view.innerHTML = `<p class="muted">Loading…</p>`; tick(true); });
markNav();
loadMeta().then(() => tick(true));
setInterval(() => tick(false), POLL_MS);
setInterval(loadMeta, 30000);
