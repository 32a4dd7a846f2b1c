// Keys: the table, the create form and one key's page.

import { api, path } from "./api.js";
import { confirmAction, formDialog, showKeyOnce } from "./dialogs.js";
import { add, badge, chips, clear, field, h, table, time, words } from "./dom.js";
import { auditTable, requestTable } from "./audit.js";
import { usageCard } from "./usage.js";

const STATUSES = ["active", "idle", "rotating", "expired", "revoked"];
const EXPIRIES = [["7d", "7 days"], ["30d", "30 days"], ["90d", "90 days"], ["1y", "1 year"],
  ["never", "Never"], ["custom", "Custom date"]];
const GRACES = [["", "No grace: old key revoked now"], ["1h", "Old key works 1 more hour"],
  ["24h", "Old key works 24 more hours"], ["7d", "Old key works 7 more days"]];

function owner(k) {
  return k.user ? [k.org, h("span", { class: "muted" }, " / "), k.user] : k.org;
}

// A canary never authorizes: it is marked wherever a key is shown, so no operator mistakes it for a real one.
function canaryTag(k) {
  return k.canary ? h("span", { class: "tag tag-canary", title: "A decoy: never authorizes; any use is an alarm" },
    "canary") : null;
}

function keyRow(k) {
  return h("tr", { "data-key-id": k.id },
    h("td", { class: "nowrap" }, h("a", { href: `#/keys/${encodeURIComponent(k.id)}`, class: "mono" }, k.id)),
    h("td", { class: "name" }, k.name),
    h("td", null, k.kind, k.agent ? h("span", { class: "tag" }, "agent") : null, canaryTag(k)),
    h("td", { class: "nowrap" }, owner(k)),
    h("td", null, k.role || h("span", { class: "muted" }, "—")),
    h("td", { class: "status" }, badge(k.status)),
    h("td", { class: "mono small" }, k.created_by),
    h("td", null, time(k.created_at)),
    h("td", null, time(k.expires_at, { empty: "never" })),
    h("td", null, time(k.last_used_at, { relative: true, empty: "never" })));
}

// Sortable columns: [header, value to compare] (null: not sortable).
const COLUMNS = [
  ["Id", (k) => k.id], ["Name", (k) => k.name.toLowerCase()], ["Kind", (k) => k.kind],
  ["Org / user", (k) => `${k.org}/${k.user}`], ["Role", (k) => k.role || ""], ["Status", (k) => k.status],
  ["Created by", (k) => k.created_by], ["Created", (k) => k.created_at], ["Expires", (k) => k.expires_at || "~"],
  ["Last used", (k) => k.last_used_at || ""],
];

