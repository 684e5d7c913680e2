// The hardneg data page. Every number and picture comes from the service's JSON routes, the same ones any
// client calls; with HARDNEG_API_KEY set, the key the user types is sent with each call (X-API-Key) and kept
// only for this browser tab (sessionStorage). Data is written with textContent, never parsed as HTML.
"use strict";

const KEY_STORE = "hardneg-api-key";
const ui = { key: sessionStorage.getItem(KEY_STORE) || "", served: null, snapshot: null, thumbs: new Map() };
const $ = (id) => document.getElementById(id);

class AuthError extends Error {}

async function call(path, params = {}, as = "json", body = undefined) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const headers = ui.key ? { "X-API-Key": ui.key } : {};
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(url, init);
  if (resp.status === 401) {
    askForKey(ui.key ? "That API key was refused; enter the right one." : "This service needs its API key.");
    throw new AuthError("API key needed");
  }
  if (!resp.ok) {
    let detail = `${resp.status} ${resp.statusText}`;
    try { const body = await resp.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return as === "blob" ? resp.blob() : resp.json();
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-panel").hidden = false;
  $("key-input").focus();
}

function showError(err) {
  if (err instanceof AuthError) return;
  $("error").textContent = err.message;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function thumbUrl(id) {
  const key = `${ui.snapshot}/${id}`;
  if (!ui.thumbs.has(key)) {
    ui.thumbs.set(key, call(`/items/${id}/thumb.png`, { snapshot: ui.snapshot }, "blob").then((b) => URL.createObjectURL(b)));
  }
  return ui.thumbs.get(key);
}

// One item as a tile: thumbnail (when the snapshot has them), id, label and a note (distance or score).
function tile(item, { note, query = false, queryLabel = null, hasThumbs = false } = {}) {
  const t = el("div", "tile");
  if (query) t.classList.add("query");
  if (queryLabel !== null && item.label !== queryLabel) t.classList.add("other-label");
  t.dataset.id = String(item.id);
  t.dataset.label = String(item.label);
  if (hasThumbs) {
    const img = el("img");
    img.alt = `item ${item.id}`;
    thumbUrl(item.id).then((u) => { img.src = u; }).catch(() => { img.alt = "no picture"; });
    t.append(img);
  } else {
    t.append(el("div", "no-thumb"));
  }
  t.append(el("span", "tile-id", `id ${item.id}`), el("span", "tile-label", `label ${item.label}`));
  if (note) t.append(el("span", "tile-note", note));
  t.addEventListener("click", () => { $("item-id").value = item.id; showItem(item.id); });
  return t;
}

async function loadHeader() {
  const [manifest, history] = await Promise.all([call("/snapshot"), call("/snapshots")]);
  ui.served = manifest.name;
  ui.inputShape = manifest.model && Array.isArray(manifest.model.input_shape) && manifest.files["model.pt2"]
    ? manifest.model.input_shape : null;
  // Raw images can be searched when the served snapshot has its model (C x H x W, or H x W).
  $("upload-label").hidden = !(ui.inputShape && [2, 3].includes(ui.inputShape.length));
  if (!ui.snapshot) ui.snapshot = manifest.name;
  $("served").textContent = `serving ${manifest.name}: ${manifest.count} items, dim ${manifest.dim}, ` +
    `${manifest.metric}, ${manifest.index.factory}, published ${manifest.created_at.slice(0, 19).replace("T", " ")}`;
  for (const select of [$("snapshot-select"), $("drift-from")]) select.replaceChildren();
  for (const s of history.snapshots) {
    if (s.error) continue;
    const label = `${s.name}${s.served ? " (served)" : ""} · ${s.count} items`;
    const a = el("option", "", label); a.value = s.name; a.selected = s.name === ui.snapshot;
    $("snapshot-select").append(a);
    const b = el("option", "", label); b.value = s.name;
    $("drift-from").append(b);
  }
  const older = history.snapshots.filter((s) => !s.error && s.name !== ui.snapshot);
  if (older.length) $("drift-from").value = older[0].name;
}

async function showItem(id) {
  clearError();
  const k = Number($("k").value) || 8;
  try {
    const item = await call(`/items/${id}`, { snapshot: ui.snapshot });
    const [near, hard] = await Promise.all([
      call(`/neighbors/${id}`, { k, snapshot: ui.snapshot }),
      call(`/neighbors/${id}`, { k, snapshot: ui.snapshot, different_label: "true" }),
    ]);
    const opts = { queryLabel: item.label, hasThumbs: item.thumb };
    $("item").replaceChildren(tile(item, { query: true, hasThumbs: item.thumb, note: "the query" }));
    $("neighbors").replaceChildren(...near.results[0].map((n) => tile(n, { ...opts, note: `d² ${n.distance.toFixed(3)}` })));
    $("hard-negatives").replaceChildren(...hard.results[0].map((n) => tile(n, { ...opts, note: `d² ${n.distance.toFixed(3)}` })));
    $("item-view").hidden = false;
  } catch (err) { showError(err); }
}

// An uploaded image, resized to the model's input shape with values in [0, 1] (grey: the channel mean),
// embedded by the served snapshot's own model through POST /neighbors {"inputs": ...}.
async function searchImage(file) {
  clearError();
  try {
    const shape = ui.inputShape;
    const [c, h, w] = shape.length === 3 ? shape : [1, ...shape];
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(await createImageBitmap(file), 0, 0, w, h);
    const px = ctx.getImageData(0, 0, w, h).data;
    const channel = (ch) => Array.from({ length: h }, (_, y) => Array.from({ length: w }, (_, x) => {
      const i = 4 * (y * w + x);
      return ch === null ? (px[i] + px[i + 1] + px[i + 2]) / 3 / 255 : px[i + ch] / 255;
    }));
    const input = c === 1 ? [channel(null)] : [0, 1, 2].slice(0, c).map(channel);
    const k = Number($("k").value) || 8;
    const near = await call("/neighbors", {}, "json", { inputs: [shape.length === 3 ? input : input[0]], k, snapshot: ui.snapshot });
    const query = el("div", "tile query");
    const img = el("img"); img.src = URL.createObjectURL(file); img.alt = "uploaded image";
    query.append(img, el("span", "tile-id", "uploaded"), el("span", "tile-label", "label ?"));
    const hasThumbs = near.results[0].length ? (await call(`/items/${near.results[0][0].id}`, { snapshot: near.snapshot })).thumb : false;
    $("item").replaceChildren(query);
    $("neighbors").replaceChildren(...near.results[0].map((n) => tile(n, { hasThumbs, note: `d² ${n.distance.toFixed(3)}` })));
    $("hard-negatives").replaceChildren(el("span", "muted", "an uploaded image has no label, so no wrong-label neighbours"));
    $("item-view").hidden = false;
  } catch (err) { showError(err); }
}

async function loadSuspects() {
  clearError();
  try {
    const audit = await call("/audit/labels", { limit: 24, snapshot: ui.snapshot });
    const first = audit.suspects[0];
    const hasThumbs = first ? (await call(`/items/${first.id}`, { snapshot: ui.snapshot })).thumb : false;
    $("audit-summary").textContent = `${audit.snapshot}: ${audit.disagreeing} of ${audit.count} items have a ` +
      `neighbour of another label (k=${audit.k}); the most suspicious first (q = label quality: the mean of ` +
      `the neighbours' agreement and the class-mean confidence; → the neighbours' label).`;
    $("duplicates").replaceChildren();
    $("suspects").replaceChildren(...audit.suspects.map((s) =>
      tile(s, { hasThumbs, note: `q ${s.quality.toFixed(2)} → ${s.suggested}` })));
  } catch (err) { showError(err); }
}

async function loadDuplicates() {
  clearError();
  try {
    const dup = await call("/audit/duplicates", { threshold: $("dup-threshold").value, limit: 20, snapshot: ui.snapshot });
    $("audit-summary").textContent = `${dup.snapshot}: ${dup.pairs} pairs within d² ${dup.threshold} in ` +
      `${dup.different_label_groups} conflicting and ${dup.same_label_groups} same-label groups.`;
    $("suspects").replaceChildren();
    const anyId = [...dup.different_label, ...dup.same_label].map((g) => g.ids[0])[0];
    const hasThumbs = anyId !== undefined ? (await call(`/items/${anyId}`, { snapshot: ui.snapshot })).thumb : false;
    const rows = [];
    for (const [kind, groups] of [["different labels", dup.different_label], ["same label", dup.same_label]]) {
      for (const g of groups) {
        const row = el("div", "group");
        row.append(el("span", "kind", kind));
        const tiles = el("div", "tiles");
        g.ids.forEach((id, j) => tiles.append(tile({ id, label: g.id_labels[j] }, { hasThumbs })));
        row.append(tiles);
        rows.push(row);
      }
    }
    $("duplicates").replaceChildren(...rows);
  } catch (err) { showError(err); }
}

async function loadDrift() {
  clearError();
  try {
    const d = await call("/drift", { from: $("drift-from").value, to: ui.snapshot });
    const stats = el("div", "stats");
    const stat = (label, value) => { const s = el("div", "stat"); s.append(el("b", "", value), el("span", "muted", label)); return s; };
    stats.append(
      stat(`neighbour overlap at k=${d.k}`, d.overlap_mean.toFixed(3)),
      stat("centroid shift (mean d²)", d.centroid_shift_mean.toFixed(4)),
      stat("hardest negative changed", d.hardest_negative_changed === null ? "n/a" : d.hardest_negative_changed.toFixed(3)),
      stat("common items", String(d.common)));
    const table = el("table");
    const head = el("tr");
    for (const h of ["class", "overlap", "centroid shift"]) head.append(el("th", "", h));
    table.append(head);
    for (const [c, o] of Object.entries(d.overlap_per_class)) {
      const tr = el("tr");
      const shift = d.centroid_shift[c];
      tr.append(el("td", "", c), el("td", "", o.toFixed(3)), el("td", "", shift === undefined ? "–" : shift.toFixed(4)));
      table.append(tr);
    }
    $("drift").replaceChildren(el("p", "muted", `${d.from} → ${d.to}, ${d.anchors} anchors`), stats, table);
  } catch (err) { showError(err); }
}

async function start() {
  clearError();
  try {
    await loadHeader();
    $("key-panel").hidden = true;
    const id = new URLSearchParams(window.location.search).get("id");
    if (id !== null) { $("item-id").value = id; await showItem(id); }
  } catch (err) { showError(err); }
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  ui.key = $("key-input").value;
  sessionStorage.setItem(KEY_STORE, ui.key);
  ui.thumbs.clear();
  start();
});
$("search-form").addEventListener("submit", (e) => { e.preventDefault(); showItem($("item-id").value); });
$("snapshot-select").addEventListener("change", (e) => {
  ui.snapshot = e.target.value;
  const id = $("item-id").value;
  if (id) showItem(id);
});
$("upload").addEventListener("change", (e) => { if (e.target.files.length) searchImage(e.target.files[0]); });
$("load-suspects").addEventListener("click", loadSuspects);
$("load-duplicates").addEventListener("click", loadDuplicates);
$("load-drift").addEventListener("click", loadDrift);
start();
