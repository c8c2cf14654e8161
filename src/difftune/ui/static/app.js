// difftune ui: plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c.nodeType ? c : String(c));
  return node;
};
const fileUrl = (path, download) => "/file?path=" + encodeURIComponent(path) + (download ? "&download=1" : "");
const fmt = (x, digits = 4) => (x === null || x === undefined || Number.isNaN(x)) ? "–" :
  (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0)) ? x.toExponential(2) : (+x.toPrecision(digits)).toString();
const duration = (s) => s === null || s === undefined ? "–" : s < 60 ? `${Math.round(s)} s` :
  s < 3600 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Difftune": "1" },
  };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

let toastTimer = null;
function toast(message, bad = false) {
  const t = $("#toast");
  t.textContent = message; t.className = bad ? "bad" : ""; t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 9000 : 3500);
}
const guard = (fn) => async (...args) => { try { return await fn(...args); } catch (e) { toast(e.message, true); } };

// --- routing and polling -----------------------------------------------------------------------
const pages = {};
let pollTimer = null;
function route() {
  const [name, ...rest] = (location.hash.slice(1) || "data").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  const page = pages[name] ? name : "data";
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== "page-" + page; });
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  clearInterval(pollTimer); pollTimer = null;
  guard(pages[page].show)(arg);
}
function poll(fn, ms) { clearInterval(pollTimer); pollTimer = setInterval(guard(fn), ms); }

