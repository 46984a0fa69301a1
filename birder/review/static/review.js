// birder-review: one screen per event (or photo), keyboard first. Everything comes from this server's /api.
"use strict";

const params = new URLSearchParams(window.location.search);
const token = params.get("token") || "";
const state = {
  session: null,
  unit: null,
  reviewer: params.get("reviewer") || "",
  client: randomId(),
  skipped: [],
  shownAt: 0,
  selectedBox: 0,
  boxLabels: {},
  matches: [],
  activeMatch: 0,
  busy: false,
};

function randomId() {
  // crypto.randomUUID exists only in secure contexts; a page shared over a plain http address is not one
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const $ = (selector) => document.querySelector(selector);

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

async function api(path, body) {
  const options = { headers: {} };
  if (token) options.headers["X-Review-Token"] = token;
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const payload = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(payload.error || `HTTP ${response.status}`);
  return payload;
}

function showError(message) {
  const error = $("#error");
  error.textContent = message;
  error.hidden = !message;
}

function setStatus(message) {
  $("#status").textContent = message;
}

function percent(p) {
  return p === null || p === undefined ? "" : (p * 100).toFixed(1) + "%";
}

// ---------------------------------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------------------------------

function render(payload) {
  if (payload.progress) {
    $("#progress").textContent = `${payload.progress.decided} of ${payload.progress.total} decided`;
  }
  if (payload.species_left) renderSpeciesLeft(payload.species_left);
  const unit = payload.unit;
  state.unit = unit;
  state.shownAt = performance.now();
  state.selectedBox = 0;
  state.boxLabels = {};
  closeSearch();
  $("#count").value = "";
  $("#comment").value = "";
  $("#done").hidden = unit !== null;
  $("#panel").classList.toggle("empty", unit === null);
  const photos = $("#photos");
  photos.replaceChildren();
  if (unit === null) {
    $("#unit-id").textContent = "";
    $("#unit-camera").textContent = "";
    $("#unit-time").textContent = "";
    $("#answer .answer-label").textContent = "";
    $("#alternatives").replaceChildren();
    $("#boxes-panel").hidden = true;
    return;
  }
  $("#unit-id").textContent = unit.id;
  $("#unit-id").dataset.kind = unit.kind;
  $("#unit-camera").textContent = unit.camera;
  $("#unit-time").textContent = unit.start || "";
  for (const photo of unit.photos) photos.append(photoFigure(unit, photo));
  const answer = unit.answer;
  $("#answer .answer-label").textContent = answer.label;
  $("#answer .answer-rank").textContent = answer.rank && answer.rank !== "species" ? answer.rank : "";
  $("#answer .answer-probability").textContent = percent(answer.probability);
  $("#answer .unknown-score").textContent =
    answer.unknown_score === null ? "" : `unknown score ${answer.unknown_score.toPrecision(3)}`;
  const decided = unit.latest;
  $("#decided").hidden = !decided;
  if (decided) {
    const labels = decided.labels.map((l) => (l.box ? `${l.box} ${l.label}` : l.label)).join(", ");
    $("#decided").textContent = `decided by ${decided.reviewer}: ${labels}`;
  }
  renderAlternatives();
  renderBoxes();
}

function photoFigure(unit, photo) {
  const figure = document.createElement("figure");
  figure.className = "photo-frame";
  if (photo.missing) {
    const missing = document.createElement("div");
    missing.className = "missing";
    missing.textContent = `missing: ${photo.path} was moved or deleted since the run (a decision is still possible)`;
    figure.append(missing);
  } else {
    const image = document.createElement("img");
    image.className = "photo";
    image.alt = photo.name;
    image.src = withToken(`/api/units/${unit.index}/photos/${photo.number}`);
    figure.append(image);
    if (photo.size) {
      const [width, height] = photo.size;
      unit.boxes.forEach((box, position) => {
        if (box.photo !== photo.number) return;
        const outline = document.createElement("div");
        outline.className = "box";
        outline.dataset.position = position;
        const [x1, y1, x2, y2] = box.xyxy;
        outline.style.left = `${(100 * x1) / width}%`;
        outline.style.top = `${(100 * y1) / height}%`;
        outline.style.width = `${(100 * (x2 - x1)) / width}%`;
        outline.style.height = `${(100 * (y2 - y1)) / height}%`;
        const label = document.createElement("span");
        label.className = "box-label";
        outline.append(label);
        figure.append(outline);
      });
    }
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${photo.name}${photo.taken ? " · " + photo.taken : ""}`;
  figure.append(caption);
  return figure;
}

function currentTop() {
  const unit = state.unit;
  if (!unit) return [];
  if (unit.boxes.length) return unit.boxes[state.selectedBox].answer.top;
  return unit.answer.top;
}

function renderAlternatives() {
  const list = $("#alternatives");
  list.replaceChildren();
  currentTop().slice(0, 5).forEach((entry, position) => {
    const item = document.createElement("li");
    item.className = "alternative";
    const key = document.createElement("kbd");
    key.textContent = String(position + 1);
    const name = document.createElement("span");
    name.className = "species";
    name.textContent = entry.name;
    const probability = document.createElement("span");
    probability.className = "probability muted";
    probability.textContent = percent(entry.probability);
    item.append(key, " ", name, " ", probability);
    list.append(item);
  });
}

function boxLabel(position) {
  const box = state.unit.boxes[position];
  return state.boxLabels[box.key] || box.answer.label;
}

function renderBoxes() {
  const unit = state.unit;
  $("#boxes-panel").hidden = !unit.boxes.length;
  const list = $("#box-list");
  list.replaceChildren();
  unit.boxes.forEach((box, position) => {
    const item = document.createElement("li");
    item.className = "box-entry" + (position === state.selectedBox ? " selected" : "");
    item.dataset.key = box.key;
    const changed = state.boxLabels[box.key] && state.boxLabels[box.key] !== box.answer.label;
    item.textContent = `box ${box.key}: ${boxLabel(position)}` +
      (changed ? ` (machine: ${box.answer.label})` : ` ${percent(box.answer.probability)}`);
    list.append(item);
  });
  document.querySelectorAll(".box").forEach((outline) => {
    const position = Number(outline.dataset.position);
    outline.classList.toggle("selected", position === state.selectedBox);
    outline.querySelector(".box-label").textContent = boxLabel(position);
  });
}

function renderSpeciesLeft(rows) {
  const body = $("#species-left tbody");
  body.replaceChildren();
  for (const row of rows.slice(0, 12)) {
    const line = document.createElement("tr");
    const name = document.createElement("td");
    name.textContent = row.species;
    const value = document.createElement("td");
    value.textContent = row.expected_wrong.toFixed(2);
    line.append(name, value);
    body.append(line);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Decisions
// ---------------------------------------------------------------------------------------------------------------------

async function submit(labels) {
  if (!state.unit || state.busy) return;
  const count = $("#count").value;
  const decision = {
    decision_id: randomId(),
    unit: state.unit.id,
    reviewer: state.reviewer,
    client: state.client,
    labels,
    count: count === "" ? null : Number(count),
    comment: $("#comment").value,
    seconds: (performance.now() - state.shownAt) / 1000,
  };
  state.busy = true;
  try {
    // A lost answer is retried with the same decision_id: the server writes it once
    let payload = null;
    for (let attempt = 0; payload === null; attempt++) {
      try {
        payload = await api("/api/decisions", decision);
      } catch (error) {
        if (attempt >= 2 || !(error instanceof TypeError)) throw error;
      }
    }
    showError("");
    setStatus(`saved ${decision.unit}: ${labels.map((l) => l.label).join(", ")}`);
    render(payload);
  } catch (error) {
    showError(error.message);
  } finally {
    state.busy = false;
  }
}

function decideWith(label) {
  const unit = state.unit;
  if (!unit) return;
  if (unit.boxes.length) {
    state.boxLabels[unit.boxes[state.selectedBox].key] = label;
    if (state.selectedBox < unit.boxes.length - 1) state.selectedBox++;
    renderAlternatives();
    renderBoxes();
    return;
  }
  submit([{ label }]);
}

function accept() {
  const unit = state.unit;
  if (!unit) return;
  if (unit.boxes.length) {
    submit(unit.boxes.map((box, position) => ({ box: box.key, label: boxLabel(position) })));
    return;
  }
  // An abstention accepted is "no species named": unknown
  const label = ["uncertain", ""].includes(unit.answer.label) ? "unknown" : unit.answer.label;
  submit([{ label }]);
}

async function undo() {
  if (state.busy) return;
  state.busy = true;
  try {
    const payload = await api("/api/undo", { reviewer: state.reviewer, undo_id: randomId() });
    showError("");
    if (payload.unit === null) {
      setStatus("nothing to undo");
      return;
    }
    setStatus(`undone: ${payload.unit.id}`);
    render(payload);
  } catch (error) {
    showError(error.message);
  } finally {
    state.busy = false;
  }
}

async function next() {
  const query = new URLSearchParams({ reviewer: state.reviewer, client: state.client, skip: state.skipped.join(",") });
  try {
    render(await api(`/api/next?${query}`));
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

function skip() {
  if (!state.unit) return;
  state.skipped.push(state.unit.id);
  setStatus(`skipped ${state.unit.id}`);
  next();
}

// ---------------------------------------------------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------------------------------------------------

let searchTimer = null;

function openSearch(text) {
  const input = $("#search");
  input.value = text;
  input.focus();
  lookUp();
}

function closeSearch() {
  const input = $("#search");
  input.value = "";
  state.matches = [];
  $("#search-results").replaceChildren();
  if (document.activeElement === input) input.blur();
}

function lookUp() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const text = $("#search").value;
    try {
      const payload = await api(`/api/search?q=${encodeURIComponent(text)}`);
      if ($("#search").value !== text) return; // typed on meanwhile
      state.matches = payload.matches;
      state.activeMatch = 0;
      renderMatches();
    } catch (error) {
      showError(error.message);
    }
  }, 60);
}

function renderMatches() {
  const list = $("#search-results");
  list.replaceChildren();
  state.matches.forEach((match, position) => {
    const item = document.createElement("li");
    item.className = "match" + (position === state.activeMatch ? " active" : "");
    item.textContent = match.name;
    const rank = document.createElement("span");
    rank.className = "muted";
    rank.textContent = match.rank === "species" ? "" : ` ${match.rank}`;
    item.append(rank);
    list.append(item);
  });
}

async function pickMatch() {
  const text = $("#search").value.trim();
  clearTimeout(searchTimer);
  if (text && (!state.matches.length || state.matches.every((m) => !m.name.toLowerCase().includes(text.toLowerCase())))) {
    // Results of an earlier text, or none yet: ask now
    try {
      state.matches = (await api(`/api/search?q=${encodeURIComponent(text)}`)).matches;
      state.activeMatch = 0;
    } catch (error) {
      showError(error.message);
      return;
    }
  }
  const match = state.matches[state.activeMatch];
  const label = match ? match.name : text; // nothing matches: the name as typed (a species the model lacks)
  closeSearch();
  if (label) decideWith(label);
}

// ---------------------------------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------------------------------

function onSearchKey(event) {
  if (event.key === "Enter") {
    event.preventDefault();
    pickMatch();
  } else if (event.key === "Escape") {
    event.preventDefault();
    closeSearch();
  } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    const step = event.key === "ArrowDown" ? 1 : -1;
    state.activeMatch = Math.max(0, Math.min(state.matches.length - 1, state.activeMatch + step));
    renderMatches();
  }
}

function onFieldKey(event) {
  if (event.key === "Enter" || event.key === "Escape") {
    event.preventDefault();
    event.target.blur();
  }
}

function onPageKey(event) {
  if (event.target.closest && event.target.closest("input, textarea")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  const unit = state.unit;
  if (key === "Enter") {
    event.preventDefault();
    accept();
  } else if (/^[1-5]$/.test(key)) {
    const entry = currentTop()[Number(key) - 1];
    if (entry) decideWith(entry.name);
  } else if (key === "b" || key === "B") {
    decideWith("blank");
  } else if (key === "u" || key === "U") {
    decideWith("unknown");
  } else if (key === "x" || key === "X") {
    skip();
  } else if (key === "z" || key === "Z") {
    undo();
  } else if ((key === "Tab" || key === "ArrowDown" || key === "ArrowUp") && unit && unit.boxes.length) {
    event.preventDefault();
    const step = key === "ArrowUp" || event.shiftKey ? -1 : 1;
    state.selectedBox = (state.selectedBox + step + unit.boxes.length) % unit.boxes.length;
    renderAlternatives();
    renderBoxes();
  } else if (key === "+" || key === "-") {
    const count = $("#count");
    const value = count.value === "" ? (unit && unit.boxes.length ? unit.boxes.length : 1) : Number(count.value);
    count.value = String(Math.max(0, value + (key === "+" ? 1 : -1)));
  } else if (key === "#") {
    event.preventDefault();
    $("#comment").focus();
  } else if (key === "/") {
    event.preventDefault();
    openSearch("");
  } else if (key.length === 1 && /\p{L}/u.test(key)) {
    event.preventDefault();
    openSearch(key);
  }
}

async function start() {
  document.addEventListener("keydown", onPageKey);
  $("#search").addEventListener("keydown", onSearchKey);
  $("#search").addEventListener("input", lookUp);
  $("#count").addEventListener("keydown", onFieldKey);
  $("#comment").addEventListener("keydown", onFieldKey);
  try {
    const session = await api("/api/session");
    state.session = session;
    state.reviewer = state.reviewer || session.reviewer;
    $("#folder").textContent = session.results_dir;
    $("#model-name").textContent = session.model;
    $("#order").textContent = session.order;
    $("#reviewer").textContent = state.reviewer;
    const notes = [...session.notes];
    if (session.missing_photos) notes.push(`${session.missing_photos} photo(s) missing since the run`);
    if (session.failures) notes.push(`${session.failures} photo(s) the run could not read (failures.csv)`);
    $("#notes").textContent = notes.join(" · ");
    $("#notes").hidden = !notes.length;
  } catch (error) {
    showError(error.message);
    return;
  }
  await next();
}

start();
