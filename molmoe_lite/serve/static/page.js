// The molmoe-lite page: pick an image, ask, watch the answer stream, see points drawn.
// Talks only to this server's OpenAI-compatible API; no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, image: null, dataUrl: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const health = await fetch("/health");
    if (health.status === 503) {
      $("model").textContent = "model loading…";
      setTimeout(loadModel, 1000);
      return;
    }
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "enter the API key (Settings)" : await errorMessage(response);
      return;
    }
    state.model = (await response.json()).data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function drawImage(points) {
  const canvas = $("canvas");
  if (!state.image) return;
  canvas.width = state.image.naturalWidth;
  canvas.height = state.image.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.image, 0, 0);
  const r = Math.max(5, Math.round(Math.min(canvas.width, canvas.height) / 50));
  for (const p of points || []) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, r, 0, 2 * Math.PI);
    ctx.lineWidth = Math.max(2, r / 2.5);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
    ctx.lineWidth = Math.max(1.5, r / 4);
    ctx.strokeStyle = "#e63946";
    ctx.stroke();
  }
  canvas.hidden = false;
}

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.dataUrl = reader.result;
    const img = new Image();
    img.onload = () => {
      state.image = img;
      $("image-info").textContent = `${file.name}: ${img.naturalWidth}×${img.naturalHeight}`;
      drawImage([]);
    };
    img.onerror = () => showError(`${file.name}: the browser cannot read this image`);
    img.src = state.dataUrl;
  };
  reader.readAsDataURL(file);
}

function showPoints(points) {
  const list = $("points");
  list.replaceChildren();
  for (const p of points || []) {
    const item = document.createElement("li");
    item.textContent = `${p.label || "point"}: (${p.x.toFixed(1)}, ${p.y.toFixed(1)}) px`;
    list.appendChild(item);
  }
  drawImage(points);
}

function handleEvent(data, answer) {
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message);
  if (chunk.usage) {
    $("usage").textContent = `${chunk.usage.prompt_tokens} prompt tokens, ${chunk.usage.completion_tokens} generated`;
  }
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    if (delta.content) answer.textContent += delta.content;
    if (delta.points) showPoints(delta.points);
    if (choice.finish_reason) $("status").textContent = `done (${choice.finish_reason})`;
  }
  return false;
}

async function send(event) {
  event.preventDefault();
  showError("");
  if (!state.model) await loadModel();
  if (!state.model) {
    showError("the server has no model ready yet");
    return;
  }
  const content = [{ type: "text", text: $("prompt").value }];
  if (state.dataUrl) content.push({ type: "image_url", image_url: { url: state.dataUrl } });
  const body = {
    model: state.model,
    messages: [{ role: "user", content }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 200,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const answer = $("answer");
  answer.textContent = "";
  $("usage").textContent = "";
  showPoints([]);
  answer.classList.add("streaming");
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating…";
  state.controller = new AbortController();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while (!finished && (end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) finished = handleEvent(line.slice(6), answer) || finished;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") $("status").textContent = "stopped";
    else {
      showError(e.message);
      $("status").textContent = "";
    }
  } finally {
    answer.classList.remove("streaming");
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

function init() {
  $("image").addEventListener("change", (e) => setImage(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setImage(e.dataTransfer.files[0]);
  });
  $("form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("api-key").addEventListener("change", loadModel);
  loadModel();
}

init();
