// Tiny DOM and formatting helpers shared by the pages (no framework, no build step).

/** h("tag.class#id", {attr: value, onclick: fn}, ...children) -> element. */
export function h(spec, attrs = {}, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/i) || [null, "div", ""];
  const el = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A labelled form control; `control` is an input/select element. */
export function field(label, control, hint) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  return h("div.field", {}, h("label", { for: id }, label), control, hint ? h("small.hint", {}, hint) : null);
}

/** The page's error banner: role=alert so screen readers announce it. */
export function errorBox(error) {
  return h("div.error", { role: "alert" }, h("strong", {}, "Error: "), error.message || String(error));
}

export function notice(text) {
  return h("div.notice", { role: "status" }, text);
}

export function bytes(n) {
  const value = Number(n || 0);
  if (value < 1024) return `${value} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let scaled = value / 1024;
  let unit = 0;
  while (scaled >= 1024 && unit < units.length - 1) {
    scaled /= 1024;
    unit += 1;
  }
  return `${scaled.toFixed(scaled < 10 ? 1 : 0)} ${units[unit]}`;
}

export function when(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return isNaN(date) ? String(timestamp) : date.toLocaleString();
}

export function duration(seconds) {
  const s = Math.max(0, Math.round(Number(seconds) || 0));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** "JOB_STATE_RUNNING" -> "running", "ADAPTER_KIND_TEXTUAL_INVERSION" -> "textual inversion". */
export function enumWord(value, prefix) {
  if (value === undefined || value === null || value === "") return "";
  return String(value).replace(prefix, "").replace(/_/g, " ").toLowerCase();
}

export function shortDigest(hex) {
  return hex ? `${hex.slice(0, 12)}…` : "";
}

export function pngUrl(base64) {
  return `data:image/png;base64,${base64}`;
}
