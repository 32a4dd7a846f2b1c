// The admin API reference at /ui/api/: the API's own OpenAPI document (GET /admin/v1/openapi.json,
// no key needed) drawn as a page, operations grouped by tag. Nothing is fetched from anywhere else.

import { add, clear, h } from "./dom.js";

const DOCUMENT = "/admin/v1/openapi.json";
const METHODS = ["get", "post", "put", "patch", "delete"];
const REF = "#/components/schemas/";
// The document's components.schemas, once loaded: a request body's fields are shown where it is used.
let SCHEMAS = {};

// The document's descriptions use `code` spans: shown as <code>, every character still text.
function prose(text, tag = "p") {
  if (!text) return null;
  return h(tag, { class: "prose" }, String(text).split(/(`[^`]+`)/).map((part) =>
    part.length > 2 && part.startsWith("`") && part.endsWith("`") ? h("code", null, part.slice(1, -1)) : part));
}

function refName(ref) {
  return ref.startsWith(REF) ? ref.slice(REF.length) : ref;
}

function schemaLink(ref) {
  const name = refName(ref);
  return h("a", { href: `#schema-${name}`, class: "mono schema-ref" }, name);
}

// A schema in one line: its type, with references as links to the Schemas section.
function typeOf(schema) {
  if (!schema || typeof schema !== "object") return "any";
  if (schema.$ref) return schemaLink(schema.$ref);
  for (const key of ["anyOf", "oneOf", "allOf"]) {
    if (schema[key]) {
      const parts = schema[key].map(typeOf);
      return parts.flatMap((p, i) => (i ? [key === "allOf" ? " & " : " | ", p] : [p]));
    }
  }
  if (schema.const !== undefined) return h("code", null, JSON.stringify(schema.const));
  if (schema.enum) return [schema.type || "", " ", h("span", { class: "muted" }, "one of "),
    schema.enum.map((v, i) => [i ? ", " : "", h("code", null, JSON.stringify(v))])];
  if (schema.type === "array") return ["array of ", typeOf(schema.items)];
  if (schema.type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
    return ["object of ", typeOf(schema.additionalProperties)];
  }
  const type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
  return schema.format ? `${type} (${schema.format})` : type;
}

function constraints(schema) {
  const notes = [];
  for (const [key, label] of [["minimum", "≥"], ["maximum", "≤"], ["minLength", "min length"],
    ["maxLength", "max length"], ["minItems", "min items"], ["pattern", "pattern"]]) {
    if (schema && schema[key] !== undefined) notes.push(`${label} ${schema[key]}`);
  }
  if (schema && schema.default !== undefined) notes.push(`default ${JSON.stringify(schema.default)}`);
  return notes.length ? h("span", { class: "muted small" }, notes.join(" · ")) : null;
}

function propertiesTable(schema, id) {
  const props = Object.entries(schema.properties || {});
  if (!props.length) return h("p", { class: "muted" }, typeOf(schema));
  const required = new Set(schema.required || []);
  return h("div", { class: "table-wrap" }, h("table", { class: "table", id },
    h("thead", null, h("tr", null, ["Field", "Type", "Description"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", null, props.map(([name, p]) => h("tr", null,
      h("td", { class: "mono nowrap" }, name, required.has(name) ? h("span", { class: "required" }, " required")
        : null),
      h("td", null, typeOf(p), " ", constraints(p)),
      h("td", null, prose(p.description, "span"),
        p.examples ? h("span", { class: "muted small" }, " e.g. ", p.examples.map((e, i) =>
          [i ? ", " : "", h("code", null, JSON.stringify(e))])) : null))))));
}

function parameters(op) {
  if (!op.parameters || !op.parameters.length) return null;
  return [h("h4", null, "Parameters"), h("div", { class: "table-wrap" }, h("table", { class: "table params" },
    h("thead", null, h("tr", null, ["Name", "In", "Type", "Description"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", null, op.parameters.map((p) => h("tr", { "data-param": p.name },
      h("td", { class: "mono nowrap" }, p.name, p.required ? h("span", { class: "required" }, " required") : null),
      h("td", null, p.in),
      h("td", null, typeOf(p.schema), " ", constraints(p.schema)),
      h("td", null, prose(p.description, "span")))))))];
}

function requestBody(op) {
  const body = op.requestBody;
  if (!body) return null;
  return [h("h4", null, "Request body", body.required ? h("span", { class: "required" }, " required")
    : h("span", { class: "muted small" }, " optional")),
  Object.entries(body.content || {}).map(([type, media]) => {
    const named = media.schema && media.schema.$ref ? SCHEMAS[refName(media.schema.$ref)] : media.schema;
    return [h("p", { class: "body-type" }, h("code", null, type), " ", typeOf(media.schema)),
      named && named.properties ? propertiesTable(named, null) : null];
  })];
}

function responses(op) {
  return [h("h4", null, "Responses"), h("ul", { class: "responses" },
    Object.entries(op.responses || {}).map(([status, r]) => h("li", { "data-status": status },
      h("span", { class: `status status-${status[0]}xx` }, status), " ", prose(r.description, "span"),
      Object.entries(r.content || {}).map(([type, media]) => h("span", { class: "muted small" }, " ",
        h("code", null, type), " ", typeOf(media.schema))),
      r.headers ? h("span", { class: "muted small" }, " headers: ",
        Object.keys(r.headers).map((name, i) => [i ? ", " : "", h("code", null, name)])) : null)))];
}

function needs(op) {
  const operation = op["x-keygate-operation"];
  if (!operation) return h("p", { class: "needs" }, h("span", { class: "tag" }, "no key needed"));
  const also = op["x-keygate-admitting"] || [];
  return h("p", { class: "needs" }, "Needs ", h("code", { class: "grant" }, operation),
    also.map((a) => [" or ", h("code", { class: "grant" }, a)]), " on the server ", h("code", null, "admin"));
}

function operation(path, method, op) {
  const anchor = `op-${op.operationId || `${method}-${path}`}`;
  return h("details", { class: "operation card", id: anchor, "data-method": method.toUpperCase(), "data-path": path,
    open: true },
  h("summary", null, h("span", { class: `method method-${method}` }, method.toUpperCase()), " ",
    h("code", { class: "path" }, path), " ", h("span", { class: "summary" }, op.summary || "")),
  needs(op), prose(op.description), parameters(op), requestBody(op), responses(op));
}

function render(main, doc) {
  const groups = new Map();
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!groups.has(tag)) groups.set(tag, []);
      groups.get(tag).push([path, method, op]);
    }
  }
  SCHEMAS = (doc.components && doc.components.schemas) || {};
  const schemas = Object.entries(SCHEMAS);
  const toc = h("nav", { class: "toc card", "aria-label": "Contents" }, h("h2", null, "Contents"),
    h("ul", null, [...groups.entries()].map(([tag, ops]) => h("li", null,
      h("a", { href: `#tag-${tag}` }, tag), " ", h("span", { class: "muted" }, String(ops.length)))),
    h("li", null, h("a", { href: "#schemas" }, "Schemas"), " ", h("span", { class: "muted" }, String(schemas.length)))));
  const info = doc.info || {};
  add(clear(main),
    h("div", { class: "page-head" }, h("h1", null, info.title || "API reference",
      h("span", { class: "tag" }, `v${info.version}`), h("span", { class: "tag" }, `OpenAPI ${doc.openapi}`))),
    prose(info.description),
    h("div", { class: "reference-layout" }, toc, h("div", { class: "reference-body" },
      [...groups.entries()].map(([tag, ops]) => h("section", { id: `tag-${tag}`, class: "tag-group" },
        h("h2", null, tag), ops.map(([path, method, op]) => operation(path, method, op)))),
      h("section", { id: "schemas" }, h("h2", null, "Schemas"),
        schemas.map(([name, schema]) => h("details", { class: "card schema", id: `schema-${name}`, open: true },
          h("summary", null, h("code", null, name)), prose(schema.description),
          propertiesTable(schema, `schema-table-${name}`)))))));
  // The anchor asked for in the address exists only now.
  if (window.location.hash) {
    const target = document.getElementById(decodeURIComponent(window.location.hash.slice(1)));
    if (target) target.scrollIntoView();
  }
}

async function start() {
  const main = document.getElementById("main");
  const errorBox = document.getElementById("error");
  try {
    const response = await fetch(DOCUMENT, { cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
      headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${DOCUMENT} answered ${response.status}`);
    render(main, await response.json());
  } catch (err) {
    add(clear(errorBox), h("strong", null, "The API document could not be loaded"), " ", String(err.message || err));
    errorBox.hidden = false;
  } finally {
    main.removeAttribute("aria-busy");
  }
}

start();