// Status, kind and org filter in the API (GET /keys pages its answer, so only it sees every key);
// the name search and the column sort work on the keys loaded so far, at once, as the operator types:
// "Load more" adds the next page to what they apply to.
export async function keysPage(main, params, ctx) {
  // "name" or "-name": the column and direction; the API's order (newest first) when none.
  let sort = params.get("sort") || "";
  const status = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "Any status"),
    STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const kind = h("input", { id: "filter-kind", name: "kind", type: "search", placeholder: "Any kind", list: "kinds",
    value: params.get("kind") || "" });
  // An org admin sees its own org's keys only (the header names it); a cross-org admin may filter by org.
  const anyOrg = ctx.me().any_org;
  const org = anyOrg ? h("input", { id: "filter-org", name: "org", type: "search", placeholder: "Any org",
    value: params.get("org") || ctx.org() }) : null;
  const search = h("input", { id: "filter-name", name: "q", type: "search", placeholder: "Name contains…",
    value: params.get("q") || "", autocomplete: "off" });
  const filters = h("form", { class: "filters", id: "key-filters", onsubmit: (e) => {
    e.preventDefault();
    ctx.go("#/keys", { status: status.value, kind: kind.value.trim(), org: org ? org.value.trim() : "",
      q: search.value.trim(), sort });
  } },
  h("datalist", { id: "kinds" }, h("option", { value: "integration" }), h("option", { value: "automation" })),
  field("Search", search), field("Status", status), field("Kind", kind), org ? field("Org", org) : null,
  h("button", { type: "submit", class: "button" }, "Filter"));
  status.addEventListener("change", () => filters.requestSubmit());

  const loaded = [];
  const headers = COLUMNS.map(([label], i) => h("th", { scope: "col", class: "sortable", "data-column": i },
    h("button", { type: "button", class: "sort", onclick: () => {
      const key = label.toLowerCase();
      sort = sort === key ? `-${key}` : sort === `-${key}` ? "" : key;
      draw();
    } }, label, h("span", { class: "sort-mark", "aria-hidden": "true" }))));
  const tbody = h("tbody");
  const wrap = h("div", { class: "table-wrap" },
    h("table", { class: "table", id: "keys-table" }, h("thead", null, h("tr", null, headers)), tbody));
  const count = h("p", { class: "muted small", id: "keys-count" });
  const more = h("div", { class: "more" });

  function draw() {
    const needle = search.value.trim().toLowerCase();
    let shown = loaded.filter((k) => !needle || k.name.toLowerCase().includes(needle));
    const at = COLUMNS.findIndex(([label]) => label.toLowerCase() === sort.replace(/^-/, ""));
    if (at >= 0) {
      const value = COLUMNS[at][1];
      const sign = sort.startsWith("-") ? -1 : 1;
      shown = [...shown].sort((a, b) => sign * String(value(a)).localeCompare(String(value(b))));
    }
    headers.forEach((th, i) => {
      const state = i === at ? (sort.startsWith("-") ? "descending" : "ascending") : "none";
      th.setAttribute("aria-sort", state);
    });
    tbody.replaceChildren(...(shown.length ? shown.map(keyRow)
      : [h("tr", null, h("td", { class: "empty", colspan: COLUMNS.length }, "No keys match."))]));
    count.textContent = needle ? `${shown.length} of the ${loaded.length} keys loaded match “${search.value.trim()}”.`
      : "";
    // The sort and search stay in the address, so a reload or a shared link shows the same.
    const wanted = new URLSearchParams(window.location.hash.split("?")[1] || "");
    for (const [name, value] of [["sort", sort], ["q", search.value.trim()]]) {
      if (value) wanted.set(name, value);
      else wanted.delete(name);
    }
    const query = wanted.toString();
    // Only while the keys list is the page asked for: never undo a navigation made meanwhile.
    if (/^#\/keys(\?|$)/.test(window.location.hash || "#/keys")) {
      window.history.replaceState(null, "", `#/keys${query ? `?${query}` : ""}`);
    }
  }
  search.addEventListener("input", draw);

  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "API keys"),
    h("a", { href: "#/new", class: "button primary", id: "new-key-link" }, "Create key")), filters, count, wrap,
  more);
  const query = { status: params.get("status"), kind: params.get("kind"),
    org: anyOrg ? params.get("org") || ctx.org() : null, limit: 50 };
  async function load(cursor) {
    const page = await api("GET", "/keys", { query: { ...query, cursor } });
    loaded.push(...page.items);
    draw();
    clear(more);
    if (page.next_cursor) {
      add(more, h("button", { type: "button", class: "button", id: "load-more",
        onclick: () => ctx.guard(load(page.next_cursor)) }, "Load more"));
    }
  }
  await load(null);
}

async function roleOptions(selected, { none = "No role" } = {}) {
  const page = await api("GET", "/roles", { query: { limit: 200 } });
  return [none ? h("option", { value: "" }, none) : null,
    page.items.map((r) => h("option", { value: r.name, selected: r.name === selected }, r.name))];
}

