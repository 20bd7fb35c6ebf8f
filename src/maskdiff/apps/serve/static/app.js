// The maskdiff page: a template with ___ gaps, a Generate button, the samples shown as they unmask.
// Plain JavaScript, no build step; it talks to the API of the same server (docs/serve.md).
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function loadModel() {
  const res = await fetch("/v1/model");
  model = await res.json();
  const v = model.vocabulary;
  $("model-info").textContent =
    `run ${model.run} (step ${model.step}, ${model.method}, ${model.schedule} schedule), ` +
    `${v.kind} vocabulary of ${v.size}` + (v.alphabet ? ` (${JSON.stringify(v.alphabet)})` : "") +
    `, length ${model.length}; limits: ${model.limits.max_samples} samples, ${model.limits.max_steps} steps`;
  for (const name of model.samplers) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = name;
    $("sampler").appendChild(opt);
  }
  if (v.kind === "image") {
    $("text").hidden = true;
    $("text-label").hidden = true;
    $("gap_length").parentElement.hidden = true;
    $("length").parentElement.hidden = true;
  }
}

function requestBody() {
  const body = {
    num_samples: Number($("num_samples").value),
    steps: Number($("steps").value),
    sampler: $("sampler").value,
    temperature: Number($("temperature").value),
  };
  body.stream_every = Math.max(1, Math.floor(body.steps / 64));
  const topP = $("top_p").value.trim();
  if (topP !== "") body.top_p = Number(topP);
  const seed = intOrNull("seed");
  if (seed !== null) body.seed = seed;
  if (model.vocabulary.kind !== "image") {
    const text = $("text").value;
    const length = intOrNull("length");
    if (length !== null) body.length = length;
    if (text.includes("___")) {
      body.infill = text;
      body.gap_length = Number($("gap_length").value);
    } else if (text !== "") {
      body.prompt = text;
    }
  }
  return body;
}

// One view per sample: spans for text, a canvas for images.
class TextView {
  constructor(parent, fixed) {
    this.el = document.createElement("div");
    this.el.className = "sample";
    this.spans = fixed.map((isFixed) => {
      const s = document.createElement("span");
      s.className = "tok masked";
      s.textContent = "·";
      this.el.appendChild(s);
      return s;
    });
    this.fixed = fixed;
    this.prev = fixed.map(() => -1);
    parent.appendChild(this.el);
  }
  update(sample) {
    sample.tokens.forEach((tok, i) => {
      const s = this.spans[i];
      if (tok === -1) {
        s.className = "tok masked";
        s.textContent = "·";
      } else {
        s.textContent = sample.pieces[i];
        s.className = "tok " + (this.fixed[i] ? "fixed" : this.prev[i] === -1 ? "new" : "revealed");
      }
    });
    this.prev = sample.tokens.slice();
  }
}

class ImageView {
  constructor(parent, shape, vocab) {
    [this.h, this.w, this.c] = shape;
    this.vocab = vocab;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "image";
    this.canvas.width = this.w;
    this.canvas.height = this.h;
    const scale = Math.max(2, Math.floor(192 / Math.max(this.h, this.w)));
    this.canvas.style.width = `${this.w * scale}px`;
    this.canvas.style.height = `${this.h * scale}px`;
    parent.appendChild(this.canvas);
  }
  update(sample) {
    const ctx = this.canvas.getContext("2d");
    const img = ctx.createImageData(this.w, this.h);
    const top = this.vocab - 1;
    for (let p = 0; p < this.h * this.w; p++) {
      const sub = sample.tokens.slice(p * this.c, (p + 1) * this.c);
      const masked = sub.some((t) => t === -1);
      const rgb = masked ? [220, 40, 40] : (this.c === 1 ? [sub[0], sub[0], sub[0]] : sub).map((t) => (255 * t) / top);
      img.data.set([...rgb, 255], 4 * p);
    }
    ctx.putImageData(img, 0, 0);
  }
}

function parseEvents(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let kind = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) kind = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    onEvent(kind, JSON.parse(data));
  }
  return buffer;
}

// States are drawn one per frame (FRAME_MS apart), never skipped: a fast server sends them all at
// once, and the unmasking should still be seen.
const FRAME_MS = 25;
const frames = [];
let drawing = null;
let drained = null;

function drawNext() {
  drawing = null;
  const next = frames.shift();
  if (next) next();
  if (frames.length) drawing = setTimeout(drawNext, FRAME_MS);
  else if (drained) drained();
}

function enqueue(draw) {
  frames.push(draw);
  if (!drawing) drawing = setTimeout(drawNext, 0);
}

function allDrawn() {
  return frames.length || drawing ? new Promise((resolve) => { drained = resolve; }) : Promise.resolve();
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("output").innerHTML = "";
  $("output").dataset.done = "false";
  $("generate").disabled = true;
  $("status").textContent = "waiting for the server…";
  let views = [];
  let start = null;
  let failure = null;
  try {
    const res = await fetch("/v1/generate/stream", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(requestBody()),
    });
    if (!res.ok) {
      const err = (await res.json()).error;
      throw new Error(`${res.status}: ${err.message}` + (err.field ? ` (field ${err.field})` : ""));
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    const onEvent = (kind, data) => enqueue(() => {
      if (kind === "start") {
        start = data;
        $("status").textContent = `seed ${data.settings.seed}, length ${data.length}`;
      } else if (kind === "step") {
        if (!views.length) {  // drawn from the first state (step 0: fixed text, the rest masked)
          views = Array.from({length: start.num_samples}, () => model.vocabulary.kind === "image"
            ? new ImageView($("output"), model.image_shape, model.vocabulary.size)
            : new TextView($("output"), start.fixed));
        }
        data.samples.forEach((s, i) => views[i].update(s));
        const left = data.masked.reduce((a, b) => a + b, 0);
        $("status").textContent = `step ${data.step} / ${data.steps}, ${left} masked`;
      } else if (kind === "done") {
        $("status").textContent = `done in ${data.timing.sampling_s.toFixed(2)} s (seed ${data.settings.seed})`;
        $("output").dataset.done = "true";
      } else if (kind === "error") {
        failure = data.error.message;
      }
    });
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + value, onEvent);
    }
    await allDrawn();
    if (failure) throw new Error(failure);
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

$("controls").addEventListener("submit", generate);
loadModel().catch((err) => { $("model-info").textContent = `cannot reach the server: ${err}`; });
