"""map.html: one self-contained file (inline data, inline script, no network) that draws the map on a
<canvas>: points coloured by category, a legend that toggles categories, layer switches (fused,
text, image, audio), hover for an item's title and thumbnail, click to link an item's modality
points and show its flags, wheel zoom, drag to pan, double click to reset.

``map.html#item=<id>`` opens with that item selected (a link from an audit report can point there).
The page marks what it drew on ``<body>``: ``data-drawn`` (points), ``data-selected`` (an id) and
``data-links`` (lines drawn for it), so a headless browser can check it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict

import numpy as np

from align.errors import atomic_open
from align.map.items import ItemMap

HTML_FILE = "map.html"
GRID = 10_000  # coordinates are sent as integers 0 .. GRID: 5 digits each, finer than any screen


def _grid_coordinates(item_map: ItemMap) -> Dict[str, Any]:
    """Every layer's points as integers on one grid (one scale for both axes keeps distances true),
    -1 where an item lacks the layer; and the grid's extent per axis."""
    stacked = np.concatenate(list(item_map.points.values()))  # (layers * n, 2)
    real = stacked[~np.isnan(stacked[:, 0])]
    low = real.min(axis=0) if len(real) else np.zeros(2)
    span = float((real.max(axis=0) - low).max()) if len(real) else 0.0
    scale = GRID / span if span > 0 else 0.0
    xy = {}
    for layer, points in item_map.points.items():
        grid = np.rint((points - low) * scale)
        grid[np.isnan(points)] = -1
        xy[layer] = grid.astype(np.int64).reshape(-1).tolist()  # x0, y0, x1, y1, ...
    extent = np.rint((real.max(axis=0) - low) * scale).astype(int).tolist() if len(real) else [0, 0]
    return {"xy": xy, "extent": [max(1, v) for v in extent]}


def page_data(item_map: ItemMap, title: str) -> Dict[str, Any]:
    """What the page's script reads: names, categories (as indices into the legend), grid points,
    flags and thumbnails by drawn row."""
    legend = list(item_map.palette)
    index = {name: k for k, name in enumerate(legend)}
    counts = [0] * len(legend)
    for category in item_map.categories:
        counts[index[category]] += 1
    projection = item_map.projection
    return {"title": title, "method": projection.method, "statement": projection.statement(),
            "axes": projection.axis_labels(), "layers": item_map.layers,
            "categories": [{"name": name, "colour": item_map.palette[name], "count": counts[k]}
                           for k, name in enumerate(legend)],
            "ids": item_map.ids, "titles": item_map.titles, "cat": [index[c] for c in item_map.categories],
            **_grid_coordinates(item_map),
            "flags": {str(row): flags for row, flags in item_map.flags.items()},
            "thumbs": {str(row): uri for row, uri in item_map.thumbnails.items()},
            "notes": item_map.notes}