export async function createPage(main, _params, ctx) {
  const name = h("input", { name: "name", id: "create-name", required: true, maxlength: 200,
    placeholder: "e.g. github-actions-deploy", autocomplete: "off" });
  const kind = h("input", { name: "kind", id: "create-kind", value: "integration", list: "kinds" });
  const me = ctx.me();
  // An org admin creates keys in its own org only; a cross-org admin starts from the chosen org.
  const org = h("input", { name: "org", id: "create-org", value: ctx.org() || me.org, readonly: !me.any_org });
  const user = h("input", { name: "user", id: "create-user", placeholder: "empty: an org-level key",
    value: me.self_service ? me.user : "" });
  const role = h("select", { name: "role", id: "create-role" }, await roleOptions(null));
  const operations = h("input", { name: "operations", id: "create-operations",
    placeholder: "e.g. deploy servers:read" });
  const servers = h("input", { name: "servers", id: "create-servers", value: "*" });
  const ips = h("textarea", { name: "ip_allowlist", id: "create-ips", rows: 2,
    placeholder: "10.0.0.0/8\n2001:db8::/32" });
  const rate = h("input", { name: "rate_limit", id: "create-rate", placeholder: "server default, e.g. 100/minute" });
  const canary = h("input", { type: "checkbox", name: "canary", id: "create-canary" });
  const access = [role, operations, servers, ips, rate];
  canary.addEventListener("change", () => access.forEach((el) => { el.disabled = canary.checked; }));
  const expires = h("select", { name: "expires", id: "create-expires" },
    EXPIRIES.map(([v, label]) => h("option", { value: v, selected: v === "90d" }, label)));
  const custom = h("input", { type: "date", name: "expires_on", id: "create-expires-on", hidden: true });
  expires.addEventListener("change", () => {
    custom.hidden = expires.value !== "custom";
    custom.required = !custom.hidden;
  });

  async function submit(e) {
    e.preventDefault();
    const body = {
      name: name.value.trim(), kind: kind.value.trim(), org: org.value.trim(),
      expires: expires.value === "custom" ? custom.value : expires.value,
    };
    if (user.value.trim()) body.user = user.value.trim();
    if (canary.checked) {
      body.canary = true; // it takes no access settings
    } else {
      Object.assign(body, { operations: words(operations.value), servers: words(servers.value),
        ip_allowlist: words(ips.value) });
      if (role.value) body.role = role.value;
      if (rate.value.trim()) body.rate_limit = rate.value.trim();
    }
    const created = await api("POST", "/keys", { body });
    await showKeyOnce(created.key, { id: created.id });
    ctx.go(`#/keys/${encodeURIComponent(created.id)}`);
  }

  const form = h("form", { class: "card form", id: "create-form", onsubmit: (e) => ctx.guard(submit(e)) },
    h("datalist", { id: "kinds" }, h("option", { value: "integration" }), h("option", { value: "automation" })),
    h("fieldset", null, h("legend", null, "Key"),
      h("div", { class: "grid" },
        field("Name", name, "Shown in lists, logs and the X-Keygate-Key-Name header."),
        field("Kind", kind, "Sets the key's prefix (keys.kinds in the config): integration, automation, ..."),
        field("Org", org), field("User", user, "A per-user key needs the user to be a member of the org."),
        h("label", { class: "field check" }, h("span", { class: "field-label" }, "Canary"),
          h("span", { class: "inline" }, canary, "A decoy that never authorizes"),
          h("span", { class: "hint" }, "Plant it where only an intruder would look: any use is answered as an " +
            "unknown key and raises key.canary_used (audit event and webhook). It takes no access settings.")))),
    h("fieldset", null, h("legend", null, "Access"),
      h("div", { class: "grid" },
        field("Role", role),
        field("Operations", operations, "Space-separated. A key needs a role or an operation; with both, " +
          "it gets only what both allow."),
        field("Servers", servers, "Space-separated server names; * is every upstream but not admin."),
        field("IP allowlist", ips, "CIDRs, one per line; empty allows any address."))),
    h("fieldset", null, h("legend", null, "Limits"),
      h("div", { class: "grid" },
        field("Rate limit", rate, "Requests per second, minute, hour or day; optional \"; burst=N\"."),
        field("Expires", h("div", { class: "inline" }, expires, custom),
          "Rotate or create a new key before it expires."))),
    h("div", { class: "actions" },
      h("a", { href: "#/keys", class: "button ghost" }, "Cancel"),
      h("button", { type: "submit", class: "button primary", id: "create-submit" }, "Create key")));
  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "Create an API key")), form);
  name.focus();
}

const UNCHANGED = "unchanged";

