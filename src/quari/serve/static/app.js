// quari web page: text, image and item queries; the plain baseline and QuARI side by side.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const state = { info: null, file: null, useImage: false, seq: 0 };
const STAGES = ["queue", "encode", "adapt", "candidates", "rescore", "metadata", "total"];

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function getJSON(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`HTTP ${response.status}: the server did not answer with JSON`);
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new Error(`${error.kind || "HTTP " + response.status}: ${error.message || "failed"}`);
  }
  return body;
}

async function loadInfo() {
  const info = await getJSON(await fetch("/info"));
  state.info = info;
  $("#set-info").textContent =
    `${info.set}: ${info.rows.toLocaleString()} items · ${info.encoder}` +
    (info.has_model ? " · QuARI model loaded" : " · no model (plain cosine only)");
  const mode = $("#mode");
  mode.replaceChildren(...info.modes.map((m) => new Option(m, m, false, m === info.default_mode)));
  $("#k").max = info.max_k;
  const compare = $("#compare");
  compare.disabled = !info.has_model;
  compare.closest("label").title = info.has_model ? "" : "needs a QuARI model (--model)";
  if (!info.text_queries) {
    $("#query").placeholder = "An item id, e.g. #12 (this service has no encoder)";
  }
  $("#drop-zone").hidden = !info.image_queries;
  // A model trained with the whitened-cosine blend: each search may send its own weight.
  const blended = info.blend_weight !== null && info.blend_weight !== undefined;
  $("#blend-label").hidden = !blended;
  if (blended) $("#blend").value = String(info.blend_weight);
}

function blendWeight() {
  if ($("#blend-label").hidden) return null;
  const text = $("#blend").value.trim();
  const a = Number(text);
  return text !== "" && a >= 0 && a <= 1 ? a : null;
}

function queryBody(mode) {
  const k = Math.max(1, Math.min(Number($("#k").value) || 10, state.info.max_k));
  const where = $("#where").value.trim();
  const options = { k, mode };
  if (where) options.where = where;
  const blend = blendWeight();
  if (blend !== null && mode !== "plain") options.blend_weight = blend;
  if (state.useImage && state.file) {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "query");
    for (const [key, value] of Object.entries(options)) form.append(key, String(value));
    return { body: form };
  }
  const text = $("#query").value.trim();
  if (!text) return null;
  const item = /^#(\d+)$/.exec(text);
  const query = item ? { item_id: Number(item[1]) } : { text };
  return {
    body: JSON.stringify({ ...query, ...options }),
    headers: { "Content-Type": "application/json" },
  };
}

function timingsText(ms) {
  return STAGES.filter((s) => s in ms)
    .map((s) => `${s} ${ms[s] < 10 ? ms[s].toFixed(2) : ms[s].toFixed(0)} ms`)
    .join(" · ");
}

function caption(metadata) {
  for (const key of ["label", "caption", "name", "title", "path"]) {
    if (typeof metadata[key] === "string" && metadata[key]) return metadata[key];
  }
  return "";
}

function renderColumn(column, title, data) {
  column.hidden = false;
  column.dataset.mode = data.mode;
  $(".title", column).textContent = title;
  $(".timings", column).textContent =
    `${timingsText(data.timings_ms)} · batch of ${data.batch_size}` +
    (data.notes.length ? ` · ${data.notes.join("; ")}` : "");
  const hits = data.results.map((hit) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = String(hit.id);
    li.title = `item ${hit.id} · rank ${hit.rank} · score ${hit.score.toFixed(4)} — click to search with it`;
    if (state.info.images) {
      const img = document.createElement("img");
      img.src = `/items/${hit.id}/image`;
      img.alt = `item ${hit.id}`;
      img.loading = "lazy";
      li.append(img);
    } else {
      const box = document.createElement("span");
      box.className = "noimg";
      box.textContent = `#${hit.id}`;
      li.append(box);
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = caption(hit.metadata) || `#${hit.id}`;
    li.append(score, text);
    return li;
  });
  $(".grid", column).replaceChildren(...hits);
}

async function search() {
  if (!state.info) return;
  const seq = ++state.seq;
  const chosen = $("#mode").value;
  const compare = $("#compare").checked && state.info.has_model;
  const main = compare && chosen === "plain" ? "adaptive" : chosen;
  const modes = compare ? [main, "plain"] : [main];
  const requests = modes.map(queryBody);
  if (requests.some((r) => r === null)) {
    setStatus("Type a query or drop an image.");
    return;
  }
  setStatus("Searching…");
  $("#results").classList.toggle("compare", compare);
  $("#results").classList.toggle("single", !compare);
  try {
    const answers = await Promise.all(
      requests.map(async (r) => getJSON(await fetch("/search", { method: "POST", ...r }))),
    );
    if (seq !== state.seq) return; // a newer search has started
    const blend = blendWeight();
    const quari = `QuARI (${main}${blend === null ? "" : `, blend ${blend}`})`;
    const title = !compare && main === "plain" ? "plain (cosine)" : quari;
    renderColumn($("#col-main"), title, answers[0]);
    if (compare) renderColumn($("#col-plain"), "plain (cosine baseline)", answers[1]);
    else $("#col-plain").hidden = true;
    const what = state.useImage && state.file ? `image ${state.file.name || ""}` : "query";
    setStatus(`${answers[0].results.length} results for the ${what}`);
  } catch (err) {
    if (seq === state.seq) setStatus(err.message, true);
  }
}

function useFile(file) {
  if (!file) return;
  state.file = file;
  state.useImage = true;
  const preview = $("#drop-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  search();
}

function setUp() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("#query").value.trim()) state.useImage = false;
    search();
  });
  $("#query").addEventListener("input", () => {
    state.useImage = false;
  });
  $("#file-input").addEventListener("change", (event) => useFile(event.target.files[0]));
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("#file-input").click();
  });
  $("#compare").addEventListener("change", search);
  $("#mode").addEventListener("change", search);
  $("#blend").addEventListener("change", search);
  $("#results").addEventListener("click", (event) => {
    const hit = event.target.closest(".hit");
    if (!hit) return;
    $("#query").value = `#${hit.dataset.id}`;
    state.useImage = false;
    search();
  });
  loadInfo().catch((err) => setStatus(`cannot reach the service: ${err.message}`, true));
}

setUp();
