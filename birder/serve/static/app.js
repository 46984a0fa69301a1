// The birder page: pick or drop a photo, post it to /v1/classify, draw the top species as bars.
// Plain browser JavaScript with no dependencies: the page must work without any CDN.
"use strict";

const TOP_K = 5;

const elements = {
  dropZone: document.getElementById("drop-zone"),
  input: document.getElementById("file-input"),
  error: document.getElementById("error"),
  result: document.getElementById("result"),
  preview: document.getElementById("preview"),
  fileName: document.getElementById("file-name"),
  predictions: document.getElementById("predictions"),
  answer: document.getElementById("answer"),
  timing: document.getElementById("timing"),
  modelName: document.getElementById("model-name"),
  modelClasses: document.getElementById("model-classes"),
};

let previewUrl = null;
let currentPhoto = null; // the photo (File) on show: classified, explained and searched with the same bytes
let similarServed = false; // /v1/models says whether the server has an index (birder-serve --index)
let detectServed = false; // ... and whether it has a detector (birder-serve --detector): boxes over the photo

function showError(message) {
  elements.error.textContent = message;
  elements.error.hidden = false;
}

function clearError() {
  elements.error.textContent = "";
  elements.error.hidden = true;
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    const model = body.models[0];
    similarServed = Boolean(body.similar);
    detectServed = Boolean(body.detect);
    elements.modelName.textContent = model.name;
    elements.modelClasses.textContent = `(${model.num_classes} species)`;
  } catch (err) {
    elements.modelName.textContent = "unavailable";
    showError(`Cannot reach the server: ${err.message}`);
  }
}

function renderPredictions(body) {
  elements.predictions.replaceChildren();
  for (const prediction of body.predictions) {
    const percent = (prediction.probability * 100).toFixed(1);

    const item = document.createElement("li");
    item.className = "prediction";

    const label = document.createElement("div");
    label.className = "label";
    const species = document.createElement("span");
    species.className = "species";
    species.textContent = prediction.species; // textContent: class names are never parsed as HTML
    const probability = document.createElement("span");
    probability.className = "probability";
    probability.textContent = `${percent}%`;
    label.append(species, probability);

    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${prediction.species}: ${percent}%`);
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${Math.max(0.5, prediction.probability * 100)}%`;
    bar.append(fill);

    item.append(label, bar);
    elements.predictions.append(item);
  }
  const timing = body.timing_ms;
  elements.timing.textContent =
    `${body.model} · ${timing.total.toFixed(0)} ms (inference ${timing.inference.toFixed(0)} ms, ` +
    `batch of ${body.batch_size}) · image ${body.image.width}×${body.image.height}`;
}

// The decided answer (label, rank, label_probability): a species, "genus Turdus 92.0%", "unknown" or "uncertain".
function renderAnswer(body) {
  const answer = elements.answer;
  answer.replaceChildren();
  if (!body.label) {
    answer.hidden = true;
    return;
  }
  const label = document.createElement("strong");
  label.className = "answer-label";
  label.textContent = body.rank && body.rank !== "species" ? `${body.rank} ${body.label}` : body.label;
  answer.append(label);
  if (typeof body.label_probability === "number") {
    const probability = document.createElement("span");
    probability.className = "answer-probability";
    probability.textContent = `${(body.label_probability * 100).toFixed(1)}%`;
    answer.append(" ", probability);
  }
  answer.dataset.rank = body.rank || body.label; // species, genus, family, order, unknown or uncertain
  answer.hidden = false;
}

async function classify(file) {
  if (!file) {
    return;
  }
  clearError();
  if (previewUrl) {
    URL.revokeObjectURL(previewUrl);
  }
  previewUrl = URL.createObjectURL(file);
  elements.preview.src = previewUrl;
  currentPhoto = file; // the explanation overlay and similar photos are asked for with the same bytes
  elements.fileName.textContent = file.name;
  elements.predictions.replaceChildren();
  elements.answer.hidden = true;
  elements.timing.textContent = "Classifying…";
  elements.result.hidden = false;
  elements.dropZone.classList.add("busy");
  await modelInfoLoaded;
  if (detectServed) {
    detect(file); // alongside: the boxes come when they come
  }

  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await fetch(`/v1/classify?top_k=${TOP_K}`, { method: "POST", body: form });
    let body;
    try {
      body = await response.json();
    } catch {
      body = { error: `the server answered ${response.status} ${response.statusText}` };
    }
    if (!response.ok) {
      elements.timing.textContent = "";
      showError(body.error || `the server answered ${response.status}`);
      return;
    }
    renderPredictions(body);
    renderAnswer(body);
  } catch (err) {
    elements.timing.textContent = "";
    showError(`Request failed: ${err.message}`);
  } finally {
    elements.dropZone.classList.remove("busy");
  }
}

elements.input.addEventListener("change", () => {
  classify(elements.input.files[0]);
  elements.input.value = ""; // choosing the same file again classifies it again
});

for (const type of ["dragenter", "dragover"]) {
  elements.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    elements.dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  elements.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    elements.dropZone.classList.remove("dragging");
  });
}
elements.dropZone.addEventListener("drop", (event) => {
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) {
    classify(file);
  }
});