// The key's name, servers, IP allowlist, rate limit and expiry in a dialog; only what was changed is
// sent (PATCH). The API checks the values: a refusal is shown in the dialog, which stays open.
function editKey(k, ctx) {
  const name = h("input", { name: "name", id: "edit-name", required: true, maxlength: 200, value: k.name,
    autocomplete: "off" });
  const servers = h("input", { name: "servers", id: "edit-servers", value: k.servers.join(" ") });
  const ips = h("textarea", { name: "ip_allowlist", id: "edit-ips", rows: 3, placeholder: "10.0.0.0/8\n2001:db8::/32" },
    k.ip_allowlist.join("\n"));
  const rate = h("input", { name: "rate_limit", id: "edit-rate", value: k.rate_limit || "",
    placeholder: "server default, e.g. 100/minute" });
  const expires = h("select", { name: "expires", id: "edit-expires" },
    h("option", { value: UNCHANGED }, k.expires_at ? `Unchanged (${k.expires_at.slice(0, 10)})` : "Unchanged (never)"),
    EXPIRIES.map(([v, label]) => h("option", { value: v }, v === "custom" ? label : `${label} from now`
      .replace("Never from now", "Never"))));
  const custom = h("input", { type: "date", name: "expires_on", id: "edit-expires-on", hidden: true });
  expires.addEventListener("change", () => {
    custom.hidden = expires.value !== "custom";
    custom.required = !custom.hidden;
  });
  // A canary takes no access settings: only its name and expiry change.
  const access = k.canary ? [] : [
    field("Servers", servers, "Space-separated; * is every upstream but not admin."),
    field("IP allowlist", ips, "CIDRs, one per line; empty allows any address."),
    field("Rate limit", rate, "e.g. 100/minute or 10/second; burst=50; empty = the server default."),
  ];
  return formDialog({
    title: `Edit ${k.id}`, id: "edit-form", submit: "Save changes",
    body: h("div", { class: "grid one" }, field("Name", name), access,
      field("Expires", h("div", { class: "inline" }, expires, custom), "Counted from now.")),
    save: () => {
      const body = {};
      if (name.value.trim() !== k.name) body.name = name.value.trim();
      if (!k.canary) {
        const newServers = words(servers.value);
        if (newServers.join(" ") !== k.servers.join(" ")) body.servers = newServers;
        const newIps = words(ips.value);
        if (newIps.join(" ") !== k.ip_allowlist.join(" ")) body.ip_allowlist = newIps;
        // null: back to the server's default.
        if (rate.value.trim() !== (k.rate_limit || "")) body.rate_limit = rate.value.trim() || null;
      }
      if (expires.value !== UNCHANGED) body.expires = expires.value === "custom" ? custom.value : expires.value;
      if (Object.keys(body).length === 0) return Promise.resolve({ unchanged: true });
      return api("PATCH", path("keys", k.id), { body });
    },
  }).then(async (saved) => {
    if (!saved) return;
    ctx.flash(saved.unchanged ? `Nothing changed on ${k.id}.` : `${k.id} saved.`);
    await ctx.render();
  });
}

function detail(label, value) {
  return [h("dt", null, label), h("dd", null, value)];
}

