// A small SVG line chart: several series on shared axes, redrawn as points stream in.
// SVG (not canvas) so each point is an element tests and assistive tech can see, and the
// chart stays sharp at any zoom. No dependencies.

const NS = "http://www.w3.org/2000/svg";
const W = 560;
const H = 220;
const PAD = { left: 56, right: 16, top: 14, bottom: 30 };
const MAX_DOTS = 200;

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function label(value) {
  const a = Math.abs(value);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(3)).toString();
}

/**
 * new LineChart(container, {title, series: [{key, name, color}], xLabel})
 * .add(key, x, y) appends a point and redraws; .points(key) reads them back.
 */
export class LineChart {
  constructor(container, { title, series, xLabel = "step" }) {
    this.series = series.map((s) => ({ ...s, data: [] }));
    this.xLabel = xLabel;
    this.title = title;
    this.root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart" });
    this.root.append(svg("title", {}, title));
    const figure = document.createElement("figure");
    figure.className = "chart-figure";
    const caption = document.createElement("figcaption");
    caption.append(title, " ");
    for (const s of this.series) {
      const key = document.createElement("span");
      key.className = "legend";
      key.style.setProperty("--swatch", s.color);
      key.textContent = s.name;
      caption.append(key);
    }
    figure.append(caption, this.root);
    container.append(figure);
    this.draw();
  }

  add(key, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    const s = this.series.find((item) => item.key === key);
    const last = s.data[s.data.length - 1];
    if (last && last[0] === x) last[1] = y;
    else s.data.push([x, y]);
    s.data.sort((a, b) => a[0] - b[0]);
    this.draw();
  }

  points(key) {
    return this.series.find((item) => item.key === key).data.slice();
  }

  bounds() {
    const all = this.series.flatMap((s) => s.data);
    if (!all.length) return null;
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y1 - y0 < 1e-12) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
    const x0 = Math.min(0, ...xs);
    return { x0, x1: Math.max(x0 + 1, ...xs), y0, y1 };
  }

  draw() {
    const root = this.root;
    while (root.childNodes.length > 1) root.lastChild.remove();
    const b = this.bounds();
    const plotW = W - PAD.left - PAD.right;
    const plotH = H - PAD.top - PAD.bottom;
    root.append(svg("rect", { x: PAD.left, y: PAD.top, width: plotW, height: plotH, class: "plot" }));
    if (!b) {
      root.append(svg("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" }, "waiting for data…"));
      return;
    }
    const sx = (x) => PAD.left + ((x - b.x0) / (b.x1 - b.x0)) * plotW;
    const sy = (y) => PAD.top + plotH - ((y - b.y0) / (b.y1 - b.y0)) * plotH;
    this.axes(b, sx, sy, plotH);
    for (const s of this.series) this.line(s, sx, sy);
    const latest = this.series.filter((s) => s.data.length).map((s) => {
      const [x, y] = s.data[s.data.length - 1];
      return `${s.name} ${label(y)} at ${this.xLabel} ${x}`;
    });
    this.root.setAttribute("aria-label", `${this.title}: ${latest.join(", ")}`);
  }

  axes(b, sx, sy, plotH) {
    for (const t of niceTicks(b.y0, b.y1)) {
      this.root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
      this.root.append(svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
    }
    for (const t of niceTicks(b.x0, b.x1, 5).filter((v) => Number.isInteger(v))) {
      this.root.append(svg("text", { x: sx(t), y: PAD.top + plotH + 16, "text-anchor": "middle", class: "tick" }, label(t)));
    }
    this.root.append(svg("text", { x: W - PAD.right, y: H - 2, "text-anchor": "end", class: "axis" }, this.xLabel));
  }

  line(s, sx, sy) {
    if (!s.data.length) return;
    const d = s.data.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    const group = svg("g", { class: "series", "data-series": s.key, "data-points": String(s.data.length) });
    group.append(svg("path", { d, stroke: s.color, class: "line" }));
    if (s.data.length > MAX_DOTS) return; // long runs: the line alone, redrawn cheaply
    for (const [x, y] of s.data) {
      const dot = svg("circle", { cx: sx(x), cy: sy(y), r: s.data.length > 60 ? 2 : 3, fill: s.color, class: "point" });
      dot.append(svg("title", {}, `${s.name} at ${this.xLabel} ${x}: ${label(y)}`));
      group.append(dot);
    }
    this.root.append(group);
  }
}
