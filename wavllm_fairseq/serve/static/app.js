// The wavllm-serve page: pick a clip (upload or microphone), an instruction (preset or typed), and
// watch the answer stream in from /v1/chat/completions (server-sent events). No libraries, no build.
// A server started with --api-key answers 401 without it: the page then asks for the key, keeps it for
// the tab (sessionStorage) and sends it as a bearer token.
"use strict";

const KEEP = 5;  // exchanges kept on the page
const KEY = "wavllm-api-key";
const $ = (id) => document.getElementById(id);
let clip = null;  // {name, format, bytes: ArrayBuffer}
let modelName = "wavllm";

function status(text) { $("status").textContent = text; }

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? {"Authorization": "Bearer " + key} : {};
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("model").textContent = message;
  $("api-key").focus();
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: authHeaders()});
    if (r.status === 401) {
      askForKey(sessionStorage.getItem(KEY) ? "wrong API key" : "this server needs an API key");
      return;
    }
    const models = await r.json();
    modelName = models.data[0].id;
    $("model").textContent = "model: " + modelName;
    $("key-form").hidden = true;
  } catch (e) {
    $("model").textContent = "server not reachable";
  }
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("api-key").value = "";
  loadModel();
});

async function loadPresets() {
  const r = await fetch("/static/presets.json");
  for (const p of await r.json()) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "preset";
    b.textContent = p.label;
    b.title = p.instruction;
    b.addEventListener("click", () => {
      $("instruction").value = p.instruction;
      document.querySelectorAll("button.preset").forEach((x) => x.classList.toggle("selected", x === b));
    });
    $("presets").appendChild(b);
  }
}

function setClip(name, format, bytes, blob) {
  clip = {name, format, bytes};
  $("clip").textContent = `${name} (${(bytes.byteLength / 1024).toFixed(1)} KiB)`;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
}

$("file").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const ext = (file.name.split(".").pop() || "wav").toLowerCase();
  setClip(file.name, ["wav", "flac", "ogg", "mp3"].includes(ext) ? ext : "wav", await file.arrayBuffer(), file);
});

// ---------------------------------------------------------------- microphone -> WAV
let recording = null;  // {ctx, stream, node, chunks}

function wavFile(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * n);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) for (const x of c) { v.setInt16(o, Math.max(-1, Math.min(1, x)) * 32767, true); o += 2; }
  return buf;
}

async function startRecording() {
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/recorder-worklet.js");
  const node = new AudioWorkletNode(ctx, "recorder");
  const chunks = [];
  node.port.onmessage = (e) => chunks.push(e.data);
  ctx.createMediaStreamSource(stream).connect(node);
  recording = {ctx, stream, node, chunks};
  $("record").textContent = "Stop";
  $("record").classList.add("recording");
  status("recording... press Stop when done");
}

async function stopRecording() {
  const {ctx, stream, node, chunks} = recording;
  recording = null;
  node.disconnect();
  stream.getTracks().forEach((t) => t.stop());
  const rate = ctx.sampleRate;
  await ctx.close();
  $("record").textContent = "Record";
  $("record").classList.remove("recording");
  const bytes = wavFile(chunks, rate);
  setClip(`recording ${new Date().toLocaleTimeString()}`, "wav", bytes, new Blob([bytes], {type: "audio/wav"}));
  status("");
}

if (!navigator.mediaDevices || !window.AudioWorkletNode) {
  $("record").disabled = true;
  $("record").title = "the microphone needs https or http://localhost";
} else {
  $("record").addEventListener("click", async () => {
    try {
      if (recording) await stopRecording(); else await startRecording();
    } catch (e) {
      recording = null;
      status("microphone: " + e.message);
    }
  });
}

// ---------------------------------------------------------------- asking
function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function newExchange(instruction) {
  const el = $("exchange-template").content.firstElementChild.cloneNode(true);
  el.querySelector(".clip-name").textContent = clip ? `[${clip.name}]` : "[no audio]";
  el.querySelector(".instruction").textContent = instruction || "(spoken question)";
  const history = $("history");
  history.insertBefore(el, history.firstChild);
  while (history.children.length > KEEP) history.removeChild(history.lastChild);
  return el;
}

async function ask(instruction) {
  const content = [];
  if (instruction) content.push({type: "text", text: instruction});
  if (clip) content.push({type: "input_audio", input_audio: {data: base64(clip.bytes), format: clip.format}});
  const el = newExchange(instruction);
  const answer = el.querySelector(".answer");
  const t0 = performance.now();
  const res = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json", ...authHeaders()},
    body: JSON.stringify({model: modelName, messages: [{role: "user", content}], stream: true,
                          stream_options: {include_usage: true}}),
  });
  if (!res.ok) {
    let message = res.statusText;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    el.dataset.state = "error";
    answer.textContent = message;
    if (res.status === 401) askForKey("this server needs an API key");
    return;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null, usage = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") continue;
      const msg = JSON.parse(data);
      if (msg.error) { el.dataset.state = "error"; answer.textContent = msg.error.message; return; }
      if (msg.usage) usage = msg.usage;
      for (const c of msg.choices || []) {
        if (c.delta && c.delta.content) answer.textContent += c.delta.content;
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  const secs = ((performance.now() - t0) / 1000).toFixed(2);
  el.querySelector(".meta").textContent = usage
    ? `${usage.completion_tokens} answer tokens, ${usage.prompt_tokens_details.audio_tokens} speech + ` +
      `${usage.prompt_tokens_details.text_tokens} prompt tokens, ${secs} s, finish: ${finish}`
    : `${secs} s`;
  el.dataset.state = "done";
}

$("ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const instruction = $("instruction").value.trim();
  if (!clip && !instruction) { status("pick a clip or type an instruction first"); return; }
  $("ask").disabled = true;
  status("");
  try {
    await ask(instruction);
  } catch (e) {
    status("request failed: " + e.message);
  } finally {
    $("ask").disabled = false;
  }
});

loadModel();
loadPresets();
