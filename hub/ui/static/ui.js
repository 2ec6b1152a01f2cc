// The dashboard's only script: live rollout progress, confirmations, and a select
// that applies itself. Everything it writes goes through textContent, never HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function badge(state) {
  return el("span", state.replace(/_/g, " "), "badge s-" + state.replace(/_/g, "-"));
}

function rect(cls, x, width) {
  const r = document.createElementNS(SVG, "rect");
  r.setAttribute("class", cls);
  for (const [k, v] of [["x", x], ["y", 0], ["width", width], ["height", 10]]) r.setAttribute(k, v);
  return r;
}

function waveRow(w) {
  const n = (k) => w[k] || 0;
  const updating = w.devices - n("serving") - n("failed") - n("pending") - n("skipped") - n("rolled_back");
  const row = el("tr");
  row.append(el("td", w.wave), el("td", w.devices));
  const cell = el("td");
  const bar = document.createElementNS(SVG, "svg");
  bar.setAttribute("class", "bar");
  bar.setAttribute("viewBox", "0 0 100 10");
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", n("serving") + " of " + w.devices + " serving");
  const served = 100 * n("serving") / w.devices;
  bar.append(rect("b-pending", 0, 100), rect("b-serving", 0, served),
             rect("b-failed", served, 100 * n("failed") / w.devices));
  cell.append(bar);
  row.append(cell);
  for (const value of [n("serving"), updating, n("pending"), n("failed"), n("skipped")]) {
    row.append(el("td", value));
  }
  return row;
}

function failedRow(d) {
  const row = el("tr");
  const link = el("a", d.device_id);
  link.href = "/ui/devices/" + encodeURIComponent(d.device_id);
  const first = el("td");
  first.append(link);
  const state = el("td");
  state.append(badge(d.state));
  row.append(first, el("td", d.wave), state, el("td", d.error || "", "error"));
  return row;
}

function showSoak(node, seconds) {
  node.dataset.seconds = seconds === null ? "" : String(seconds);
  node.textContent = seconds === null ? "" : ": next wave in " + Math.round(seconds) + " s";
}

function render(root, r) {
  const field = (name) => root.querySelector('[data-field="' + name + '"]');
  field("state").replaceChildren(badge(r.state));
  field("current_wave").textContent = r.current_wave;
  field("reason").textContent = r.reason || "";
  showSoak(field("soak_left"), r.soak_left);
  document.getElementById("wave-rows").replaceChildren(...r.waves_progress.map(waveRow));
  const failed = r.failed_devices.map(failedRow);
  if (!failed.length) {
    const none = el("tr", undefined, "none");
    const cell = el("td", "None.", "muted");
    cell.colSpan = 4;
    none.append(cell);
    failed.push(none);
  }
  document.getElementById("failed-rows").replaceChildren(...failed);
  for (const form of root.querySelectorAll("form[data-when]")) {
    form.hidden = !form.dataset.when.split(" ").includes(r.state);
  }
  root.dataset.terminal = r.terminal ? "yes" : "no";
}

function followRollout(root) {
  const url = root.dataset.progressUrl;
  async function poll() {
    try {
      const answer = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (answer.status === 401) { window.location.reload(); return; }
      if (answer.ok) render(root, await answer.json());
    } catch (e) { /* the hub restarting: try again next time */ }
    if (root.dataset.terminal !== "yes") setTimeout(poll, POLL_MS);
  }
  setTimeout(poll, POLL_MS);
  // Between polls the countdown runs on its own.
  setInterval(() => {
    const node = root.querySelector('[data-field="soak_left"]');
    if (node && node.dataset.seconds) showSoak(node, Math.max(0, Number(node.dataset.seconds) - 1));
  }, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const rollout = document.getElementById("rollout");
  if (rollout && rollout.dataset.terminal !== "yes") followRollout(rollout);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.requestSubmit());
  }
});
