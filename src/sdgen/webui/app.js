// sdgen web UI: plain JavaScript over the server's APIs (no build step).
// Jobs go to POST /api/v1/jobs; progress and previews arrive as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", job: null, events: null, lastSeed: null, init: null, painting: false };

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const detail = body && body.detail;
    const message = Array.isArray(detail)
      ? detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("\n")
      : detail || response.statusText;
    throw new Error(message);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function option(select, value, label) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = label || value;
  select.append(item);
}

async function loadLists() {
  const [models, samplers, schedulers, options] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/options"),
  ]);
  models.forEach((m) => option($("model"), m.title));
  $("model").value = options.sd_model_checkpoint;
  samplers.forEach((s) => option($("sampler_name"), s.name));
  $("sampler_name").value = "Euler a";
  schedulers.forEach((s) => option($("scheduler"), s.name, s.label));
}

// ---- the form -------------------------------------------------------------------------------

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: numberOrNull("steps"), cfg_scale: numberOrNull("cfg_scale"), seed: numberOrNull("seed") ?? -1,
    width: numberOrNull("width"), height: numberOrNull("height"),
    n_iter: numberOrNull("n_iter"), batch_size: numberOrNull("batch_size"),
    override_settings: { sd_model_checkpoint: $("model").value },
  };
  if (state.mode === "img2img") {
    if (!state.init) throw new Error("Image to image: drop or choose an input image first");
    body.init_images = [state.init.toDataURL("image/png")];
    body.denoising_strength = numberOrNull("denoising_strength");
    if ($("use-mask").checked && state.maskPainted) body.mask = state.mask.toDataURL("image/png");
  }
  return body;
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  }
  $("img2img").hidden = mode !== "img2img";
}

// Fill the form from parsed infotext (png-info `parameters`, or a gallery item).
function applyParameters(p) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", p["Prompt"]);
  set("negative_prompt", p["Negative prompt"]);
  set("steps", p["Steps"]);
  set("cfg_scale", p["CFG scale"]);
  set("seed", p["Seed"]);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  set("denoising_strength", p["Denoising strength"]);
  if (p["Sampler"]) set("sampler_name", p["Sampler"]);
  const schedule = [...$("scheduler").options].find((o) => o.textContent === p["Schedule type"]);
  if (schedule) $("scheduler").value = schedule.value;
}

// ---- generation -----------------------------------------------------------------------------

async function generate(event) {
  if (event) event.preventDefault();
  if (state.job) return;
  showError("");
  let accepted;
  try {
    accepted = await api("/api/v1/jobs", { method: "POST", body: JSON.stringify(payload()) });
  } catch (error) {
    showError(error.message);
    return;
  }
  state.job = accepted.id;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = accepted.position ? `queued (${accepted.position} ahead)` : "starting";
  follow(accepted);
}

function follow(accepted) {
  const events = new EventSource(accepted.events);
  state.events = events;
  events.addEventListener("progress", (message) => {
    const p = JSON.parse(message.data);
    if (p.state === "queued") {
      $("progress-text").textContent = `queued (${p.position} ahead)`;
    } else if (p.state === "running") {
      $("progress").value = p.progress || 0;
      const eta = p.eta ? `, about ${Math.ceil(p.eta)} s left` : "";
      $("progress-text").textContent = p.textinfo || `step ${p.step}/${p.steps}, image ${p.job_no + 1}/${p.job_count}${eta}`;
    }
    if (p.preview) {
      $("preview").src = p.preview;
      $("preview").hidden = false;
    }
  });
  events.addEventListener("done", (message) => {
    events.close();
    finish(JSON.parse(message.data));
  });
  events.onerror = () => {
    // The server went away or restarted: poll the job instead of streaming.
    if (events.readyState === EventSource.CLOSED) setTimeout(() => poll(accepted), 1000);
  };
}

async function poll(accepted) {
  try {
    const job = await api(accepted.url);
    if (["done", "failed", "interrupted", "cancelled"].includes(job.state)) return finish(job);
  } catch (error) { /* not back yet */ }
  setTimeout(() => poll(accepted), 1000);
}

function finish(job) {
  state.job = null;
  state.events = null;
  $("generate").disabled = false;
  $("interrupt").disabled = true;
  $("progress").value = 1;
  $("preview").hidden = true;
  $("progress-text").textContent = job.state === "done" ? "done" : `${job.state}${job.error ? ": " + job.error : ""}`;
  if (job.state === "failed") showError(job.error);
  const results = $("results");
  results.replaceChildren();
  for (const image of job.images || []) {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.prompt;
    img.title = `seed ${image.seed}`;
    results.append(img);
  }
  if (job.images && job.images.length) {
    state.lastSeed = job.images[0].seed;
    $("infotext").textContent = job.images[0].infotext;
  }
  loadGallery();
}

async function interrupt() {
  if (state.job) await api(`/api/v1/jobs/${state.job}`, { method: "DELETE" }).catch(() => {});
}

// ---- gallery --------------------------------------------------------------------------------

let searchTimer = null;
async function loadGallery() {
  const q = encodeURIComponent($("search").value.trim());
  const { images } = await api(`/api/v1/gallery?limit=120&q=${q}`);
  const gallery = $("gallery");
  gallery.replaceChildren();
  for (const image of images) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = image.prompt;
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.prompt;
    img.loading = "lazy";
    button.append(img);
    button.addEventListener("click", () => showImage(image));
    gallery.append(button);
  }
}

