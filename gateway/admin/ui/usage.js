// One key's requests per hour by decision over the last 7 days: an inline SVG drawn
// here from GET /keys/{id}/usage (the store's hourly counts), no library, no external asset.

import { api, path } from "./api.js";
import { add, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const HOURS = 168;
const WIDTH = 840;
const HEIGHT = 220;
const PAD = { left: 44, right: 8, top: 10, bottom: 26 };

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// Allowed is always green; every other decision gets the next refusal colour, the same order everywhere.
function seriesClass(decisions) {
  const refused = decisions.filter((d) => d !== "allowed");
  return (decision) => (decision === "allowed" ? "series-allowed" : `series-${refused.indexOf(decision) % 6}`);
}

function niceMax(n) {
  if (n <= 4) return Math.max(n, 1);
  const step = 10 ** Math.floor(Math.log10(n));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= n) return m * step;
  return n;
}

function hourLabel(ms) {
  return new Date(ms).toISOString().slice(0, 13).replace("T", " ") + ":00 UTC";
}

export function usageChart(usage) {
  const since = Date.parse(usage.since);
  const hours = usage.hours;
  const decisions = Object.keys(usage.by_decision).sort((a, b) => (a === "allowed" ? -1 : b === "allowed" ? 1
    : a.localeCompare(b)));
  const cls = seriesClass(decisions);
  // hour index -> decision -> count
  const perHour = new Map();
  for (const b of usage.buckets) {
    const i = Math.round((Date.parse(b.hour) - since) / 3600e3);
    if (!perHour.has(i)) perHour.set(i, new Map());
    perHour.get(i).set(b.decision, b.requests);
  }
  let peak = 0;
  for (const counts of perHour.values()) peak = Math.max(peak, [...counts.values()].reduce((a, b) => a + b, 0));
  const top = niceMax(peak);
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const barW = plotW / hours;
  const y = (n) => PAD.top + plotH - (n / top) * plotH;

  const grid = [0, 0.5, 1].map((f) => {
    const value = top * f;
    return s("g", { class: "chart-grid" },
      s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value) }),
      s("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" },
        Number.isInteger(value) ? value : value.toFixed(1)));
  });
  // A tick at each UTC midnight in the window.
  const ticks = [];
  for (let i = 0; i < hours; i += 1) {
    const at = new Date(since + i * 3600e3);
    if (at.getUTCHours() === 0) {
      const x = PAD.left + i * barW;
      ticks.push(s("g", { class: "chart-tick" },
        s("line", { x1: x, x2: x, y1: PAD.top + plotH, y2: PAD.top + plotH + 4 }),
        s("text", { x, y: HEIGHT - 8, "text-anchor": "middle" }, at.toISOString().slice(5, 10))));
    }
  }
  const bars = [];
  for (const [i, counts] of [...perHour.entries()].sort((a, b) => a[0] - b[0])) {
    let base = 0;
    const x = PAD.left + i * barW;
    const parts = decisions.filter((d) => counts.has(d));
    const label = `${hourLabel(since + i * 3600e3)}: ` + parts.map((d) => `${counts.get(d)} ${d}`).join(", ");
    const group = s("g", { class: "chart-hour", "data-hour": i }, s("title", null, label));
    for (const d of parts) {
      const n = counts.get(d);
      group.append(s("rect", { class: cls(d), x: x + 0.5, width: Math.max(barW - 1, 1), y: y(base + n),
        height: Math.max(y(base) - y(base + n), 0.5), "data-decision": d, "data-requests": n }));
      base += n;
    }
    bars.push(group);
  }
  const svg = s("svg", { class: "chart", id: "usage-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `Requests per hour by decision, last ${hours} hours: ${usage.total} in all` },
  grid, s("line", { class: "chart-axis", x1: PAD.left, x2: WIDTH - PAD.right, y1: PAD.top + plotH,
    y2: PAD.top + plotH }), ticks, bars);
  const legend = h("ul", { class: "legend", id: "usage-legend" }, decisions.map((d) =>
    h("li", { "data-decision": d }, h("span", { class: `swatch ${cls(d)}` }), d.replaceAll("_", " "), " ",
      h("span", { class: "muted num" }, String(usage.by_decision[d])))));
  return [svg, legend];
}

export async function usageCard(card, k) {
  const usage = await api("GET", path("keys", k.id, "usage"), { query: { hours: HOURS } });
  add(card, h("p", { class: "muted", id: "usage-summary" },
    usage.total ? `${usage.total} request${usage.total === 1 ? "" : "s"} in the last 7 days, per UTC hour.`
      : "No requests recorded in the last 7 days."));
  if (usage.total) add(card, usageChart(usage));
}
