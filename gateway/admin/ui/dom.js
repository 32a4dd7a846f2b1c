// Building the page without ever parsing HTML: every string becomes a text node,
// so key names, org names and API messages (user input) can never inject markup.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "value" || name === "checked" || name === "selected") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  add(el, ...children);
  return el;
}

export function add(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    // append() with a string creates a text node: never markup.
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// "2026-11-23 05:38 UTC"; with seconds where order matters (the audit trail).
export function when(iso, { seconds = false } = {}) {
  if (!iso) return null;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toISOString().slice(0, seconds ? 19 : 16).replace("T", " ") + " UTC";
}

export function ago(iso, now = Date.now()) {
  if (!iso) return null;
  const seconds = Math.round((now - new Date(iso).getTime()) / 1000);
  const future = seconds < 0;
  const s = Math.abs(seconds);
  if (s < 10) return "just now";
  const [n, unit] = s < 60 ? [s, "s"] : s < 3600 ? [Math.floor(s / 60), "min"]
    : s < 86400 ? [Math.floor(s / 3600), "h"] : [Math.floor(s / 86400), "d"];
  return future ? `in ${n} ${unit}` : `${n} ${unit} ago`;
}

// A date with its exact value on hover; "—" where there is none.
export function time(iso, { relative = false, seconds = false, empty = "—" } = {}) {
  if (!iso) return h("span", { class: "muted" }, empty);
  return h("time", { datetime: iso, title: iso }, relative ? ago(iso) : when(iso, { seconds }));
}

export function badge(status) {
  return h("span", { class: `badge badge-${status}` }, status);
}

export function chips(values, { empty = "—" } = {}) {
  if (!values || values.length === 0) return h("span", { class: "muted" }, empty);
  return h("span", { class: "chips" }, values.map((v) => h("span", { class: "chip" }, v)));
}

export function words(text) {
  return String(text || "").split(/[\s,]+/).filter(Boolean);
}

export function field(label, control, hint) {
  return h("label", { class: "field" },
    h("span", { class: "field-label" }, label), control, hint ? h("span", { class: "hint" }, hint) : null);
}

export function table(columns, rows, { empty = "Nothing here yet.", id } = {}) {
  const head = h("thead", null, h("tr", null, columns.map((c) => h("th", { scope: "col" }, c))));
  const body = h("tbody", null, rows.length ? rows
    : h("tr", null, h("td", { class: "empty", colspan: columns.length }, empty)));
  return h("div", { class: "table-wrap" }, h("table", { class: "table", id }, head, body));
}

// Fills a table page by page: the first page replaces the "nothing here" row,
// and "Load more" fetches the next one with the API's cursor.
export function paged(wrap, fetchPage, row, guard) {
  const tbody = wrap.querySelector("tbody");
  const more = h("div", { class: "more" });
  wrap.after(more);
  let first = true;
  async function load(cursor) {
    const page = await fetchPage(cursor);
    if (first && page.items.length) clear(tbody);
    first = false;
    add(tbody, page.items.map(row));
    clear(more);
    if (page.next_cursor) {
      add(more, h("button", { type: "button", class: "button", id: "load-more",
        onclick: () => guard(load(page.next_cursor)) }, "Load more"));
    }
  }
  return load(null);
}