function showImage(image) {
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.prompt;
  $("results").replaceChildren(img);
  $("infotext").textContent = image.infotext;
  readParameters(image.infotext);
}

function readParameters(infotext) {
  // A1111's grammar (the same regular expression as sdgen.pipelines.infotext): the last line holds
  // the `key: value` pairs when it has at least three, values JSON-quoted if they hold , : or newlines.
  const lines = infotext.trim().split("\n");
  const last = lines[lines.length - 1];
  const pairs = [...last.matchAll(/\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g)];
  const p = {};
  if (pairs.length >= 3) {
    lines.pop();
    for (const [, key, value] of pairs) p[key] = value.startsWith('"') ? JSON.parse(value) : value;
  }
  const negative = lines.findIndex((line) => line.startsWith("Negative prompt:"));
  p["Prompt"] = (negative < 0 ? lines : lines.slice(0, negative)).join("\n");
  p["Negative prompt"] = negative < 0 ? "" : lines.slice(negative).join("\n").slice("Negative prompt:".length).trim();
  const size = /^(\d+)x(\d+)$/.exec(p["Size"] || "");
  if (size) [p["Size-1"], p["Size-2"]] = [size[1], size[2]];
  applyParameters(p);
}

// ---- img2img: input image and the mask canvas -----------------------------------------------

function loadInitImage(file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const init = document.createElement("canvas");
    [init.width, init.height] = [img.naturalWidth, img.naturalHeight];
    init.getContext("2d").drawImage(img, 0, 0);
    state.init = init;
    state.mask = document.createElement("canvas");
    [state.mask.width, state.mask.height] = [init.width, init.height];
    clearMask();
    const canvas = $("canvas");
    [canvas.width, canvas.height] = [init.width, init.height];
    canvas.style.width = `${Math.max(256, init.width)}px`;
    $("paint").hidden = false;
    redraw();
    URL.revokeObjectURL(url);
  };
  img.src = url;
}

function clearMask() {
  const context = state.mask.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, state.mask.width, state.mask.height);
  state.maskPainted = false;
  redraw();
}

function redraw() {
  if (!state.init) return;
  const context = $("canvas").getContext("2d");
  context.globalAlpha = 1;
  context.drawImage(state.init, 0, 0);
  // Show the mask as a translucent red layer: white mask pixels -> red.
  const overlay = document.createElement("canvas");
  [overlay.width, overlay.height] = [state.mask.width, state.mask.height];
  const o = overlay.getContext("2d");
  o.drawImage(state.mask, 0, 0);
  o.globalCompositeOperation = "multiply";
  o.fillStyle = "rgb(255,0,0)";
  o.fillRect(0, 0, overlay.width, overlay.height);
  context.globalAlpha = 0.5;
  context.globalCompositeOperation = "lighter";
  context.drawImage(overlay, 0, 0);
  context.globalCompositeOperation = "source-over";
  context.globalAlpha = 1;
}

function paintAt(event) {
  const canvas = $("canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * (canvas.width / box.width);
  const y = (event.clientY - box.top) * (canvas.height / box.height);
  const radius = Number($("brush").value) * (canvas.width / box.width) / 2;
  const context = state.mask.getContext("2d");
  context.fillStyle = "white";
  context.beginPath();
  context.arc(x, y, radius, 0, 2 * Math.PI);
  context.fill();
  state.maskPainted = true;
  redraw();
}

// ---- dropping a PNG anywhere reads its parameters back -------------------------------------

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = reject;
    reader.readAsDataURL(file);
  });
}

async function dropParameters(file) {
  try {
    const info = await api("/sdapi/v1/png-info", { method: "POST", body: JSON.stringify({ image: await fileToBase64(file) }) });
    if (!info.info) return showError(`${file.name}: no generation parameters in this image`);
    showError("");
    applyParameters(info.parameters);
    $("infotext").textContent = info.info;
  } catch (error) {
    showError(error.message);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("dice").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  for (const tab of document.querySelectorAll(".tabs button")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadGallery, 250); });
  $("init-file").addEventListener("change", (e) => { if (e.target.files[0]) loadInitImage(e.target.files[0]); });
  $("clear-mask").addEventListener("click", clearMask);
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (e) => { state.painting = true; canvas.setPointerCapture(e.pointerId); paintAt(e); });
  canvas.addEventListener("pointermove", (e) => { if (state.painting) paintAt(e); });
  canvas.addEventListener("pointerup", () => { state.painting = false; });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
    if (e.key === "Escape" && state.job) interrupt();
  });
  // Drop on the img2img zone: the input image. Drop anywhere else: read its parameters.
  document.addEventListener("dragover", (e) => { e.preventDefault(); $("dropcover").hidden = false; });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("dropcover").hidden = true; });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    $("dropcover").hidden = true;
    const file = e.dataTransfer.files[0];
    if (!file) return;
    if (state.mode === "img2img" && $("img2img").contains(e.target)) loadInitImage(file);
    else dropParameters(file);
  });
}

wire();
loadLists().then(loadGallery).catch((error) => showError(`cannot reach the server: ${error.message}`));
api("/api/v1/health").then((h) => { $("status").textContent = h.loaded ? `loaded: ${h.loaded}` : ""; }).catch(() => {});
