// The realtime page: one websocket to the server (docs/realtime.md). Parameters go as JSON and only
// when they change; frames go as binary JPEG; the server renders the newest input and answers each
// image with a JSON "result" followed by the image itself.
"use strict";

const TYPING_PAUSE_MS = 60; // an image follows each pause in typing this long
const REFINE_AFTER_MS = 500; // once typing or painting rests this long: one refined image
const FRAME_INTERVAL_MS = 33; // at most ~30 frames a second from strokes or the webcam
const SIZES = [64, 128, 256, 384, 512, 640, 768, 1024];

const $ = (id) => document.getElementById(id);
const page = {
  socket: null, hello: null, mode: "type", sent: {}, frameShown: false,
  meta: null, times: [], latencies: [], count: 0, shown: [], retry: 500,
  typingTimer: 0, refineTimer: 0, frameTimer: 0, lastFrameAt: 0,
  undo: [], erasing: false, drawing: null, camera: null,
};
window.fastsd = page; // for the curious (and the browser tests): what the page has seen

// --- the connection ---

function connect() {
  const token = new URLSearchParams(location.search).get("token");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/ws${token ? `?token=${encodeURIComponent(token)}` : ""}`);
  socket.binaryType = "blob";
  page.socket = socket;
  socket.onopen = () => { page.retry = 500; status("connected"); };
  socket.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : onImage(event.data));
  socket.onclose = () => {
    status(`disconnected: reconnecting in ${(page.retry / 1000).toFixed(1)} s`);
    setTimeout(connect, page.retry);
    page.retry = Math.min(page.retry * 2, 8000);
  };
}

function send(message) {
  if (page.socket && page.socket.readyState === WebSocket.OPEN) page.socket.send(message);
}

function sendParams(changes) {
  const changed = {};
  for (const [name, value] of Object.entries(changes)) {
    if (page.sent[name] !== value) changed[name] = page.sent[name] = value;
  }
  if (Object.keys(changed).length) send(JSON.stringify({ type: "params", ...changed }));
}

function refineSoon() {
  clearTimeout(page.refineTimer);
  page.refineTimer = setTimeout(() => send(JSON.stringify({ type: "refine" })), REFINE_AFTER_MS);
}

function onMessage(message) {
  if (message.type === "ready") {
    page.hello = message;
    page.sent = {};
    $("connection").textContent = message.backend;
    configure(message);
    sendAll();
  } else if (message.type === "result") {
    page.meta = message; // its image is the next binary message
  } else if (message.type === "error") {
    if (message.field) delete page.sent[message.field]; // the server took it back: send it again when set
    notice(message.field ? `${message.field}: ${message.message}` : message.message, "error");
  } else if (message.type === "withheld") {
    notice(message.message, "withheld"); // the previous image stays on the page
  }
}

function onImage(blob) {
  const meta = page.meta || {};
  const output = $("output");
  const previous = output.src;
  output.src = URL.createObjectURL(blob);
  output.hidden = false;
  if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
  page.count += 1;
  page.shown = page.shown.slice(-99).concat({ input: meta.input, pass: meta.pass });
  output.dataset.count = page.count;
  output.dataset.input = meta.input;
  output.dataset.pass = meta.pass;
  const now = performance.now();
  page.times = page.times.filter((t) => now - t < 2000).concat(now);
  page.latencies = page.latencies.slice(-29).concat(meta.latency_ms);
  const sorted = [...page.latencies].sort((a, b) => a - b);
  $("fps").textContent = (page.times.length / 2).toFixed(1);
  $("latency").textContent = Math.round(sorted[Math.floor(sorted.length / 2)]);
  $("count").textContent = page.count;
  $("details").textContent =
    `${meta.pass} pass · ${meta.num_inference_steps} step(s) · ${meta.vae} VAE · seed ${meta.seed} · batch ${meta.batch_size}`;
  $("notice").hidden = true; // an image means the last error is behind us
}

function status(text) { $("connection").textContent = text; }

function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}

// --- the controls ---

function configure(hello) {
  const size = $("size");
  const chosen = Number(size.value) || hello.width;
  size.replaceChildren(
    ...SIZES.filter((side) => side * side <= hello.max_pixels).map((side) => new Option(`${side}×${side}`, side)),
  );
  size.value = SIZES.includes(chosen) ? chosen : 512;
  $("steps").max = hello.max_steps;
  $("steps").placeholder = `auto (${hello.passes.fast.num_inference_steps}, then ${hello.passes.refined.num_inference_steps})`;
  if ($("seed").value === "") $("seed").value = hello.seed;
  $("paint-mode").textContent = `Painting drives ${hello.painting} on ${hello.variant}: the canvas is the start image, strength how much changes.`;
  resizeCanvas(Number(size.value));
}

function controls() {
  const side = Number($("size").value);
  const steps = $("steps").value;
  const prompt = $("prompt").value.trim() ? { prompt: $("prompt").value } : {}; // empty: nothing to render yet
  return {
    ...prompt,
    num_inference_steps: steps === "" ? null : Number(steps),
    strength: Number($("strength").value),
    seed: $("seed").value === "" ? null : Number($("seed").value),
    width: side,
    height: side,
    output_format: $("format").value,
  };
}

function sendAll() {
  const params = controls();
  if (page.mode === "type") {
    sendParams({ ...params, image: null });
  } else {
    sendParams(params);
    sendFrame();
  }
}

$("prompt").addEventListener("input", () => {
  clearTimeout(page.typingTimer);
  clearTimeout(page.refineTimer);
  if (!$("prompt").value.trim()) return; // an empty prompt renders nothing: keep the last image
  page.typingTimer = setTimeout(() => { sendParams({ prompt: $("prompt").value }); refineSoon(); }, TYPING_PAUSE_MS);
});

for (const id of ["steps", "strength", "seed", "size", "format"]) {
  $(id).addEventListener("change", () => {
    if (id === "size") resizeCanvas(Number($("size").value));
    sendParams(controls());
    if (page.mode === "paint" && id === "size") sendFrame();
    refineSoon();
  });
}
$("strength").addEventListener("input", () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); });
$("new-seed").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 4294967295);
  $("seed").dispatchEvent(new Event("change"));
});

for (const tab of document.querySelectorAll(".tabs button")) {
  tab.addEventListener("click", () => {
    page.mode = tab.dataset.mode;
    for (const other of document.querySelectorAll(".tabs button")) other.setAttribute("aria-selected", other === tab);
    $("paint-panel").hidden = page.mode !== "paint";
    delete page.sent.image;
    sendAll();
  });
}

// --- painting ---

const canvas = $("canvas");
const ink = canvas.getContext("2d", { willReadFrequently: true });

function resizeCanvas(side) {
  if (canvas.width === side) return;
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  copy.getContext("2d").drawImage(canvas, 0, 0);
  canvas.width = canvas.height = side;
  fill();
  ink.drawImage(copy, 0, 0, side, side);
  page.undo = [];
}

function fill() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, canvas.width, canvas.height);
}

function remember() {
  page.undo.push(ink.getImageData(0, 0, canvas.width, canvas.height));
  if (page.undo.length > 30) page.undo.shift();
}

function sendFrame() {
  if (page.mode !== "paint") return;
  const wait = page.lastFrameAt + FRAME_INTERVAL_MS - performance.now();
  if (wait > 0) { // throttled: the newest picture goes when the interval is over
    if (!page.frameTimer) page.frameTimer = setTimeout(() => { page.frameTimer = 0; sendFrame(); }, wait);
    return;
  }
  page.lastFrameAt = performance.now();
  canvas.toBlob((blob) => { if (blob) send(blob); }, "image/jpeg", 0.85);
  refineSoon();
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return [((event.clientX - box.left) / box.width) * canvas.width, ((event.clientY - box.top) / box.height) * canvas.height];
}

function stroke(from, to) {
  ink.strokeStyle = page.erasing ? "#fff" : $("brush-color").value;
  ink.lineWidth = (Number($("brush-size").value) * canvas.width) / 512;
  ink.lineCap = ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(...from);
  ink.lineTo(...to);
  ink.stroke();
  sendFrame();
}

canvas.addEventListener("pointerdown", (event) => {
  canvas.setPointerCapture(event.pointerId);
  remember();
  page.drawing = point(event);
  stroke(page.drawing, page.drawing);
});
canvas.addEventListener("pointermove", (event) => {
  if (!page.drawing) return;
  const next = point(event);
  stroke(page.drawing, next);
  page.drawing = next;
});
for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { page.drawing = null; });

$("eraser").addEventListener("click", () => {
  page.erasing = !page.erasing;
  $("eraser").setAttribute("aria-pressed", page.erasing);
});
$("undo").addEventListener("click", () => {
  const last = page.undo.pop();
  if (last) { ink.putImageData(last, 0, 0); sendFrame(); }
});
$("clear").addEventListener("click", () => { remember(); fill(); sendFrame(); });

function drawCovering(source, width, height) {
  const scale = Math.max(canvas.width / width, canvas.height / height);
  const w = width * scale, h = height * scale;
  ink.drawImage(source, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
}

$("photo").addEventListener("change", async () => {
  const file = $("photo").files[0];
  if (!file) return;
  try {
    const bitmap = await createImageBitmap(file);
    remember();
    drawCovering(bitmap, bitmap.width, bitmap.height);
    sendFrame();
  } catch {
    notice("That file could not be read as an image.", "error");
  }
  $("photo").value = "";
});

$("webcam").addEventListener("click", async () => {
  if (page.camera) {
    page.camera.getTracks().forEach((track) => track.stop());
    page.camera = null;
    $("webcam").setAttribute("aria-pressed", false);
    return;
  }
  try {
    page.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (error) {
    notice(`The webcam is not available: ${error.message}`, "error");
    return;
  }
  $("webcam").setAttribute("aria-pressed", true);
  const video = $("camera");
  video.srcObject = page.camera;
  await video.play();
  const grab = () => {
    if (!page.camera) return;
    drawCovering(video, video.videoWidth, video.videoHeight);
    sendFrame();
    setTimeout(grab, FRAME_INTERVAL_MS);
  };
  grab();
});

fill();
connect();
