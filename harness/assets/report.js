// The report's behaviour: sortable tables and the per-prompt token view. Every text from the run
// (prompt, token, model name) is placed with textContent, never as markup.
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const num = (x) => (x === "inf" ? Infinity : x === "-inf" ? -Infinity : x === null ? NaN : x);

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

document.documentElement.classList.add("js-on"); // shows the hints that only hold with the script

// Enter or Space on a focusable element does what a click does (the headers and tokens are not buttons)
function clickable(e, onClick) {
  e.setAttribute("tabindex", "0");
  e.addEventListener("click", onClick);
  e.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); onClick(); }
  });
}

// ---- sortable tables: click a header (or Enter on it); numbers sort by their data-v value
function makeSortable(table) {
  table.querySelectorAll("th").forEach((th, col) => {
    clickable(th, () => {
      const body = table.tBodies[0];
      const desc = th.classList.contains("asc");
      table.querySelectorAll("th").forEach((h) => { h.classList.remove("asc", "desc"); h.removeAttribute("aria-sort"); });
      th.classList.add(desc ? "desc" : "asc");
      th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      const text = th.dataset.type === "text";
      const key = (row) => {
        const cell = row.cells[col];
        const v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
        return text ? v : v === "" ? NaN : parseFloat(v);
      };
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        const c = text ? String(x).localeCompare(String(y)) : (isNaN(x) ? 1 : isNaN(y) ? -1 : x - y);
        return desc ? -c : c;
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}
document.querySelectorAll("table.sortable").forEach(makeSortable);

// ---- per-prompt view: token text coloured by KL; click a token for both models' top-5
function klColour(kl) {
  if (!(kl > 0)) return "hsl(120,60%,92%)";
  const f = Math.min(1, Math.max(0, (Math.log10(kl) + 7) / 7)); // 1e-7 .. 1 nats
  return `hsl(${Math.round(120 * (1 - f))},75%,${Math.round(90 - 25 * f)}%)`;
}

function prob(p) {
  return p === 0 ? "0" : p >= 1e-3 ? p.toPrecision(4) : p.toExponential(3); // 4 significant digits in the data
}

// a token's text as a JSON string, its spaces kept (a cell would collapse "  " into " "), its id in the tooltip
function tokenCell(id) {
  return el("td", JSON.stringify(D.vocab[id] !== undefined ? D.vocab[id] : `#${id}`), { class: "token", title: `id ${id}` });
}

function topTable(model, i) {
  const t = el("table");
  const head = t.insertRow();
  head.appendChild(el("th", model));
  head.appendChild(el("th", "p"));
  const top = D.top[model];
  if (!top) return t;
  const target = D.pos.target[i];
  for (let k = 0; k < 5; k++) {
    const r = t.insertRow();
    const id = top.ids[5 * i + k];
    if (id === target) r.className = "hit"; // the text's next token
    r.appendChild(tokenCell(id));
    r.appendChild(el("td", prob(Number(top.probs[5 * i + k]))));
  }
  const p = (D.p_target || {})[model];
  if (p && p[i] !== null && !top.ids.slice(5 * i, 5 * i + 5).includes(target)) { // the next token, below the top 5
    const r = t.insertRow();
    r.className = "hit below";
    r.appendChild(tokenCell(target));
    r.appendChild(el("td", prob(num(p[i]))));
  }
  return t;
}

function buildView() {
  const root = document.getElementById("view");
  if (!root || !D.pos) return;
  root.textContent = "";
  const cands = Object.keys(D.kl);
  const rowsOf = new Map(); // prompt index -> Map(position -> row)
  D.pos.prompt.forEach((p, i) => {
    if (p < 0) return; // a row no pair aligns (cross-vocabulary runs)
    if (!rowsOf.has(p)) rowsOf.set(p, new Map());
    rowsOf.get(p).set(D.pos.position[i], i);
  });
  const controls = el("div", null, { class: "controls" });
  const pairSel = el("select", null, { id: "pair-select" });
  cands.forEach((c) => pairSel.appendChild(el("option", `${D.reference} vs ${c}`, { value: c })));
  const promptSel = el("select", null, { id: "prompt-select" });
  const pairLabel = el("label", "pair "), promptLabel = el("label", "  prompt ");
  pairLabel.append(pairSel);
  promptLabel.append(promptSel);
  controls.append(pairLabel, promptLabel);
  // the pair's prompts, most drift first (prompts.csv's main columns): a click (or Enter) shows one below
  const promptBox = el("div", null, { class: "wide tall" });
  const COLS = [["positions", "positions", (v) => String(v)], ["KL mean", "kl_mean", (v) => v.toExponential(2)],
    ["± se", "kl_mean_se", (v) => v.toExponential(1)], ["KL max", "kl_max", (v) => v.toExponential(2)],
    ["JS", "js_mean", (v) => v.toExponential(2)], ["top-1", "top1_agree", (v) => v.toFixed(3)],
    ["PPL ratio", "ppl_ratio", (v) => v.toFixed(4)], ["RMS Δp", "delta_p_rms", (v) => v.toExponential(2)]];
  const legend = el("div", null, { class: "legend small" });
  legend.append("KL (nats): ");
  [1e-7, 1e-5, 1e-3, 1e-1, 1].forEach((v) => legend.appendChild(el("span", v.toExponential(0), { style: `background:${klColour(v)}` })));
  legend.append(" · grey: context, not scored · click a token (or Tab to it, then Enter) for both models' top-5");
  const out = el("div", null, { id: "tokens-out" });
  const detail = el("div", null, { id: "detail" });
  root.append(controls, promptBox, legend, out, detail);
  if (D.view) { // a long run: its page holds the tokens of the first prompts only
    const v = D.view;
    const note = el("p", `This page's token view holds the first ${v.prompts} of ${v.of_prompts} prompts (${v.positions} of ${v.of_positions} positions, ` +
      `at most ${v.budget}), so that it stays small; the table lists every prompt. positions.csv.gz has every position, and `, { class: "small", id: "view-cut" });
    note.append(el("code", "harness report --view-positions N RUN_DIR"), " renders a page that holds more.");
    root.insertBefore(note, controls);
  }

  function fillTable() {
    const rowsOfPair = (D.prompt_rows || {})[pairSel.value] || [];
    promptBox.textContent = "";
    const t = el("table", null, { class: "sortable", id: "prompt-table" });
    const head = t.createTHead().insertRow();
    head.appendChild(el("th", "prompt", { "data-type": "text" }));
    COLS.forEach(([title]) => head.appendChild(el("th", title)));
    const body = t.createTBody();
    rowsOfPair.slice().sort((a, b) => (isNaN(num(b[2])) ? -1 : num(b[2])) - (isNaN(num(a[2])) ? -1 : num(a[2]))).forEach((r) => {
      const tr = body.insertRow();
      const name = r[0] >= 0 ? D.prompts[r[0]].id : "?";
      const cell = el("td", name, { class: "text" });
      tr.appendChild(cell);
      COLS.forEach((c, j) => {
        const v = num(r[j + 1]);
        tr.appendChild(el("td", isNaN(v) ? "–" : !isFinite(v) ? (v > 0 ? "∞" : "−∞") : c[2](v), { "data-v": String(v) }));
      });
      if (rowsOf.has(r[0])) clickable(cell, () => { promptSel.value = String(r[0]); draw(); out.scrollIntoView({ block: "nearest" }); });
      else if (D.view) cell.title = "not in this page's token view (see above)";
    });
    promptBox.append(el("p", "The pair's prompts, most drift first (prompts.csv has every column): click a prompt's name (or Tab to it, then Enter) to show it below.", { class: "small" }), t);
    makeSortable(t);
  }

  function fillPrompts() {
    const c = pairSel.value;
    const kl = D.kl[c];
    const keep = promptSel.value;
    promptSel.textContent = "";
    const order = Array.from(rowsOf.keys()).map((p) => {
      let s = 0, n = 0;
      rowsOf.get(p).forEach((i) => { if (kl[i] !== null) { s += num(kl[i]); n += 1; } });
      return [p, n ? s / n : NaN];
    }).sort((a, b) => b[1] - a[1]);
    order.forEach(([p, m]) => promptSel.appendChild(el("option", `${D.prompts[p].id} (mean KL ${m.toExponential(2)})`, { value: p })));
    if (keep && rowsOf.has(Number(keep))) promptSel.value = keep;
  }

  function show(i, span) {
    out.querySelectorAll(".sel").forEach((s) => s.classList.remove("sel"));
    span.classList.add("sel");
    const c = pairSel.value;
    detail.textContent = "";
    const target = D.pos.target[i];
    const word = D.vocab[target] !== undefined ? D.vocab[target] : `#${target}`;
    const before = D.pos.depth ? `the ${D.pos.depth[i]} token${D.pos.depth[i] === 1 ? "" : "s"} before it in its window` : "the tokens before it in its window";
    detail.appendChild(el("p", `position ${D.pos.position[i]}: the token ${JSON.stringify(word)} (id ${target}), as each model predicted it ` +
      `from ${before} · KL ${num(D.kl[c][i]).toExponential(3)} nats · the token in bold, below the top 5 where it is not in them`));
    detail.append(topTable(D.reference, i), topTable(c, i));
  }

  function draw() {
    const c = pairSel.value;
    const p = Number(promptSel.value);
    const rows = rowsOf.get(p);
    const texts = D.prompts[p].texts;
    out.textContent = "";
    detail.textContent = "";
    const frag = document.createDocumentFragment();
    texts.forEach((text, t) => {
      const i = rows.get(t);
      if (i === undefined || D.kl[c][i] === null) { // context, or a position this pair does not align
        frag.appendChild(el("span", text, i === undefined ? { class: "ctx" } : { class: "ctx", title: "not aligned: the candidate's tokenizer splits here differently, or lacks the next token" }));
        return;
      }
      const kl = num(D.kl[c][i]);
      // a line break alone has no width: "↵" before it gives a newline token its colour and a place to click
      const shown = text.includes("\n") ? text.replace(/\n/g, "↵\n") : text;
      const span = el("span", shown, { class: "tok", style: `background:${klColour(kl)}`, title: `KL ${kl.toExponential(2)}` });
      clickable(span, () => show(i, span));
      frag.appendChild(span);
    });
    out.appendChild(frag);
    focusScrollers(); // the new prompt's tokens may scroll, or no longer
  }

  pairSel.addEventListener("change", () => { fillPrompts(); fillTable(); draw(); });
  promptSel.addEventListener("change", draw);
  fillPrompts();
  fillTable();
  draw();
}
buildView();

// a box that scrolls (a wide table on a phone, the config, the token view) takes the focus, so that the keyboard scrolls
// it too; one that fits does not, so that Tab does not stop on it
function focusScrollers() {
  document.querySelectorAll(".wide, .tall, pre, #tokens-out").forEach((box) => {
    const scrolls = box.scrollWidth > box.clientWidth + 1 || box.scrollHeight > box.clientHeight + 1;
    if (scrolls && !box.hasAttribute("tabindex")) box.setAttribute("tabindex", "0");
    else if (!scrolls && box.getAttribute("tabindex") === "0") box.removeAttribute("tabindex");
  });
}
focusScrollers();
window.addEventListener("resize", focusScrollers);
