"""The search page served at `GET /`: one self-contained HTML file (no build step, no external assets).

It calls the same JSON API as any client: `/v1/search` with the typed text, a dropped image as a
data URI, a task instruction and the rerank toggle, and shows the top-k as a grid with both scores.
Its links are relative to a `<base>` at the app's mount point, so it works at `/` and under a
Serve route prefix alike (with or without the trailing slash).
"""

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><base href="{base}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>umarvel-ray search</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1100px}
form{display:grid;gap:.5rem;grid-template-columns:1fr 1fr;align-items:center}
#drop{border:2px dashed #888;padding:1rem;text-align:center;min-height:3rem}
#drop.over{background:#eef}
#preview{max-height:80px;display:none}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem;margin-top:1rem}
.card{border:1px solid #ccc;border-radius:6px;padding:.5rem;font-size:.85rem}
.card img{width:100%;image-rendering:pixelated}
.score{color:#555;font-family:monospace}
#status{color:#a00;min-height:1.2em}
</style></head><body>
<h1>umarvel-ray search</h1>
<form id="f">
  <label>Query text <input id="text" name="text" style="width:100%"></label>
  <label>Task instruction
    <select id="instruction">
      <option value="">(none)</option>
      <option>Retrieve an image that matches the given caption.</option>
      <option>Find a caption that describes the given image.</option>
      <option>Retrieve a passage that answers the question.</option>
      <option>Find a similar image.</option>
      <option>Retrieve an image that shows the requested change.</option>
    </select></label>
  <div id="drop">Drop an image here or <input type="file" id="file" accept="image/png,image/jpeg,image/webp">
    <img id="preview" alt="query image"></div>
  <div>
    <label>k <input id="k" type="number" value="8" min="1" max="100" style="width:4em"></label>
    <label><input id="rerank" type="checkbox"> rerank</label>
    <button id="go" type="submit">Search</button>
  </div>
</form>
<div id="status"></div>
<div id="timings" class="score"></div>
<div id="results"></div>
<script>
"use strict";
let imageData = null;
const $ = (id) => document.getElementById(id);
function readFile(file) {
  const r = new FileReader();
  r.onload = () => { imageData = r.result; $("preview").src = imageData; $("preview").style.display = "inline"; };
  r.readAsDataURL(file);
}
$("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]); });
function el(tag, attrs, text) { const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text; return n; }
$("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("status").textContent = ""; $("results").replaceChildren();
  const query = {};
  if ($("text").value.trim()) query.text = $("text").value;
  if (imageData) query.image = imageData;
  if ($("instruction").value) query.instruction = $("instruction").value;
  const body = {query, k: Number($("k").value), rerank: $("rerank").checked};
  let resp;
  try { resp = await fetch("v1/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)}); }
  catch (err) { $("status").textContent = "network error: " + err; return; }
  const data = await resp.json();
  if (!resp.ok) { $("status").textContent = resp.status + ": " + data.error.message; return; }
  $("timings").textContent = "timings (ms): " + JSON.stringify(data.timings_ms);
  for (const r of data.results) {
    const card = el("div", {class: "card", "data-id": r.id});
    card.appendChild(el("div", {}, "#" + r.rank + "  " + r.id));
    if (r.record && r.record.image_url) card.appendChild(el("img", {src: r.record.image_url, alt: r.id}));
    if (r.record && r.record.text) card.appendChild(el("div", {class: "text"}, r.record.text));
    let s = "cos " + r.retrieval_score.toFixed(4);
    if (r.rerank_score !== undefined) s += "  P(yes) " + r.rerank_score.toFixed(4) + "  fused " + r.score.toFixed(4);
    card.appendChild(el("div", {class: "score"}, s));
    $("results").appendChild(card);
  }
  $("status").textContent = data.results.length ? "" : "no results";
});
</script></body></html>
"""


def render_page(root: str = "") -> str:
    """The page for an app mounted at `root` ("" or a route prefix such as "/umarvel")."""
    return PAGE.replace("{base}", html.escape(root.rstrip("/") + "/", quote=True), 1)
