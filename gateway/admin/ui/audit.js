// The audit trail: management events (who did what) and request records (what
// the proxy decided), for the audit log page and for one key's page.

import { api } from "./api.js";
import { add, clear, field, h, paged, table, time } from "./dom.js";

function isRequest(item) {
  return item.type === "request" || "method" in item;
}

function details(value) {
  if (!value || (typeof value === "object" && Object.keys(value).length === 0)) {
    return h("span", { class: "muted" }, "—");
  }
  return h("code", { class: "details" }, typeof value === "string" ? value : JSON.stringify(value));
}

function keyLink(id) {
  return id ? h("a", { href: `#/keys/${encodeURIComponent(id)}`, class: "mono" }, id) : h("span", { class: "muted" }, "—");
}

function eventRow(e) {
  return h("tr", null,
    h("td", null, time(e.at)),
    h("td", { class: "mono small" }, e.actor),
    h("td", null, h("span", { class: "tag" }, e.action)),
    h("td", { class: "mono small" }, e.target),
    h("td", null, details(e.details)));
}

function requestRow(r) {
  const allowed = r.decision === "allowed" || r.decision === "allow";
  return h("tr", null,
    h("td", null, time(r.at)),
    h("td", null, keyLink(r.key_id)),
    h("td", { class: "mono small" }, `${r.method} ${r.path}`),
    h("td", null, h("span", { class: `badge ${allowed ? "badge-active" : "badge-revoked"}` }, r.decision)),
    h("td", { class: "num" }, r.status),
    h("td", { class: "mono small" }, r.client_ip || "—"));
}

const EVENT_COLUMNS = ["When", "Actor", "Action", "Target", "Details"];
const REQUEST_COLUMNS = ["When", "Key", "Request", "Decision", "Status", "Client IP"];

export async function auditTable(query) {
  const page = await api("GET", "/audit", { query: { ...query, limit: 20 } });
  const rows = page.items.filter((i) => !isRequest(i)).map(eventRow);
  return table(EVENT_COLUMNS, rows, { id: "key-audit", empty: "No audit events." });
}

export async function requestTable(query) {
  const page = await api("GET", "/audit", { query: { ...query, limit: 20 } });
  const rows = page.items.filter(isRequest).map(requestRow);
  return table(REQUEST_COLUMNS, rows, { id: "key-requests", empty: "No requests recorded yet." });
}

export async function auditPage(main, params, ctx) {
  const inputs = {
    key: h("input", { name: "key", id: "audit-key", placeholder: "kg_…", value: params.get("key") || "" }),
    action: h("input", { name: "action", id: "audit-action", placeholder: "e.g. key.revoke",
      value: params.get("action") || "" }),
    since: h("input", { name: "since", id: "audit-since", type: "date", value: params.get("since") || "" }),
    until: h("input", { name: "until", id: "audit-until", type: "date", value: params.get("until") || "" }),
  };
  const filters = h("form", { class: "filters", id: "audit-filters", onsubmit: (e) => {
    e.preventDefault();
    ctx.go("#/audit", Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()])));
  } },
  field("Key", inputs.key), field("Action", inputs.action), field("Since", inputs.since),
  field("Until", inputs.until), h("button", { type: "submit", class: "button" }, "Filter"));

  const wrap = table(EVENT_COLUMNS, [], { id: "audit-table", empty: "No audit events match." });
  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "Audit log")), filters, wrap);
  const query = Object.fromEntries(["key", "action", "since", "until"].map((k) => [k, params.get(k)]));
  await paged(wrap, (cursor) => api("GET", "/audit", { query: { ...query, limit: 50, cursor } }),
    (i) => (isRequest(i) ? requestRow(i) : eventRow(i)), ctx.guard);
}