// A photo chosen before /v1/models answered waits for it: only then is it known whether boxes (and similar photos)
// are served.
const modelInfoLoaded = loadModelInfo();

// Explanation overlay and similar photos: they follow the preview, whichever way the photo came in.
const extras = {
  toggle: document.getElementById("explain-toggle"),
  overlay: document.getElementById("explain-overlay"),
  similar: document.getElementById("similar"),
  similarPhotos: document.getElementById("similar-photos"),
};
let overlayFor = null; // the Blob whose overlay is loaded

async function postPhoto(url, blob) {
  const form = new FormData();
  form.append("image", blob, "photo");
  const response = await fetch(url, { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) {
    throw new Error(body.error || `the server answered ${response.status}`);
  }
  return body;
}

async function showOverlay() {
  extras.overlay.hidden = !extras.toggle.checked;
  if (!extras.toggle.checked || !currentPhoto || overlayFor === currentPhoto) {
    return;
  }
  const photo = currentPhoto;
  try {
    const body = await postPhoto("/v1/explain?method=rollout", photo);
    if (photo === currentPhoto) {
      extras.overlay.src = body.overlay;
      overlayFor = photo;
    }
  } catch (err) {
    showError(`No explanation: ${err.message}`);
  }
}

async function showSimilar() {
  await modelInfoLoaded;
  if (!currentPhoto || !similarServed) {
    return;
  }
  try {
    const body = await postPhoto("/v1/similar?k=8", currentPhoto);
    extras.similarPhotos.replaceChildren();
    for (const result of body.results) {
      const figure = document.createElement("figure");
      figure.className = "similar-photo";
      const image = document.createElement("img");
      image.src = result.photo_url;
      image.alt = result.path;
      const caption = document.createElement("figcaption");
      caption.textContent = `${(result.similarity * 100).toFixed(1)}% · ${result.prediction || ""}`;
      caption.title = result.path;
      figure.append(image, caption);
      extras.similarPhotos.append(figure);
    }
    extras.similar.hidden = false;
  } catch (err) {
    extras.similar.hidden = true; // no index on this server (404), or it failed: the page works without
  }
}

elements.preview.addEventListener("load", () => {
  extras.overlay.hidden = true;
  showOverlay();
  showSimilar();
});
extras.toggle.addEventListener("change", showOverlay);

// Boxes over the photo (birder-serve --detector): each detected bird with its answer, drawn where the photo is
// shown (object-fit: contain, anchored top-left), laid out again when the page is resized.
const detection = {
  layer: document.getElementById("det-boxes"),
  panel: document.getElementById("detections-panel"),
  list: document.getElementById("detections"),
};
let detected = null; // {photo, body} of the last /v1/detect answer

function boxCaption(box) {
  const label = box.rank && box.rank !== "species" ? `${box.rank} ${box.label}` : box.label || box.predictions[0].species;
  const probability = typeof box.label_probability === "number" ? box.label_probability : box.predictions[0].probability;
  return box.label === "unknown" || box.label === "uncertain" ? label : `${label} ${(probability * 100).toFixed(0)}%`;
}

function layoutBoxes() {
  detection.layer.replaceChildren();
  const preview = elements.preview;
  if (!detected || detected.photo !== currentPhoto || !preview.naturalWidth) {
    return;
  }
  const scale = Math.min(preview.clientWidth / preview.naturalWidth, preview.clientHeight / preview.naturalHeight);
  const factor = (preview.naturalWidth * scale) / detected.body.image.width; // photo pixels -> page pixels
  detected.body.detections.forEach((box, index) => {
    const [x1, y1, x2, y2] = box.box;
    const outline = document.createElement("div");
    outline.className = `det-box det-colour-${index % 4}`;
    outline.style.left = `${x1 * factor}px`;
    outline.style.top = `${y1 * factor}px`;
    outline.style.width = `${(x2 - x1) * factor}px`;
    outline.style.height = `${(y2 - y1) * factor}px`;
    const label = document.createElement("span");
    label.className = "det-label";
    label.textContent = boxCaption(box);
    outline.append(label);
    detection.layer.append(outline);
  });
  detection.layer.hidden = false;
}

function listDetections(body) {
  detection.list.replaceChildren();
  for (const box of body.detections) {
    const item = document.createElement("li");
    item.textContent = `${boxCaption(box)} (${box.det_class} ${(box.det_score * 100).toFixed(0)}%)`;
    detection.list.append(item);
  }
  if (!body.detections.length) {
    const item = document.createElement("li");
    item.className = "det-none";
    item.textContent = "No bird found by the detector.";
    detection.list.append(item);
  }
  detection.panel.hidden = false;
}

async function detect(file) {
  detected = null;
  detection.layer.replaceChildren();
  detection.panel.hidden = true;
  try {
    const body = await postPhoto("/v1/detect", file);
    if (file !== currentPhoto) {
      return; // another photo came meanwhile
    }
    detected = { photo: file, body };
    listDetections(body);
    layoutBoxes();
  } catch (err) {
    showError(`No detections: ${err.message}`);
  }
}

elements.preview.addEventListener("load", layoutBoxes);
window.addEventListener("resize", layoutBoxes);