export async function keyPage(main, id, ctx) {
  const k = await api("GET", path("keys", id));
  const revoked = k.status === "revoked";
  const facts = h("dl", { class: "facts", id: "key-facts" },
    detail("Id", h("code", null, k.id)),
    detail("Status", h("span", { id: "key-status" }, badge(k.status))),
    detail("Kind", [k.kind, k.agent ? h("span", { class: "tag" }, "agent") : null, canaryTag(k)]),
    detail("Org / user", owner(k)),
    detail("Role", k.role || h("span", { class: "muted" }, "—")),
    detail("Operations", chips(k.operations)),
    detail("Servers", chips(k.servers)),
    detail("IP allowlist", chips(k.ip_allowlist, { empty: "any address" })),
    detail("Rate limit", k.rate_limit || h("span", { class: "muted" }, "server default")),
    detail("Created", [time(k.created_at), h("span", { class: "muted" }, " by "), h("code", null, k.created_by)]),
    detail("Expires", time(k.expires_at, { empty: "never" })),
    detail("Revoked", time(k.revoked_at, { empty: "—" })),
    detail("Last used", [time(k.last_used_at, { empty: "never" }),
      k.last_used_ip ? [h("span", { class: "muted" }, " from "), h("code", null, k.last_used_ip)] : null]));

  const actions = h("section", { class: "card actions-card" }, h("h2", null, "Actions"));
  const edit = revoked ? null : h("button", { type: "button", class: "button", id: "edit-key",
    onclick: () => ctx.guard(editKey(k, ctx)) }, "Edit key");
  if (k.canary) {
    add(actions, h("p", { class: "notice warning", id: "canary-notice" }, "This is a canary key: it never " +
      "authorizes. Any use is answered as an unknown key and recorded as key.canary_used (see the audit " +
      "events below)."));
  }
  if (revoked) {
    add(actions, h("p", { class: "muted" }, "This key is revoked. Revocation is permanent."));
  } else {
    const grace = h("select", { id: "rotate-grace" }, GRACES.map(([v, label]) => h("option", { value: v }, label)));
    const role = h("select", { id: "reassign-role" }, await roleOptions(k.role, { none: null }));
    add(actions,
      k.canary ? null : h("div", { class: "action" },
        h("div", null, h("h3", null, "Reassign role"),
          h("p", { class: "muted" }, "Takes effect on every gateway within a second.")),
        h("div", { class: "inline" }, role, h("button", { type: "button", class: "button", id: "reassign-submit",
          onclick: () => ctx.guard((async () => {
            await api("PATCH", path("keys", id), { body: { role: role.value } });
            ctx.flash(`Role of ${k.id} set to ${role.value}.`);
            await ctx.render();
          })()) }, "Save role"))),
      k.status === "rotating" ? h("div", { class: "action", id: "rotating-notice" },
        h("div", null, h("h3", null, "Rotate"),
          h("p", { class: "muted" }, "Already replaced by a rotation: it works until its revoked time. " +
            "Rotate the key that replaced it; revoke this one to end its grace now."))) :
      h("div", { class: "action" },
        h("div", null, h("h3", null, "Rotate"),
          h("p", { class: "muted" }, "A new key with the same settings, shown once.")),
        h("div", { class: "inline" }, grace, h("button", { type: "button", class: "button", id: "rotate-submit",
          onclick: () => ctx.guard((async () => {
            const ok = await confirmAction({ title: `Rotate ${k.id}?`, danger: false, confirm: "Rotate key",
              body: grace.value ? `The old key keeps working for ${grace.selectedOptions[0].textContent
                .replace("Old key works ", "")}, then it is revoked.`
                : "The old key is revoked now: anything still using it is refused within a second." });
            if (!ok) return;
            const body = grace.value ? { grace: grace.value } : {};
            const rotated = await api("POST", path("keys", id, "rotate"), { body });
            await showKeyOnce(rotated.key, { title: "Your rotated API key", id: rotated.id });
            ctx.flash(`${k.id} is rotated: this is its replacement, ${rotated.id}.`);
            ctx.go(`#/keys/${encodeURIComponent(rotated.id)}`);
          })()) }, "Rotate key"))),
      h("div", { class: "action danger-zone" },
        h("div", null, h("h3", null, "Revoke"),
          h("p", { class: "muted" }, "Refused by every gateway within a second. Permanent.")),
        h("button", { type: "button", class: "button danger", id: "revoke-key",
          onclick: () => ctx.guard((async () => {
            const ok = await confirmAction({ title: `Revoke ${k.id}?`, confirm: "Revoke key",
              body: `“${k.name}” stops working within a second, everywhere. This cannot be undone.` });
            if (!ok) return;
            await api("POST", path("keys", id, "revoke"));
            ctx.flash(`${k.id} is revoked.`);
            await ctx.render();
          })()) }, "Revoke key")));
  }

  const requests = h("section", { class: "card" }, h("h2", null, "Recent requests"));
  const usage = h("section", { class: "card", id: "key-usage" }, h("h2", null, "Requests per hour, last 7 days"));
  const events = h("section", { class: "card" }, h("h2", null, "Audit events"));
  const suggestion = k.canary ? null : h("section", { class: "card", id: "allowlist-suggestion" },
    h("h2", null, "Allowlist suggestion"));
  add(clear(main),
    h("div", { class: "page-head" },
      h("div", null, h("a", { href: "#/keys", class: "back" }, "← Keys"), h("h1", null, k.name, " ", badge(k.status))),
      edit),
    h("div", { class: "split" }, h("section", { class: "card" }, h("h2", null, "Details"), facts), actions),
    usage, suggestion, requests, events);
  await usageCard(usage, k);
  if (suggestion) add(suggestion, await allowlistSuggestion(k));
  add(requests, await requestTable({ key: k.id }));
  add(events, await auditTable({ key: k.id }));
}

// The narrowest CIDRs covering the addresses the key's allowed requests came from (last 30 days, at most 4),
// and the command that applies them; or why there is nothing to suggest.
async function allowlistSuggestion(k) {
  const found = await api("GET", path("keys", k.id, "allowlist-suggestion"));
  const message = h("p", { class: "muted", id: "suggestion-message" },
    found.message.charAt(0).toUpperCase() + found.message.slice(1) + ".");
  if (!found.cidrs.length) return message;
  return [
    message,
    table(["CIDR", "Requests", "Addresses"], found.cidrs.map((c) => h("tr", null,
      h("td", { class: "mono" }, c.cidr), h("td", null, String(c.requests)), h("td", null, String(c.addresses)))),
    { id: "suggestion-table" }),
    h("p", null, "Apply it (replaces the key's allowlist):"),
    h("pre", { class: "command", id: "suggestion-command" }, found.command),
  ];
}
