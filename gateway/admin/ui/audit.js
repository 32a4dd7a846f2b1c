// The audit trail: management events (who did what) and request records (what
// the proxy decided), for the audit log page and for one key's page.

import { api } from "./api.js";
import { add, clear, field, h, paged, table, time } from "./dom.js";

function isRequest(item) {
  return item.type === "request";
}

function scalar(value) {
  if (Array.isArray(value)) return value.length ? value.join(", ") : null;
  if (value && typeof value === "object") return JSON.stringify(value);
  return value === null || value === undefined || value === "" ? null : String(value);
}

// An event's details as "name value" pairs, leaving out what is empty.
function details(value) {
  const pairs = Object.entries(value || {}).map(([k, v]) => [k, scalar(v)]).filter(([, v]) => v !== null);
  if (pairs.length === 0) return h("span", { class: "muted" }, "—");
  return h("span", { class: "kv" }, pairs.map(([k, v]) => h("span", { class: "kv-pair" },
    h("span", { class: "kv-key" }, k), " ", h("span", { class: "kv-value" }, v))));
}

function keyLink(id) {
  return id ? h("a", { href: `#/keys/${encodeURIComponent(id)}`, class: "mono" }, id) : h("span", { class: "muted" }, "—");
}

function eventRow(e) {
  return h("tr", null,
    h("td", null, time(e.at, { seconds: true })),
    h("td", { class: "mono small" }, e.actor),
    h("td", null, h("span", { class: "tag" }, e.action)),
    h("td", { class: "mono small" }, e.target),
    h("td", null, details(e.details)));
}

function decision(r) {
  const allowed = r.decision === "allowed";
  return h("span", { class: `badge ${allowed ? "badge-active" : "badge-revoked"}`, title: r.reason || null },
    r.decision.replaceAll("_", " "));
}

function requestRow(r) {
  return h("tr", null,
    h("td", null, time(r.at, { seconds: true })),
    h("td", { class: "mono small request" }, `${r.method} ${r.path}`),
    h("td", null, decision(r)),
    h("td", { class: "num" }, r.status),
    h("td", { class: "mono small" }, r.client_ip || "—"));
}

const EVENT_COLUMNS = ["When", "Actor", "Action", "Target", "Details"];
const REQUEST_COLUMNS = ["When", "Request", "Decision", "Status", "Client IP"];

export async function auditTable(query) {
  const page = await api("GET", "/audit", { query: { ...query, type: "event", limit: 20 } });
  return table(EVENT_COLUMNS, page.items.map(eventRow), { id: "key-audit", empty: "No audit events." });
}

export async function requestTable(query) {
  const page = await api("GET", "/audit", { query: { ...query, type: "request", limit: 20 } });
  return table(REQUEST_COLUMNS, page.items.map(requestRow), { id: "key-requests",
    empty: "No requests recorded yet." });
}

// Management events first: the page's own API calls would otherwise fill the request records.
const TYPES = [["event", "Management events"], ["request", "Request records"], ["all", "Events and requests"]];
const FILTERS = ["type", "key", "action", "decision", "since", "until"];

function mixedRow(item) {
  const request = isRequest(item);
  return h("tr", { "data-type": item.type },
    h("td", null, time(item.at, { seconds: true })),
    h("td", null, h("span", { class: `type type-${item.type}` }, request ? "request" : "event")),
    h("td", { class: "mono small" }, request ? keyLink(item.key_id) : item.actor),
    h("td", null, request ? h("span", { class: "mono small request" }, `${item.method} ${item.path}`)
      : h("span", { class: "tag" }, item.action)),
    h("td", { class: "nowrap" }, request ? [decision(item), " ", h("span", { class: "muted num" }, item.status)]
      : h("span", { class: "mono small" }, item.target)),
    h("td", null, request ? h("span", { class: "mono small" }, item.client_ip || "—") : details(item.details)));
}

export async function auditPage(main, params, ctx) {
  const inputs = {
    type: h("select", { name: "type", id: "audit-type" },
      TYPES.map(([v, label]) => h("option", { value: v, selected: (params.get("type") || "event") === v }, label))),
    key: h("input", { name: "key", id: "audit-key", placeholder: "kg_…", value: params.get("key") || "" }),
    action: h("input", { name: "action", id: "audit-action", placeholder: "e.g. key.revoke",
      value: params.get("action") || "" }),
    decision: h("input", { name: "decision", id: "audit-decision", placeholder: "e.g. invalid_token",
      value: params.get("decision") || "" }),
    since: h("input", { name: "since", id: "audit-since", placeholder: "7d or 2026-11-01",
      value: params.get("since") || "" }),
    until: h("input", { name: "until", id: "audit-until", placeholder: "1h or 2026-11-30",
      value: params.get("until") || "" }),
  };
  const filters = h("form", { class: "filters", id: "audit-filters", onsubmit: (e) => {
    e.preventDefault();
    ctx.go("#/audit", Object.fromEntries(FILTERS.map((k) => [k, inputs[k].value.trim()])));
  } },
  field("Show", inputs.type), field("Key", inputs.key), field("Action", inputs.action),
  field("Decision", inputs.decision), field("Since", inputs.since), field("Until", inputs.until),
  h("button", { type: "submit", class: "button" }, "Filter"));

  const wrap = table(["When", "Type", "Actor / key", "Action / request", "Target / decision", "Details / client"],
    [], { id: "audit-table", empty: "Nothing in the audit trail matches." });
  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "Audit log")), filters, wrap);
  const query = Object.fromEntries(FILTERS.map((k) => [k, params.get(k)]));
  // A cross-org admin's chosen org; an org admin reads its own org's trail whatever it asks.
  query.org = ctx.org() || null;
  const type = query.type || "event";
  query.type = type === "all" ? null : type;
  await paged(wrap, (cursor) => api("GET", "/audit", { query: { ...query, limit: 50, cursor } }), mixedRow,
    ctx.guard);
}