// --- charts ------------------------------------------------------------------------------------
const COLORS = ["#3057d5", "#d1495b", "#2e9c5a", "#e08e0b", "#7a4bc2", "#158a99", "#8a6d3b", "#c2418f"];
function niceTicks(lo, hi, n = 5) {
  if (lo === hi) { hi = lo + 1; }
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}
// series: [{name, color, points: [[x, y]], dashed, mark: [x, y, label]}]
function lineChart(svg, series, { ylabel = "" } = {}) {
  const W = 640, H = 260, L = 58, R = 12, T = 12, B = 30;
  const NS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => { const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; return n; };
  svg.replaceChildren();
  const pts = series.flatMap((x) => x.points).filter((p) => p[1] !== null && Number.isFinite(p[1]));
  if (!pts.length) { svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no values yet")); svg.dataset.points = "0"; return; }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1; y0 -= pad; y1 += pad;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1)) {
    svg.append(s("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "gridline" }));
    svg.append(s("text", { x: L - 5, y: Y(t) + 4, "text-anchor": "end" }, fmt(t, 3)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    svg.append(s("text", { x: X(t), y: H - 10, "text-anchor": "middle" }, t));
  }
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.append(s("text", { x: L - 6, y: H - 10, "text-anchor": "end" }, "step"));
  if (ylabel) svg.append(s("text", { x: 4, y: T + 4 }, ylabel));
  let total = 0;
  series.forEach((ser) => {
    const p = ser.points.filter((q) => q[1] !== null && Number.isFinite(q[1]));
    total += p.length;
    if (!p.length) return;
    svg.append(s("polyline", { points: p.map((q) => `${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: ser.color, "stroke-width": 1.8, "stroke-dasharray": ser.dashed ? "5 4" : "none",
      "data-series": ser.name }));
    if (p.length < 40 || ser.dashed) p.forEach((q) => svg.append(s("circle", { cx: X(q[0]), cy: Y(q[1]), r: 2.2, fill: ser.color })));
    if (ser.mark) {
      const [mx, my, label] = ser.mark;
      svg.append(s("circle", { cx: X(mx), cy: Y(my), r: 6, fill: "none", stroke: ser.color, "stroke-width": 2, class: "best" }));
      const right = X(mx) > W - 160;  // near the right edge: the label goes to the left of the marker
      svg.append(s("text", { x: X(mx) + (right ? -10 : 10), y: Y(my) - 9, fill: ser.color, "text-anchor": right ? "end" : "start" }, label));
    }
  });
  svg.dataset.points = String(total);
  const legend = s("g", {});
  series.forEach((ser, i) => {
    legend.append(s("rect", { x: L + 10 + i * 150, y: T + 2, width: 12, height: 3, fill: ser.color }));
    legend.append(s("text", { x: L + 26 + i * 150, y: T + 7 }, ser.name.length > 22 ? "…" + ser.name.slice(-21) : ser.name));
  });
  svg.append(legend);
}
// metric rows -> {loss: [[step, v]], lr: [...], val_loss: [...], val_word_gain: [...]}; a later row for a step
// wins (after a resume)
function metricSeries(rows) {
  const out = { loss: new Map(), lr: new Map(), val_loss: new Map(), val_word_gain: new Map() };
  for (const r of rows) for (const k of Object.keys(out)) if (k in r) out[k].set(r.step, r[k]);
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, [...v.entries()].sort((a, b) => a[0] - b[0])]));
}
// The held-out series of a run; the marker sits where the run marked its best checkpoint (best.json: the lowest
// held-out loss, or the highest word gain with validation.holdout_word), else where the curve is best.
function heldOutSeries(m, best, name, color, gainColor = color) {
  const gain = m.val_word_gain.length > 0;
  const points = gain ? m.val_word_gain : m.val_loss;
  const finite = points.filter((q) => q[1] !== null && Number.isFinite(q[1]));
  const marked = best && finite.find((q) => q[0] === best.step);
  const top = finite.length ? finite.reduce((a, b) => ((gain ? b[1] > a[1] : b[1] < a[1]) ? b : a)) : null;
  const at = marked || top;
  const mark = at && [at[0], at[1], `best ${gain ? "word gain " + fmt(at[1]) : fmt(at[1])} @ ${at[0]}${marked ? " (checkpoint)" : ""}`];
  const series = [{ name: `${name}held-out loss`, color, points: m.val_loss, dashed: true, mark: gain ? null : mark }];
  if (gain) series.push({ name: `${name}word gain`, color: gainColor, points: m.val_word_gain, dashed: true, mark });
  return series.filter((s) => s.points.length);
}

// --- Data --------------------------------------------------------------------------------------
const data = { folder: "", report: null, page: 0, perPage: 48 };
pages.data = {
  async show(arg) {
    const folder = arg || "";
    if (folder !== data.folder || !data.report || data.report.folder !== folder) {
      data.folder = folder; data.report = null;
      $("#data-report").replaceChildren(); $("#data-images").replaceChildren(); $("#data-pager").replaceChildren();
    }
    await loadFolders();
  },
};
async function loadFolders() {
  const res = await api("/api/folders?path=" + encodeURIComponent(data.folder));
  $("#data-folder").textContent = "/" + res.path;
  const chips = $("#data-subfolders");
  chips.replaceChildren();
  if (res.path) {
    const up = res.path.split("/").slice(0, -1).join("/");
    chips.append(el("button", { onclick: () => { location.hash = up ? "data/" + up : "data"; } }, "↑ up"));
  }
  for (const f of res.folders) {
    chips.append(el("button", { "data-folder": f.path, onclick: () => { location.hash = "data/" + f.path; } },
      `${f.name}/`, f.images ? el("span", { class: "muted" }, ` ${f.images} images`) : ""));
  }
}
async function checkData() {
  const set = [];
  const res = $("#data-resolution").value;
  if (res) set.push(`data.resolution=${res}`);
  if ($("#data-buckets").checked) set.push("data.buckets=true");
  const folder = data.folder;
  // The file names come at once; the check opens every file, so it runs in the background while we show them.
  const files = await api("/api/data/files?path=" + encodeURIComponent(folder));
  data.report = { folder: files.folder, images: files.images.map((name) => ({ name, caption: null })) };
  data.page = 0;
  $("#data-report").replaceChildren(el("p", { class: "muted", "data-testid": "data-checking" },
    `checking ${files.images.length} images (every file is opened, as training will)…`));
  renderImages();
  // Let the thumbnails on screen arrive first (the check competes with them for the CPU), then check.
  const onScreen = [...document.querySelectorAll("#data-images img")].filter((i) => i.getBoundingClientRect().top < innerHeight);
  await Promise.race([Promise.all(onScreen.map((i) => i.decode().catch(() => {}))), new Promise((r) => setTimeout(r, 2000))]);
  let state = await api("/api/data/check", { path: folder, set, wait: false });
  while (state.status !== "ready") {
    await new Promise((r) => setTimeout(r, 400));
    if (data.folder !== folder) return;  // the person moved on
    state = await api("/api/data/check", { path: folder, set, wait: false });
  }
  data.report = state.report;
  renderReport();
  renderImages();
}
function renderReport() {
  const r = data.report, box = $("#data-report");
  const hist = (o, n = 6) => Object.entries(o).slice(0, n).map(([k, v]) => `${k}: ${v}`).join(", ") || "–";
  box.replaceChildren(
    el("div", { class: "summary" },
      el("div", {}, el("div", { class: "big", "data-testid": "data-usable" }, r.usable), "usable images"),
      el("div", {}, el("div", { class: "big" }, r.skipped), "skipped files"),
      el("div", {}, el("div", { class: "big" }, r.warnings), "warnings"),
      el("div", {}, el("strong", {}, "buckets "), `(${r.buckets.enabled ? "on" : "off: square crops"}, ${r.buckets.resolution} px): `, hist(r.buckets.counts)),
      el("div", {}, el("strong", {}, "resolutions "), hist(r.resolutions)),
      el("div", {}, el("strong", {}, "captions "), `${r.captions.missing} missing, ${r.captions.empty} empty, ${r.captions.too_long} too long `,
        el("span", { class: "muted" }, `(${r.captions.how})`)),
      el("div", {}, el("strong", {}, r.trainable ? "ok: trainable" : "error: no usable images")),
    ),
    r.problems.length ? el("table", { class: "table", "data-testid": "data-problems" },
      el("thead", {}, el("tr", {}, el("th", { text: "" }), el("th", { text: "file" }), el("th", { text: "problem" }), el("th", { text: "detail" }))),
      el("tbody", {}, r.problems.map((p) => el("tr", {},
        el("td", { class: "sev-" + p.severity, text: p.severity }), el("td", { text: p.name }),
        el("td", { text: p.kind }), el("td", { text: p.detail }))))) : el("p", { class: "muted" }, "No problems found."),
    r.duplicates.length ? el("p", {}, "Duplicates: " + r.duplicates.map((g) => g.join(" = ")).join("; ")) : "",
  );
}
function renderImages() {
  const r = data.report, grid = $("#data-images"), pager = $("#data-pager");
  const pages_ = Math.max(1, Math.ceil(r.images.length / data.perPage));
  data.page = Math.min(data.page, pages_ - 1);
  pager.replaceChildren(
    el("button", { disabled: data.page === 0, onclick: () => { data.page--; renderImages(); } }, "‹ previous"),
    el("span", { "data-testid": "data-page" }, `page ${data.page + 1} of ${pages_} (${r.images.length} images)`),
    el("button", { disabled: data.page >= pages_ - 1, onclick: () => { data.page++; renderImages(); } }, "next ›"));
  const start = data.page * data.perPage;
  const base = r.folder ? r.folder + "/" : "";
  grid.replaceChildren(...r.images.slice(start, start + data.perPage).map((img) => imageTile(img, base)));
}
function imageTile(img, base) {
  const checked = img.caption !== null;
  const caption = el("div", { class: "caption", "data-testid": "caption" },
    !checked ? el("em", { class: "muted" }, "checking…") : img.caption || el("em", { class: "muted" }, "(no caption)"));
  const tile = el("div", { class: "tile", "data-name": img.name },
    el("img", { src: `/thumb?size=160&path=${encodeURIComponent(base + img.name)}`, loading: "lazy", alt: img.name, width: 160, height: 160 }),
    el("div", { class: "name" }, img.name),
    el("div", { class: "muted" }, checked ? `${img.width}×${img.height} → ${img.bucket}, ${img.tokens} tokens` : "\u00a0"),
    caption);
  if (!checked) return tile;
  const edit = el("button", { "data-testid": "edit-caption", onclick: () => {
    const input = el("input", { value: img.caption, "data-testid": "caption-input" });
    const save = el("button", { class: "primary", "data-testid": "save-caption", onclick: guard(async () => {
      const res = await api("/api/data/caption", { path: data.folder, name: img.name, caption: input.value });
      img.caption = res.caption;
      caption.replaceChildren(res.caption);
      form.replaceWith(edit);
      toast(`caption saved to ${res.file}`);
    }) }, "Save");
    const form = el("div", {}, input, save);
    edit.replaceWith(form);
    input.focus();
  } }, "edit caption");
  tile.append(edit);
  return tile;
}

// --- Configure ---------------------------------------------------------------------------------
const cfg = { schema: null, text: "", name: "run.toml", values: {}, pending: null };
pages.configure = {
  async show() {
    if (!cfg.schema) {
      cfg.schema = await api("/api/schema");
      const presets = await api("/api/presets");
      const sel = $("#cfg-preset");
      for (const p of presets) sel.append(el("option", { value: p.name, title: p.description }, `${p.name} — ${p.description}`));
      buildForm();
    }
  },
};
function buildForm() {
  const form = $("#cfg-form");
  form.replaceChildren();
  for (const section of cfg.schema) {
    const box = el("details", { open: ["model", "method", "data", "train", "validation", "output"].includes(section.name) || null },
      el("summary", {}, `[${section.name}] `, el("span", { class: "muted" }, section.doc)));
    for (const f of section.fields) box.append(fieldRow(f));
    form.append(box);
  }
  form.addEventListener("submit", (e) => e.preventDefault());
}
function fieldRow(f) {
  const id = "f-" + f.key.replace(/\./g, "-");
  let input;
  if (f.kind === "bool") {
    input = el("select", { id }, el("option", { value: "" }, `(default: ${f.default})`), el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false"));
  } else if (f.kind === "choice") {
    input = el("select", { id }, el("option", { value: "" }, `(default: ${f.default ?? "unset"})`), ...f.choices.map((c) => el("option", { value: c }, c)));
  } else if (f.kind === "lines" || f.kind === "toml") {
    input = el("textarea", { id, rows: 1, placeholder: f.kind === "lines" ? "one per line" : (f.default ?? "unset") });
  } else {
    input = el("input", { id, type: "text", placeholder: f.default === null ? "unset" : `default: ${f.default}`, inputmode: f.kind === "number" ? "decimal" : null });
  }
  input.dataset.key = f.key;
  input.addEventListener(f.kind === "bool" || f.kind === "choice" ? "change" : "input", () => fieldChanged(f, input));
  const bounds = [f.min !== null ? `${f.min_exclusive ? ">" : "≥"} ${f.min}` : "", f.max !== null ? `≤ ${f.max}` : ""].filter(Boolean).join(", ");
  return el("div", { class: "field", "data-key": f.key },
    el("label", { for: id, title: f.type }, f.key), input,
    el("div", { class: "doc" }, f.doc, el("span", { class: "muted" }, ` (${f.type}${bounds ? "; " + bounds : ""})`)));
}
// Edits are debounced per field and applied one after another, each to the text the previous one returned.
const editTimers = {};
const pendingKeys = new Set();  // typed but not yet applied: a reply for another key must not reset them
let editChain = Promise.resolve();
cfg.busy = 0;
function fieldChanged(f, input) {
  if (editTimers[f.key]) clearTimeout(editTimers[f.key]); else cfg.busy++;
  pendingKeys.add(f.key);
  $("#cfg-check").dataset.busy = "1";
  editTimers[f.key] = setTimeout(() => {
    delete editTimers[f.key];
    const value = input.value === "" ? null : input.value;
    editChain = editChain.then(guard(async () => {
      const state = await api("/api/config/edit", { text: cfg.text, key: f.key, value, name: cfg.name });
      if (!(f.key in editTimers)) pendingKeys.delete(f.key);
      applyConfigState(state, f.key);
    })).finally(() => { if (--cfg.busy === 0) delete $("#cfg-check").dataset.busy; });
  }, f.kind === "bool" || f.kind === "choice" ? 0 : 350);
}
function applyConfigState(state, skipKey) {
  cfg.text = state.text;
  if (state.values) cfg.values = state.values;
  const ta = $("#cfg-text");
  if (ta.value !== state.text) ta.value = state.text;
  const check = $("#cfg-check");
  check.textContent = state.check.message;
  check.className = "check " + (state.check.ok ? "ok" : "bad");
  check.dataset.ok = state.check.ok ? "1" : "0";
  $("#cfg-queue").disabled = !state.check.ok;
  document.querySelectorAll("#cfg-form [data-key]").forEach((input) => {
    if (input.classList.contains("field")) return;
    const key = input.dataset.key, v = cfg.values[key];
    input.closest(".field").classList.toggle("set", v !== undefined);
    if (key !== skipKey && !(key in editTimers) && !pendingKeys.has(key) && document.activeElement !== input) {
      input.value = v === undefined ? "" : v;
    }
    if (input.tagName === "TEXTAREA") input.rows = Math.min(6, Math.max(1, (input.value.match(/\n/g) || []).length + 1));
  });
  const url = URL.createObjectURL(new Blob([state.text], { type: "application/toml" }));
  const a = $("#cfg-download");
  if (a.dataset.url) URL.revokeObjectURL(a.dataset.url);
  a.href = url; a.dataset.url = url; a.download = cfg.name.endsWith(".toml") ? cfg.name : "run.toml";
  filterFields();
}
function filterFields() {
  const q = $("#cfg-filter").value.trim().toLowerCase(), only = $("#cfg-only-set").checked;
  document.querySelectorAll("#cfg-form .field").forEach((row) => {
    row.hidden = (q && !row.dataset.key.includes(q)) || (only && !row.classList.contains("set"));
  });
}
async function openConfig(body) {
  const state = await api("/api/config/open", body);
  cfg.name = state.name;
  applyConfigState(state);
  if (state.path) $("#cfg-save-path").value = state.path;
}

// --- Queue -------------------------------------------------------------------------------------
pages.queue = {
  async show() { await renderQueue(); poll(renderQueue, 2000); },
};
const badge = (status) => el("span", { class: "badge " + status, "data-status": status }, status);
function progressBar(step, total) {
  const pct = total ? Math.min(100, 100 * (step || 0) / total) : 0;
  const bar = el("div", {});
  bar.style.width = `${pct.toFixed(1)}%`;  // CSSOM, which the page's content security policy allows
  return el("div", { class: "progress", title: `${step ?? 0} / ${total ?? "?"}` }, bar);
}
async function renderQueue() {
  const jobs = await api("/api/jobs");
  const act = (job, action, label) => el("button", { "data-action": action, onclick: guard(async () => {
    if (action === "delete" && !confirm(`Remove job ${job.id} from the queue? Its run folder stays on disk.`)) return;
    await api(`/api/jobs/${job.id}/${action}`, {});
    toast(`${label}: job ${job.id}`);
    await renderQueue();
  }) }, label);
  $("#queue-rows").replaceChildren(...(jobs.length ? jobs.map((j) => {
    const p = j.progress;
    const actions = [];
    if (j.status === "running") actions.push(act(j, "stop", "Stop"));
    if (["stopped", "failed"].includes(j.status)) actions.push(act(j, "resume", "Resume"));
    if (["done", "stopped", "failed"].includes(j.status)) actions.push(act(j, "requeue", "Re-queue"));
    if (!["running", "stopping"].includes(j.status)) actions.push(act(j, "delete", "Delete"));
    actions.push(el("a", { class: "button", href: "#watch/" + encodeURIComponent(j.run) }, "Watch"));
    return el("tr", { "data-job": j.id, "data-status": j.status },
      el("td", { text: j.id }), el("td", {}, el("strong", {}, j.name), el("div", { class: "muted" }, j.run)),
      el("td", {}, badge(j.status)),
      el("td", {}, progressBar(p.step, p.total_steps), el("span", { class: "muted" }, `${p.step ?? 0} / ${p.total_steps ?? "?"}`)),
      el("td", { class: "muted", text: j.message || "" }), el("td", {}, ...actions));
  }) : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "Nothing queued yet: add a run from Configure."))]));
}

// --- Watch -------------------------------------------------------------------------------------
const watch = { run: null, rows: [], offset: 0, step: null, detail: null };
async function fillRunSelect(select, current, filter = () => true) {
  const list = (await api("/api/runs")).filter(filter);
  select.replaceChildren(...list.map((r) => el("option", { value: r.run, selected: r.run === current || null },
    `${r.run} — ${r.status}${r.step !== null && r.step !== undefined ? ` (${r.step}/${r.total_steps})` : ""}${r.source === "cli" ? " [cli]" : ""}`)));
  return list;
}
pages.watch = {
  async show(arg) {
    const list = await fillRunSelect($("#watch-run"), arg || watch.run);
    const run = arg || watch.run || (list[0] && list[0].run);
    if (run && run !== watch.run) { watch.run = run; watch.rows = []; watch.offset = 0; watch.step = null; }
    watch.ticks = 0;
    await refreshWatch();
    poll(refreshWatch, 1500);
  },
};
async function refreshWatch() {
  if (++watch.ticks % 4 === 0) await fillRunSelect($("#watch-run"), watch.run);  // runs started meanwhile (CLI too)
  if (!watch.run && $("#watch-run").value) watch.run = $("#watch-run").value;
  if (!watch.run) { $("#watch-status").textContent = "No runs yet under this root."; return; }
  $("#watch-run").value = watch.run;
  const d = await api(`/api/run?run=${encodeURIComponent(watch.run)}&offset=${watch.offset}`);
  if (d.run !== watch.run) return;
  watch.rows.push(...d.metrics); watch.offset = d.offset; watch.detail = d;
  const p = d.progress || {};
  const job = d.job;
  const status = job ? job.status : (p.status || "unknown");  // the queue knows best about its own runs
  const elapsed = p.started ? (p.updated || Date.now() / 1000) - p.started : null;
  $("#watch-status").replaceChildren(
    el("div", {}, badge(status), job && job.message ? el("div", { class: "muted" }, job.message) : ""),
    el("div", {}, el("div", { class: "big", "data-testid": "watch-step" }, `${p.step ?? 0} / ${p.total_steps ?? "?"}`), "steps", progressBar(p.step, p.total_steps)),
    el("div", {}, el("div", { class: "big" }, p.steps_per_second ? fmt(p.steps_per_second, 3) : "–"), "steps per second"),
    el("div", {}, el("div", { class: "big" }, duration(p.eta_seconds)), "time left"),
    el("div", {}, el("div", { class: "big" }, duration(elapsed)), "elapsed"),
    el("div", {}, el("div", { class: "big" }, fmt((metricSeries(watch.rows).loss.slice(-1)[0] || [])[1])), "latest loss"));
  const option = [...$("#watch-run").options].find((o) => o.value === d.run);
  if (option) option.textContent = option.textContent.replace(/ — [a-z_]+( \(\d+\/\d+\))?/, ` — ${status}${p.step !== undefined ? ` (${p.step}/${p.total_steps})` : ""}`);
  $("#watch-stop").hidden = !(job && status === "running");
  $("#watch-resume").hidden = !(job && ["stopped", "failed"].includes(job.status) && d.checkpoints.length);
  const m = metricSeries(watch.rows);
  lineChart($("#watch-loss"), [
    { name: "train loss", color: COLORS[0], points: m.loss },
    ...heldOutSeries(m, d.best, "", COLORS[1], COLORS[4]),
  ]);
  lineChart($("#watch-lr"), [{ name: "learning rate", color: COLORS[2], points: m.lr }]);
  renderSamples(d);
  $("#watch-checkpoints").replaceChildren(el("p", {}, "Checkpoints: " + (d.checkpoints.join(", ") || "none yet")));
  $("#watch-config").textContent = d.config || "";
  $("#watch-log").textContent = d.log === null ? "(started outside the web app: its log is in the terminal that started it)" : (d.log || "");
}
function renderSamples(d) {
  const box = $("#watch-samples");
  if (!d.samples.length) { box.replaceChildren(el("p", { class: "muted" }, "No validation samples yet.")); box.dataset.steps = "0"; return; }
  const steps = d.samples.map((s) => s.step);
  if (watch.step === null || !steps.includes(watch.step) || watch.followLatest) { watch.step = steps[steps.length - 1]; watch.followLatest = true; }
  const current = d.samples.find((s) => s.step === watch.step);
  box.dataset.steps = String(steps.length);
  box.replaceChildren(
    el("div", { class: "steps" }, "step ", ...steps.map((s) => el("button", { class: s === watch.step ? "active" : null,
      onclick: () => { watch.step = s; watch.followLatest = s === steps[steps.length - 1]; renderSamples(d); } }, s))),
    el("div", { class: "samples" }, current.files.filter((f) => f !== "grid.png").map((f) => {
      const idx = parseInt(f.slice(0, 2), 10);
      return el("div", { class: "sample" }, el("img", { src: fileUrl(`${d.run}/samples/step-${current.step}/${f}`), alt: f, loading: "lazy" }),
        el("div", {}, d.prompts[idx] ?? f), el("div", { class: "muted" }, f.replace(".png", "")));
    })));
}

// --- Compare -----------------------------------------------------------------------------------
const compare = { picked: new Set(), file: null };
pages.compare = {
  async show() {
    const list = await api("/api/runs");
    $("#compare-picks").replaceChildren(...list.map((r) => el("label", { class: "button" },
      el("input", { type: "checkbox", value: r.run, checked: compare.picked.has(r.run) || null,
        onchange: (e) => { e.target.checked ? compare.picked.add(r.run) : compare.picked.delete(r.run); } }),
      ` ${r.run} `, badge(r.status))));
  },
};
async function runCompare() {
  const runs = [...compare.picked];
  if (runs.length < 2) { toast("Pick two or more runs.", true); return; }
  const res = await api("/api/compare?" + runs.map((r) => "run=" + encodeURIComponent(r)).join("&"));
  const out = $("#compare-out");
  const show = (v) => v === null || v === undefined ? "(unset)" : typeof v === "object" ? JSON.stringify(v) : String(v);
  const diff = el("table", { class: "table", "data-testid": "compare-diff" },
    el("thead", {}, el("tr", {}, el("th", { text: "key" }), ...res.runs.map((r) => el("th", { text: r.run })))),
    el("tbody", {}, res.differences.map((d) => el("tr", {}, el("td", { text: d.key }), ...d.values.map((v) => el("td", { text: show(v) }))))));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("viewBox", "0 0 640 260"); svg.dataset.testid = "compare-chart";
  svg.setAttribute("data-testid", "compare-chart");
  const series = [];
  res.runs.forEach((r, i) => {
    const m = metricSeries(r.metrics);
    series.push({ name: r.run, color: COLORS[i % COLORS.length], points: m.loss });
    series.push(...heldOutSeries(m, r.best, r.run + " ", COLORS[i % COLORS.length]));
  });
  lineChart(svg, series);
  // the same prompt and seed across runs (columns) and steps (rows)
  const files = [...new Set(res.runs.flatMap((r) => r.samples.flatMap((s) => s.files)).filter((f) => f !== "grid.png"))].sort();
  if (!files.includes(compare.file)) compare.file = files[0] || null;
  const prompts = res.runs.find((r) => r.prompts.length)?.prompts || [];
  const picker = el("select", { "data-testid": "compare-sample", onchange: (e) => { compare.file = e.target.value; drawGrid(); } },
    files.map((f) => el("option", { value: f, selected: f === compare.file || null }, `${prompts[parseInt(f, 10)] ?? ""} (${f.replace(".png", "")})`)));
  const gridBox = el("div", {});
  function drawGrid() {
    const steps = [...new Set(res.runs.flatMap((r) => r.samples.map((s) => s.step)))].sort((a, b) => a - b);
    gridBox.replaceChildren(el("table", { class: "comparegrid", "data-testid": "compare-grid" },
      el("tr", {}, el("th", { text: "step" }), ...res.runs.map((r) => el("th", { text: r.run }))),
      steps.map((step) => el("tr", {}, el("th", { text: step }), ...res.runs.map((r) => {
        const s = r.samples.find((x) => x.step === step);
        return el("td", {}, s && s.files.includes(compare.file) ? el("img", { src: fileUrl(`${r.run}/samples/step-${step}/${compare.file}`), loading: "lazy" }) : "–");
      })))));
  }
  drawGrid();
  out.replaceChildren(el("h2", {}, "Config differences"), res.differences.length ? diff : el("p", {}, "The configs are identical."),
    el("h2", {}, "Loss"), el("figure", {}, svg),
    el("h2", {}, "Same prompt and seed across runs and steps"), files.length ? el("div", {}, picker, gridBox) : el("p", { class: "muted" }, "No samples yet."));
}

// --- Results -----------------------------------------------------------------------------------
pages.results = {
  async show(arg) {
    const list = await fillRunSelect($("#results-run"), arg);
    const run = arg || $("#results-run").value || (list[0] && list[0].run);
    if (run) { $("#results-run").value = run; await showResults(run); }
  },
};
async function showResults(run) {
  const d = await api(`/api/run?run=${encodeURIComponent(run)}&offset=0`);
  const files = $("#results-files");
  if (!d.adapter) {
    files.replaceChildren(el("p", { class: "muted" }, "No adapter yet: the run has not finished."));
  } else {
    const convert = el("button", { "data-testid": "convert-kohya", onclick: guard(async () => {
      convert.disabled = true; convert.textContent = "converting…";
      try {
        const res = await api("/api/run/convert", { run });
        convert.replaceWith(el("a", { class: "button", href: fileUrl(res.file, true), "data-testid": "kohya-link" }, `Download ${res.file.split("/").pop()}`));
      } finally { convert.disabled = false; convert.textContent = "Convert to kohya (ComfyUI / A1111)"; }
    }) }, "Convert to kohya (ComfyUI / A1111)");
    files.replaceChildren(el("a", { class: "button primary", href: fileUrl(d.adapter, true), "data-testid": "download-adapter" },
      `Download ${d.adapter.split("/").pop()}`), convert);
  }
  $("#gen-go").disabled = !d.adapter;
  const card = $("#results-card");
  if (d.card) {
    const text = await (await fetch(fileUrl(d.card))).text();
    card.replaceChildren(...renderMarkdown(text, run));
  } else {
    card.replaceChildren(el("p", { class: "muted" }, "The model card is written when the run finishes."));
  }
}
// A small Markdown subset: front matter, headings, code fences, tables, lists, images, paragraphs.
function renderMarkdown(text, base) {
  const out = [], lines = text.replace(/\r/g, "").split("\n");
  let i = 0;
  const inline = (s) => {
    const frag = [], re = /!\[([^\]]*)\]\(([^)]+)\)|`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)]+)\)/g;
    let last = 0, m;
    while ((m = re.exec(s))) {
      frag.push(s.slice(last, m.index));
      if (m[2] !== undefined) frag.push(/^[a-z]+:/i.test(m[2]) ? m[1] : el("img", { src: fileUrl(`${base}/${m[2]}`), alt: m[1] }));
      else if (m[3] !== undefined) frag.push(el("code", {}, m[3]));
      else if (m[4] !== undefined) frag.push(el("strong", {}, m[4]));
      else frag.push(m[5]);
      last = re.lastIndex;
    }
    frag.push(s.slice(last));
    return frag;
  };
  if (lines[0] === "---") { const end = lines.indexOf("---", 1); out.push(el("pre", { class: "code" }, lines.slice(1, end).join("\n"))); i = end + 1; }
  while (i < lines.length) {
    const line = lines[i];
    if (line.startsWith("```")) { const end = lines.indexOf("```", i + 1); const stop = end < 0 ? lines.length : end;
      out.push(el("pre", { class: "code" }, lines.slice(i + 1, stop).join("\n"))); i = stop + 1; continue; }
    const h = line.match(/^(#{1,4})\s+(.*)/);
    if (h) { out.push(el("h" + Math.min(4, h[1].length + 1), {}, ...inline(h[2]))); i++; continue; }
    if (line.startsWith("|")) {
      const rows = []; while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      const cells = (r) => r.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      out.push(el("table", { class: "table" }, rows.filter((r) => !/^\|[\s|:-]+\|$/.test(r)).map((r, n) =>
        el("tr", {}, cells(r).map((c) => el(n === 0 ? "th" : "td", {}, ...inline(c)))))));
      continue;
    }
    if (/^[-*] /.test(line)) { const items = []; while (i < lines.length && /^[-*] /.test(lines[i])) items.push(lines[i++].slice(2));
      out.push(el("ul", {}, items.map((t) => el("li", {}, ...inline(t))))); continue; }
    if (line.trim()) { out.push(el("p", {}, ...inline(line))); }
    i++;
  }
  return out;
}
async function generate(e) {
  e.preventDefault();
  const run = $("#results-run").value, btn = $("#gen-go");
  btn.disabled = true; btn.textContent = "generating…";
  try {
    const res = await api("/api/run/generate", { run, prompt: $("#gen-prompt").value, seed: +$("#gen-seed").value,
      steps: +$("#gen-steps").value, guidance: +$("#gen-guidance").value, weight: +$("#gen-weight").value });
    $("#gen-images").prepend(...res.images.map((p) => el("div", { class: "sample" }, el("img", { src: fileUrl(p) }),
      el("div", {}, $("#gen-prompt").value), el("div", { class: "muted" }, p))));
  } finally { btn.disabled = false; btn.textContent = "Generate"; }
}

// --- wiring ------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("#data-check").addEventListener("click", guard(checkData));
  $("#cfg-load-preset").addEventListener("click", guard(() => $("#cfg-preset").value && openConfig({ preset: $("#cfg-preset").value })));
  $("#cfg-open").addEventListener("click", guard(() => openConfig({ path: $("#cfg-open-path").value })));
  $("#cfg-filter").addEventListener("input", filterFields);
  $("#cfg-only-set").addEventListener("change", filterFields);
  let parseTimer = null;
  $("#cfg-text").addEventListener("input", () => {
    clearTimeout(parseTimer);
    parseTimer = setTimeout(guard(async () => applyConfigState(await api("/api/config/parse", { text: $("#cfg-text").value, name: cfg.name }))), 400);
  });
  $("#cfg-save").addEventListener("click", guard(async () => {
    const res = await api("/api/config/save", { path: $("#cfg-save-path").value, text: cfg.text, overwrite: $("#cfg-overwrite").checked });
    toast(`saved ${res.path}`);
  }));
  $("#cfg-queue").addEventListener("click", guard(async () => {
    const res = await api("/api/jobs", { text: cfg.text, name: $("#cfg-job-name").value || null });
    toast(`queued as job ${res.id}`);
    location.hash = "queue";
  }));
  $("#watch-run").addEventListener("change", (e) => { location.hash = "watch/" + encodeURIComponent(e.target.value); });
  $("#watch-stop").addEventListener("click", guard(async () => {
    await api(`/api/jobs/${watch.detail.job.id}/stop`, {}); toast("stopping: the run finishes its step and writes a checkpoint");
  }));
  $("#watch-resume").addEventListener("click", guard(async () => {
    await api(`/api/jobs/${watch.detail.job.id}/resume`, {}); toast("queued to resume from the latest checkpoint");
  }));
  $("#compare-go").addEventListener("click", guard(runCompare));
  $("#results-run").addEventListener("change", (e) => { location.hash = "results/" + encodeURIComponent(e.target.value); });
  $("#gen-form").addEventListener("submit", guard(generate));
  api("/api/info").then((info) => { $("#root-path").textContent = `root: ${info.root} · difftune ${info.version}`; }).catch(() => {});
  window.addEventListener("hashchange", route);
  route();
});
