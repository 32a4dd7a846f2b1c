// Roles (named sets of operation grants) and each org's members.

import { api, path } from "./api.js";
import { confirmAction, showKeyOnce } from "./dialogs.js";
import { add, chips, clear, field, h, paged, table, time, words } from "./dom.js";

const BUILT_IN = "admin";

export async function rolesPage(main, _params, ctx) {
  const name = h("input", { name: "name", id: "role-name", required: true, placeholder: "e.g. deploy-only" });
  const grants = h("input", { name: "grants", id: "role-grants", required: true,
    placeholder: "e.g. deploy servers:read" });
  const form = h("form", { class: "card form", id: "role-form", onsubmit: (e) => ctx.guard((async () => {
    e.preventDefault();
    await api("PUT", path("roles", name.value.trim()), { body: { grants: words(grants.value) } });
    ctx.flash(`Role ${name.value.trim()} saved.`);
    await ctx.render();
  })()) },
  h("h2", null, "Create or change a role"),
  h("div", { class: "grid" }, field("Name", name),
    field("Grants", grants, "Space-separated operations; wildcards: *, servers:*, *:read.")),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "button primary", id: "role-submit" },
    "Save role")));

  function row(r) {
    return h("tr", { "data-role": r.name },
      h("td", { class: "name" }, r.name),
      h("td", null, chips(r.grants)),
      h("td", null, time(r.updated_at)),
      // The built-in admin role cannot change or go (the API answers 409): no buttons that would fail.
      h("td", { class: "row-actions" }, r.name === BUILT_IN ? h("span", { class: "tag", title: "Created by " +
        "keygate migrate; it cannot be changed or deleted" }, "built-in") : [
        h("button", { type: "button", class: "button small", "data-action": "edit", onclick: () => {
          name.value = r.name;
          grants.value = r.grants.join(" ");
          grants.focus();
        } }, "Edit"),
        h("button", { type: "button", class: "button small danger", "data-action": "delete",
          onclick: () => ctx.guard((async () => {
          if (!await confirmAction({ title: `Delete role ${r.name}?`, confirm: "Delete role",
            body: "Keys and members that use it must be changed first." })) return;
          await api("DELETE", path("roles", r.name));
          ctx.flash(`Role ${r.name} deleted.`);
          await ctx.render();
        })()) }, "Delete")]));
  }

  const wrap = table(["Role", "Grants", "Updated", ""], [], { id: "roles-table", empty: "No roles." });
  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "Roles")), wrap, form);
  await paged(wrap, (cursor) => api("GET", "/roles", { query: { limit: 100, cursor } }), row, ctx.guard);
}

export async function membersPage(main, params, ctx) {
  // An org admin's members are its own org's (the header names it); a cross-org admin picks an org.
  const me = ctx.me();
  const org = (me.any_org && params.get("org")) || ctx.org() || me.org;
  // Every org that holds keys or members (GET /orgs: an org admin's own only); another, new org by name.
  const orgs = (await api("GET", "/orgs")).items;
  const orgList = h("nav", { class: "org-list", id: "org-list", "aria-label": "Orgs" },
    h("span", { class: "org-list-label" }, orgs.length === 1 ? "Org" : `${orgs.length} orgs`),
    orgs.map((o) => h("a", { href: `#/members?org=${encodeURIComponent(o)}`, class: o === org ? "chip current" : "chip",
      "data-org": o, "aria-current": o === org ? "page" : null }, o)));
  const orgInput = h("input", { name: "org", id: "members-org", value: orgs.includes(org) ? "" : org,
    placeholder: "another org" });
  const picker = me.any_org ? h("form", { class: "filters", id: "org-picker", onsubmit: (e) => {
    e.preventDefault();
    ctx.go("#/members", { org: orgInput.value.trim() });
  } }, field("Other org", orgInput, "A new org exists once it has a member or a key."),
  h("button", { type: "submit", class: "button" }, "Show members")) : null;

  const roles = await api("GET", "/roles", { query: { limit: 200 } });
  const user = h("input", { name: "user", id: "member-user", required: true, placeholder: "e.g. alice" });
  const role = h("select", { name: "role", id: "member-role", required: true },
    roles.items.map((r) => h("option", { value: r.name }, r.name)));
  const form = h("form", { class: "card form", id: "member-form", onsubmit: (e) => ctx.guard((async () => {
    e.preventDefault();
    await api("PUT", path("orgs", org, "members", user.value.trim()), { body: { role: role.value } });
    ctx.flash(`${user.value.trim()} is a member of ${org} with role ${role.value}.`);
    await ctx.render();
  })()) },
  h("h2", null, `Add or change a member of ${org}`),
  h("div", { class: "grid" }, field("User", user), field("Role", role,
    "Bounds what the user's keys and agent key may do in this org.")),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "button primary", id: "member-submit" },
    "Save member")));

  function row(m) {
    return h("tr", { "data-user": m.user },
      h("td", { class: "name" }, m.user),
      h("td", null, m.role),
      h("td", null, time(m.created_at)),
      h("td", null, time(m.updated_at)),
      h("td", { class: "row-actions" },
        h("button", { type: "button", class: "button small", "data-action": "agent-key",
          onclick: () => ctx.guard((async () => {
          if (!await confirmAction({ title: `Issue an agent key for ${m.user}?`, danger: false,
            confirm: "Issue agent key",
            body: `${m.user}'s previous agent key in ${org}, if any, is revoked at the same time.` })) return;
          const issued = await api("POST", path("orgs", org, "members", m.user, "agent-key"));
          await showKeyOnce(issued.key, { title: `Agent key for ${m.user}`, id: issued.id });
          ctx.flash(`Agent key ${issued.id} issued for ${m.user}` +
            (issued.revoked_previous ? `; ${issued.revoked_previous} is revoked.` : "."));
          await ctx.render();
        })()) }, "Agent key"),
        h("button", { type: "button", class: "button small danger", "data-action": "remove",
          onclick: () => ctx.guard((async () => {
          if (!await confirmAction({ title: `Remove ${m.user} from ${org}?`, confirm: "Remove member",
            body: `${m.user}'s per-user keys in ${org} stop working within a second.` })) return;
          await api("DELETE", path("orgs", org, "members", m.user));
          ctx.flash(`${m.user} removed from ${org}.`);
          await ctx.render();
        })()) }, "Remove")));
  }

  const wrap = table(["User", "Role", "Member since", "Updated", ""], [],
    { id: "members-table", empty: `No members in ${org}.` });
  add(clear(main), h("div", { class: "page-head" }, h("h1", null, "Members")), orgList, picker, wrap, form);
  await paged(wrap, (cursor) => api("GET", path("orgs", org, "members"), { query: { limit: 100, cursor } }),
    row, ctx.guard);
}
