// The captionkit page: upload images, show each one's caption and segmentation overlay.
// Plain JavaScript, no build step; it talks to the same server's /v1 API.
"use strict";

const PARALLEL = 4; // requests in flight at once; the server batches them
const $ = (selector) => document.querySelector(selector);
const items = []; // {name, file, image, card, caption, segment, error}
let apiKey = sessionStorage.getItem("captionkit-key") || "";
let segmenter = null;
let running = 0;
const waiting = [];

function headers() {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { body = null; }
  if (!response.ok) {
    const error = body && body.error;
    const message = (error && (error.message || error)) || `${response.status} ${response.statusText}`;
    throw Object.assign(new Error(String(message)), { status: response.status });
  }
  return body;
}

async function connect() {
  const health = await api("/healthz");
  $("#key-field").hidden = !health.auth;
  if (health.auth && !apiKey) {
    $("#model").textContent = "this server needs an API key";
    return;
  }
  try {
    const models = await api("/v1/models");
    const captioner = models.data.find((m) => m.task === "image-to-text");
    segmenter = models.data.find((m) => m.task === "image-segmentation") || null;
    $("#model").textContent = captioner.id + (segmenter ? ` · segmentation: ${segmenter.id}` : "");
    $("#overlay-options").hidden = !segmenter;
    // the segmenter drops regions below its threshold: the slider cannot show lower ones
    $("#min-score").min = String((segmenter && segmenter.min_score) || 0);
    redrawAll();
  } catch (error) {
    $("#model").textContent = error.status === 401 ? "wrong API key" : error.message;
  }
}

function options() {
  const form = new FormData();
  for (const [id, name] of [["#max-new-tokens", "max_new_tokens"], ["#num-beams", "num_beams"], ["#prompt", "prompt"]]) {
    const value = $(id).value.trim();
    if (value) form.append(name, value);
  }
  return form;
}

function addFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/") || !file.type);
  for (const file of images) {
    const item = { name: file.name, file, caption: null, segment: null, error: null };
    item.card = $("#card-template").content.firstElementChild.cloneNode(true);
    item.card.querySelector(".name").textContent = file.name;
    item.card.querySelector(".copy").addEventListener("click", () => copy(item));
    $("#results").append(item.card);
    items.push(item);
    const image = new Image();
    image.onload = () => { item.image = image; draw(item); };
    image.onerror = () => { item.card.querySelector("canvas").hidden = true; };
    image.src = URL.createObjectURL(file);
    enqueue(() => run(item));
  }
  updateButtons();
}

function enqueue(task) {
  waiting.push(task);
  pump();
}

function pump() {
  while (running < PARALLEL && waiting.length) {
    running += 1;
    waiting.shift()().finally(() => { running -= 1; status(); pump(); });
  }
  status();
}

function status() {
  const left = waiting.length + running;
  $("#status").textContent = left ? `${left} image${left > 1 ? "s" : ""} in progress…` : "";
}

async function run(item) {
  const form = options();
  form.append("image", item.file, item.file.name);
  const tasks = [api("/v1/caption", { method: "POST", body: form }).then((answer) => {
    item.caption = answer.results[0];
    item.caption.timings = answer.timings;
  })];
  if (segmenter) {
    const upload = new FormData();
    upload.append("image", item.file, item.file.name);
    tasks.push(api("/v1/segment", { method: "POST", body: upload }).then((answer) => {
      item.segment = answer.results[0];
    }));
  }
  const outcomes = await Promise.allSettled(tasks);
  const failed = outcomes.find((outcome) => outcome.status === "rejected");
  item.error = failed ? failed.reason.message : null;
  show(item);
  updateButtons();
}

function show(item) {
  const card = item.card;
  const caption = card.querySelector(".caption");
  caption.textContent = item.caption ? item.caption.caption : "";
  caption.classList.toggle("done", Boolean(item.caption));
  const score = card.querySelector(".score");
  const clip = item.caption && item.caption.clip_score;
  score.hidden = clip === null || clip === undefined;
  if (!score.hidden) score.textContent = `CLIPScore ${clip.toFixed(3)}`;
  const error = card.querySelector(".error");
  error.hidden = !item.error;
  error.textContent = item.error || "";
  card.querySelector(".copy").disabled = !item.caption;
  if (regions(item).length) $("#overlay-options").hidden = false;
  draw(item);
}

// --- the overlay -------------------------------------------------------------------------------

function regions(item) {
  // Segmentation regions and a caption's grounded phrases, each with the size its pixels refer to.
  const out = [];
  for (const source of [item.segment, item.caption]) {
    if (!source) continue;
    for (const region of source.regions || []) out.push({ ...region, width: source.width, height: source.height });
  }
  return out;
}

function visible(item) {
  const minimum = Number($("#min-score").value);
  return regions(item).filter((region) => region.score === undefined || region.score >= minimum);
}