def render_html(item_map: ItemMap, title: str = "Embedding map") -> str:
    """The whole page as a string."""
    data = json.dumps(page_data(item_map, title), ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</script>" in a title would end the block: JSON may spell "<" as \u003c.
    data = data.replace("<", "\\u003c")
    escaped = title.replace("&", "&amp;").replace("<", "&lt;")
    return fill_placeholders(PAGE, {"__TITLE__": escaped, "__DATA__": data})


def fill_placeholders(page: str, values: Dict[str, str]) -> str:
    """``page`` with each key of ``values`` replaced by its value, all in one pass: replacing them in
    turn would fill a placeholder that a value spells (a title reading "__DATA__") as well."""
    pattern = re.compile("|".join(map(re.escape, values)))
    return pattern.sub(lambda match: values[match.group(0)], page)


def write_html(item_map: ItemMap, folder: str, title: str = "Embedding map") -> str:
    """Write ``map.html`` into ``folder`` atomically; its path."""
    path = os.path.join(folder, HTML_FILE)
    with atomic_open(path) as handle:
        handle.write(render_html(item_map, title))
    return path


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
html,body{margin:0;height:100%;font:13px/1.35 system-ui,sans-serif;color:#222;background:#fff}
body{display:flex}
#plot-box{flex:1;position:relative;min-width:0}
canvas{display:block;width:100%;height:100%;cursor:crosshair}
#side{width:320px;border-left:1px solid #ddd;overflow-y:auto;padding:10px 12px;box-sizing:border-box}
h1{font-size:16px;margin:0 0 4px}
h2{font-size:13px;margin:12px 0 4px;border-bottom:1px solid #eee}
.small{color:#666;font-size:11px}
.row{display:flex;align-items:center;gap:6px;cursor:pointer;padding:1px 2px;border-radius:3px}
.row:hover{background:#f2f2f2}
.off{opacity:.35}
.sw{width:12px;height:12px;border-radius:6px;flex:none}
.n{margin-left:auto;color:#888;font-size:11px}
#find{width:100%;box-sizing:border-box;padding:4px}
#tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #bbb;border-radius:4px;
 padding:6px;box-shadow:0 2px 6px rgba(0,0,0,.15);display:none;max-width:260px;font-size:12px}
.thumb{image-rendering:pixelated;width:64px;height:64px;object-fit:contain;border:1px solid #ddd;background:#fafafa}
#detail .thumb{width:128px;height:128px}
.flag{color:#c00;font-weight:600}
button{font-size:11px;padding:1px 6px}
table{border-collapse:collapse;font-size:12px}td{padding:1px 4px;vertical-align:top}
</style></head>
<body>
<div id="plot-box"><canvas id="plot"></canvas><div id="tip"></div></div>
<div id="side">
<h1 id="title"></h1><div class="small" id="statement"></div>
<h2>Find</h2><input id="find" placeholder="item id or words of its title, then Enter">
<h2>Layers</h2><div id="layers"></div>
<div class="small">Click a point to link the item's modalities; wheel to zoom, drag to pan, double click to reset.</div>
<h2>Selected item</h2><div id="detail" class="small">none: click a point</div>
<div id="flag-box" style="display:none"><h2>Flagged by the audit</h2>
<label class="small"><input type="checkbox" id="only-flagged"> show only flagged items</label><div id="flag-list"></div></div>
<h2>Categories <button id="all">all</button> <button id="none">none</button></h2><div id="legend"></div>
<div class="small" id="notes"></div>
</div>
<script type="application/json" id="map-data">__DATA__</script>
<script>
"use strict";
const M = JSON.parse(document.getElementById("map-data").textContent);
const N = M.ids.length, R = N > 5000 ? 2.5 : N > 1000 ? 3.5 : 5;
const SHAPES = {fused: "circle", text: "square", image: "triangle", audio: "diamond"};
const GLYPH = {circle: "\u25cf", square: "\u25a0", triangle: "\u25b2", diamond: "\u25c6"};
const canvas = document.getElementById("plot"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
const shown = {}; M.layers.forEach(l => shown[l] = true);
const hiddenCats = new Set();
let onlyFlagged = false, selected = -1, view = null, W = 0, H = 0;
const rowsByCat = M.categories.map(() => []);
M.cat.forEach((c, i) => rowsByCat[c].push(i));
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

function fit() {
  const m = 24, [ex, ey] = M.extent, s = Math.min((W - 2 * m) / ex, (H - 2 * m) / ey);
  view = {s: s, tx: (W - ex * s) / 2, ty: (H - ey * s) / 2};
}
const sx = x => view.tx + x * view.s, sy = y => view.ty + (M.extent[1] - y) * view.s;
function visible(i) { return !hiddenCats.has(M.cat[i]) && (!onlyFlagged || M.flags[i] !== undefined); }
function point(layer, i) { const xy = M.xy[layer], x = xy[2 * i]; return x < 0 ? null : [sx(x), sy(xy[2 * i + 1])]; }

function shape(kind, x, y, r) {
  if (kind === "circle") { ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 2 * Math.PI); }
  else if (kind === "square") { ctx.rect(x - r * .85, y - r * .85, r * 1.7, r * 1.7); }
  else if (kind === "triangle") { ctx.moveTo(x, y - r * 1.1); ctx.lineTo(x + r, y + r * .8); ctx.lineTo(x - r, y + r * .8); ctx.closePath(); }
  else { ctx.moveTo(x, y - r * 1.2); ctx.lineTo(x + r, y); ctx.lineTo(x, y + r * 1.2); ctx.lineTo(x - r, y); ctx.closePath(); }
}

function draw() {
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.globalAlpha = 1; ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  let drawn = 0;
  // Modalities under the fused points; each category's points filled in one path.
  const order = M.layers.filter(l => l !== "fused").concat(M.layers.includes("fused") ? ["fused"] : []);
  for (const layer of order) {
    if (!shown[layer]) continue;
    const kind = SHAPES[layer] || "diamond", r = layer === "fused" ? R : R * .8;
    // With an item selected the others fade, so that its linked points stand out.
    ctx.globalAlpha = (layer === "fused" ? 1 : .5) * (selected >= 0 ? .3 : 1);
    M.categories.forEach((c, k) => {
      if (hiddenCats.has(k)) return;
      ctx.beginPath();
      for (const i of rowsByCat[k]) {
        if (onlyFlagged && M.flags[i] === undefined) continue;
        const p = point(layer, i);
        if (p) { shape(kind, p[0], p[1], r); drawn++; }
      }
      ctx.fillStyle = c.colour; ctx.fill();
    });
  }
  ctx.globalAlpha = selected >= 0 ? .5 : 1;
  ctx.strokeStyle = "#e00000"; ctx.lineWidth = 1.6; ctx.beginPath();
  for (const key in M.flags) {
    const i = +key;
    if (!visible(i)) continue;
    const p = anchor(i);
    if (p) { ctx.moveTo(p[0] + R + 4, p[1]); ctx.arc(p[0], p[1], R + 4, 0, 2 * Math.PI); }
  }
  ctx.stroke();
  ctx.globalAlpha = 1;
  let links = 0;
  if (selected >= 0) links = drawSelection(selected);
  ctx.fillStyle = "#666"; ctx.font = "11px system-ui,sans-serif";
  ctx.fillText(M.axes[0] + " \u2192", 8, H - 8);
  ctx.save(); ctx.translate(14, H - 12 - ctx.measureText(M.axes[0]).width - 30); ctx.rotate(-Math.PI / 2);
  ctx.fillText(M.axes[1] + " \u2192", 0, 0); ctx.restore();
  document.body.dataset.drawn = drawn;
  document.body.dataset.links = links;
  document.body.dataset.selected = selected >= 0 ? M.ids[selected] : "";
}

function anchor(i) {
  for (const l of ["fused"].concat(M.layers)) { if (M.xy[l]) { const p = point(l, i); if (p) return p; } }
  return null;
}

function drawSelection(i) {
  // Lines from the fused point (or the first modality) to each other modality of the item.
  const pts = M.layers.map(l => [l, point(l, i)]).filter(e => e[1]);
  const hub = pts.find(e => e[0] === "fused") || pts[0];
  let links = 0;
  ctx.strokeStyle = "#111"; ctx.lineWidth = 1.8; ctx.beginPath();
  for (const e of pts) if (e !== hub) { ctx.moveTo(hub[1][0], hub[1][1]); ctx.lineTo(e[1][0], e[1][1]); links++; }
  ctx.stroke();
  ctx.font = "bold 11px system-ui,sans-serif";
  for (const [l, p] of pts) {
    ctx.beginPath(); shape(SHAPES[l] || "diamond", p[0], p[1], R + 3);
    ctx.fillStyle = M.categories[M.cat[i]].colour; ctx.fill();
    ctx.lineWidth = 2; ctx.strokeStyle = "#111"; ctx.stroke();
    ctx.fillStyle = "#111"; ctx.fillText(l, p[0] + R + 6, p[1] - R - 2);
  }
  return links;
}

function nearest(mx, my) {
  let best = null, bestD = 100;  // within 10 px
  for (const l of M.layers) {
    if (!shown[l]) continue;
    const xy = M.xy[l];
    for (let i = 0; i < N; i++) {
      if (xy[2 * i] < 0 || !visible(i)) continue;
      const dx = sx(xy[2 * i]) - mx, dy = sy(xy[2 * i + 1]) - my, d = dx * dx + dy * dy;
      if (d < bestD || (d === bestD && l === "fused")) { bestD = d; best = [i, l]; }
    }
  }
  return best;
}

function flagHtml(i) {
  const f = M.flags[i];
  if (!f) return "";
  return f.map(x => `<div class="flag">\u26a0 ${esc(x.flag)}${x.severity ? " (" + esc(x.severity) + ")" : ""}</div>` +
                    (x.reason ? `<div>${esc(x.reason)}</div>` : "")).join("");
}
function thumbHtml(i) { const t = M.thumbs[i]; return t ? `<img class="thumb" alt="" src="${t}">` : ""; }
function itemHtml(i) {
  const c = M.categories[M.cat[i]];
  const has = M.layers.filter(l => M.xy[l][2 * i] >= 0);
  return `${thumbHtml(i)}<div><b>${esc(M.titles[i])}</b></div><div>id <code>${esc(M.ids[i])}</code></div>` +
         `<div><span class="sw" style="display:inline-block;background:${c.colour}"></span> ${esc(c.name)}</div>` +
         `<div>layers: ${has.map(esc).join(", ")}</div>` + flagHtml(i);
}

function select(i, centre) {
  selected = i;
  document.getElementById("detail").innerHTML = i < 0 ? "none: click a point" : itemHtml(i);
  if (i >= 0) {
    if (centre) { const p = anchor(i); if (p) { view.tx += W / 2 - p[0]; view.ty += H / 2 - p[1]; } }
    try { history.replaceState(null, "", "#item=" + encodeURIComponent(M.ids[i])); } catch (e) {}
  }
  draw();
}

function resize() {
  const box = canvas.parentElement, dpr = window.devicePixelRatio || 1;
  W = box.clientWidth; H = box.clientHeight;
  canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
  fit(); draw();
}

function buildSide() {
  document.getElementById("title").textContent = M.title;
  document.getElementById("statement").textContent = `${N} items. ${M.statement}.`;
  const layers = document.getElementById("layers");
  for (const l of M.layers) {
    const n = M.xy[l].filter((v, k) => k % 2 === 0 && v >= 0).length;
    const row = document.createElement("label"); row.className = "row";
    row.innerHTML = `<input type="checkbox" checked> <span>${GLYPH[SHAPES[l] || "diamond"]}</span> ${esc(l)} <span class="n">${n}</span>`;
    row.querySelector("input").onchange = e => { shown[l] = e.target.checked; draw(); };
    layers.appendChild(row);
  }
  const legend = document.getElementById("legend"), rows = [];
  M.categories.forEach((c, k) => {
    const row = document.createElement("div"); row.className = "row";
    row.innerHTML = `<span class="sw" style="background:${c.colour}"></span>${esc(c.name)}<span class="n">${c.count}</span>`;
    row.onclick = () => { hiddenCats.has(k) ? hiddenCats.delete(k) : hiddenCats.add(k); row.classList.toggle("off"); draw(); };
    legend.appendChild(row); rows.push(row);
  });
  document.getElementById("all").onclick = () => { hiddenCats.clear(); rows.forEach(r => r.classList.remove("off")); draw(); };
  document.getElementById("none").onclick = () => { M.categories.forEach((c, k) => hiddenCats.add(k)); rows.forEach(r => r.classList.add("off")); draw(); };
  const flagged = Object.keys(M.flags).map(Number);
  if (flagged.length) {
    document.getElementById("flag-box").style.display = "";
    document.getElementById("only-flagged").onchange = e => { onlyFlagged = e.target.checked; draw(); };
    const list = document.getElementById("flag-list");
    for (const i of flagged.slice(0, 500)) {
      const row = document.createElement("div"); row.className = "row";
      row.innerHTML = `<span class="flag">${esc(M.flags[i].map(f => f.flag).join(", "))}</span> ${esc(M.titles[i])}`;
      row.onclick = () => select(i, true);
      list.appendChild(row);
    }
  }
  const notes = M.notes, t = notes.thumbnails || {};
  document.getElementById("notes").textContent =
    `Drawn ${notes.drawn} of ${notes.items} items` + (notes.without_vectors ? `, ${notes.without_vectors} without any vector` : "") +
    `; thumbnails: ${t.count || 0}` + (t.px ? ` at ${t.px} px` : "") + (t.left_out ? `, ${t.left_out} left out to keep the file small` : "") + ".";
  document.getElementById("find").onkeydown = e => {
    if (e.key !== "Enter") return;
    const q = e.target.value.trim().toLowerCase();
    if (!q) return;
    let i = M.ids.findIndex(x => x.toLowerCase() === q);
    if (i < 0) i = M.titles.findIndex(x => x.toLowerCase().includes(q));
    if (i >= 0) select(i, true);
  };
}

let drag = null;
canvas.addEventListener("mousedown", e => { drag = {x: e.offsetX, y: e.offsetY, moved: false}; });
canvas.addEventListener("mousemove", e => {
  if (drag && (Math.abs(e.offsetX - drag.x) + Math.abs(e.offsetY - drag.y) > 3 || drag.moved)) {
    view.tx += e.offsetX - drag.x; view.ty += e.offsetY - drag.y;
    drag = {x: e.offsetX, y: e.offsetY, moved: true}; tip.style.display = "none"; draw(); return;
  }
  const hit = nearest(e.offsetX, e.offsetY);
  if (!hit) { tip.style.display = "none"; return; }
  tip.innerHTML = itemHtml(hit[0]) + `<div class="small">point: ${esc(hit[1])}</div>`;
  tip.style.display = "block";
  tip.style.left = Math.min(e.offsetX + 14, W - 270) + "px"; tip.style.top = Math.min(e.offsetY + 14, H - 200) + "px";
});
canvas.addEventListener("mouseup", e => {
  const wasDrag = drag && drag.moved; drag = null;
  if (wasDrag) return;
  const hit = nearest(e.offsetX, e.offsetY);
  select(hit ? hit[0] : -1, false);
});
canvas.addEventListener("mouseleave", () => { drag = null; tip.style.display = "none"; });
canvas.addEventListener("dblclick", () => { fit(); draw(); });
canvas.addEventListener("wheel", e => {
  e.preventDefault();
  const k = Math.exp(-e.deltaY * 0.0015);
  view.tx = e.offsetX - (e.offsetX - view.tx) * k; view.ty = e.offsetY - (e.offsetY - view.ty) * k; view.s *= k;
  draw();
}, {passive: false});
window.addEventListener("resize", resize);

buildSide();
resize();
const wanted = decodeURIComponent((location.hash.match(/^#item=(.*)$/) || [])[1] || "");
if (wanted) { const i = M.ids.indexOf(wanted); if (i >= 0) select(i, false); }
</script>
</body></html>
"""