function colour(label) {
  let hash = 0;
  for (const char of label) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 85% 50%)`;
}

function draw(item) {
  if (!item.image) return;
  const canvas = item.card.querySelector("canvas");
  const scale = Math.min(1, 1024 / Math.max(item.image.naturalWidth, item.image.naturalHeight));
  canvas.width = Math.round(item.image.naturalWidth * scale);
  canvas.height = Math.round(item.image.naturalHeight * scale);
  const context = canvas.getContext("2d");
  context.drawImage(item.image, 0, 0, canvas.width, canvas.height);
  const shown = visible(item);
  for (const region of shown) {
    const sx = canvas.width / region.width;
    const sy = canvas.height / region.height;
    const tint = colour(region.label);
    if ($("#show-masks").checked && region.mask) {
      context.drawImage(maskCanvas(region, tint), 0, 0, canvas.width, canvas.height);
    }
    if ($("#show-boxes").checked) {
      const [x0, y0, x1, y1] = region.box;
      context.strokeStyle = tint;
      context.lineWidth = Math.max(2, canvas.width / 300);
      context.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
      const text = region.score === undefined ? region.label : `${region.label} ${region.score.toFixed(2)}`;
      context.font = `${Math.max(12, Math.round(canvas.width / 45))}px system-ui, sans-serif`;
      const width = context.measureText(text).width + 6;
      const height = Math.max(14, Math.round(canvas.width / 38));
      context.fillStyle = tint;
      context.fillRect(x0 * sx, Math.max(0, y0 * sy - height), width, height);
      context.fillStyle = "#fff";
      context.fillText(text, x0 * sx + 3, Math.max(height, y0 * sy) - 4);
    }
  }
  legend(item, shown);
}

function legend(item, shown) {
  const list = item.card.querySelector(".legend");
  list.replaceChildren();
  const counts = new Map();
  for (const region of shown) counts.set(region.label, (counts.get(region.label) || 0) + 1);
  for (const [label, count] of [...counts].sort((a, b) => b[1] - a[1])) {
    const entry = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(label);
    entry.append(swatch, `${label}${count > 1 ? ` ×${count}` : ""}`);
    list.append(entry);
  }
}

const masks = new WeakMap();

function maskCanvas(region, tint) {
  // A COCO RLE mask as a tinted, half-transparent image at the mask's own size (cached).
  if (masks.has(region.mask)) return masks.get(region.mask);
  const [height, width] = region.mask.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = tint;
  context.fillRect(0, 0, 1, 1);
  const [r, g, b] = context.getImageData(0, 0, 1, 1).data;
  const pixels = context.createImageData(width, height);
  const counts = typeof region.mask.counts === "string" ? rleCounts(region.mask.counts) : region.mask.counts;
  let at = 0;
  counts.forEach((run, index) => {
    if (index % 2 === 1) {
      // COCO masks run down columns: position p is row p % height of column p / height
      for (let p = at; p < at + run; p += 1) {
        const offset = ((p % height) * width + Math.floor(p / height)) * 4;
        pixels.data.set([r, g, b, 110], offset);
      }
    }
    at += run;
  });
  context.putImageData(pixels, 0, 0);
  masks.set(region.mask, canvas);
  return canvas;
}

function rleCounts(text) {
  // pycocotools' compressed counts: 5 bits per character, sign-extended, each run after the
  // second stored as the difference from the run two before it.
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let shift = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      value |= (c & 0x1f) << shift;
      more = (c & 0x20) !== 0;
      p += 1;
      shift += 5;
      if (!more && (c & 0x10)) value |= -1 << shift;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

// --- copy and download -------------------------------------------------------------------------

async function copy(item) {
  const button = item.card.querySelector(".copy");
  try {
    await navigator.clipboard.writeText(item.caption.caption);
    button.textContent = "Copied";
  } catch {
    const selection = window.getSelection();
    const range = document.createRange();
    range.selectNodeContents(item.card.querySelector(".caption"));
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = "Copy caption"; }, 1500);
}

function results() {
  return items.map((item) => ({
    name: item.name,
    caption: item.caption ? item.caption.caption : null,
    clip_score: item.caption ? item.caption.clip_score : null,
    candidates: item.caption ? item.caption.candidates : [],
    width: item.segment ? item.segment.width : item.caption && item.caption.width,
    height: item.segment ? item.segment.height : item.caption && item.caption.height,
    regions: regions(item).map(({ width, height, ...region }) => region),
    error: item.error,
  }));
}

function captionsTxt() {
  // captionkit's captions.txt: `name: caption` lines; a name with `: `, a backslash or a line
  // break is escaped and its line starts with a backslash.
  return items.filter((item) => item.caption).map((item) => {
    const escaped = item.name.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\r/g, "\\r")
      .replace(/: /g, "\\: ");
    const caption = item.caption.caption.split(/\s+/).join(" ").trim();
    return `${escaped === item.name ? "" : "\\"}${escaped}: ${caption}\n`;
  }).join("");
}

function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function updateButtons() {
  const done = items.some((item) => item.caption);
  $("#download-json").disabled = !done;
  $("#download-txt").disabled = !done;
  $("#clear").disabled = !items.length;
}

// --- wiring ------------------------------------------------------------------------------------

function redrawAll() {
  $("#min-score-value").textContent = Number($("#min-score").value).toFixed(2);
  items.forEach(draw);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("#drop");
  $("#files").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  for (const id of ["#min-score", "#show-masks", "#show-boxes"]) $(id).addEventListener("input", redrawAll);
  $("#api-key").value = apiKey;
  $("#api-key").addEventListener("change", (event) => {
    apiKey = event.target.value.trim();
    sessionStorage.setItem("captionkit-key", apiKey);
    connect();
  });
  $("#download-json").addEventListener("click", () =>
    download("captions.json", JSON.stringify(results(), null, 2), "application/json"));
  $("#download-txt").addEventListener("click", () => download("captions.txt", captionsTxt(), "text/plain"));
  $("#clear").addEventListener("click", () => {
    items.splice(0).forEach((item) => { URL.revokeObjectURL(item.image && item.image.src); item.card.remove(); });
    updateButtons();
  });
  $("#overlay-options").hidden = true;
  redrawAll();
  connect().catch((error) => { $("#model").textContent = error.message; });
});
