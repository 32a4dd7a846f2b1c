// The shell: sign-in, hash routes, and one place that shows API errors.

import { ApiError, api, session } from "./api.js";
import { auditPage } from "./audit.js";
import { add, clear, field, h } from "./dom.js";
import { createPage, keyPage, keysPage } from "./keys.js";
import { membersPage, rolesPage } from "./people.js";

const ROUTES = {
  keys: keysPage,
  new: createPage,
  roles: rolesPage,
  members: membersPage,
  audit: auditPage,
};

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
const orgContext = document.getElementById("org-context");
let pendingFlash = null;
let renderCount = 0;
// The signed-in admin key (GET /whoami) and, for a cross-org admin, the orgs it may switch between.
let me = null;
let orgs = [];

function parseHash() {
  const [route, query = ""] = window.location.hash.replace(/^#\/?/, "").split("?");
  const parts = route.split("/").map(decodeURIComponent);
  return { parts: parts[0] ? parts : ["keys"], params: new URLSearchParams(query) };
}

function showError(err) {
  const title = err instanceof ApiError ? err.title : "Something went wrong";
  const detail = err instanceof ApiError ? err.detail : String(err && err.message ? err.message : err);
  clear(errorBox).append(
    h("strong", null, title), detail ? h("span", { id: "error-detail" }, " ", detail) : null,
    h("button", { type: "button", class: "close", "aria-label": "Dismiss", onclick: hideError }, "×"));
  errorBox.hidden = false;
}

function hideError() {
  errorBox.hidden = true;
  clear(errorBox);
}

const ctx = {
  go(hash, params = {}) {
    const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v)).toString();
    const target = query ? `${hash}?${query}` : hash;
    if (window.location.hash === target) render();
    else window.location.hash = target;
  },
  flash(message) {
    pendingFlash = message;
  },
  // Runs an action, showing any failure; a refused admin key signs the page out.
  async guard(promise) {
    try {
      return await promise;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        session.signOut();
        forget();
        await render();
      }
      showError(err);
      return undefined;
    }
  },
  render: () => render(),
  me: () => me,
  // The org the pages work in: an org admin's own; a cross-org admin's choice ("" = every org).
  org: () => (me && !me.any_org ? me.org : session.chosenOrg()),
};

// Who is signed in, once per sign-in: the header shows their org, or the switcher for a cross-org admin.
async function loadMe() {
  if (me) return;
  me = await api("GET", "/whoami");
  orgs = me.any_org ? (await api("GET", "/orgs")).items : [me.org];
  if (me.any_org && session.chosenOrg() && !orgs.includes(session.chosenOrg())) session.chooseOrg("");
}

function showOrg() {
  clear(orgContext);
  if (!me) return;
  if (!me.any_org) {
    add(orgContext, h("span", { class: "org-label" }, "Org"), h("strong", { id: "current-org" }, me.org));
    return;
  }
  const chosen = session.chosenOrg();
  const switcher = h("select", { id: "org-switcher", "aria-label": "Org" },
    h("option", { value: "" }, "All orgs"),
    orgs.map((o) => h("option", { value: o, selected: o === chosen }, o)));
  switcher.addEventListener("change", () => {
    session.chooseOrg(switcher.value);
    // The chosen org replaces any org the page's own filters named: back to the section's start.
    const target = `#/${parseHash().parts[0]}`;
    if (window.location.hash === target) render();
    else window.location.hash = target;
  });
  add(orgContext, h("span", { class: "org-label" }, "Org"), switcher);
}

function forget() {
  me = null;
  orgs = [];
}

function signInPage(view) {
  const key = h("input", { type: "password", id: "signin-key", name: "key", required: true, autofocus: true,
    autocomplete: "off", spellcheck: "false", placeholder: "kg_…" });
  add(view, h("div", { class: "signin" },
    h("div", { class: "signin-brand" }, h("img", { src: "favicon.svg", alt: "", width: 40, height: 40 }),
      h("h1", null, "Keygate")),
    h("form", { class: "card form", id: "signin-form", onsubmit: (e) => ctx.guard((async () => {
      e.preventDefault();
      session.signIn(key.value.trim());
      forget();
      try {
        // Proves the key before showing anything, and learns its org: whoami needs a key that
        // manages keys (keys:read, keys:write, keys:self) on the server admin.
        await loadMe();
      } catch (err) {
        session.signOut();
        forget();
        throw err;
      }
      await render();
    })()) },
    h("h2", null, "Sign in"),
    field("Admin key", key, ["A key on the server admin, for example from",
      h("code", { class: "command" }, "keygate keys create --name me --role admin --server admin"),
      "It is kept in this browser tab only, until you sign out."]),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "button primary", id: "signin-submit" },
      "Sign in")))));
}

function notFound(view) {
  add(view, h("div", { class: "card" }, h("h1", null, "Page not found"),
    h("p", null, h("a", { href: "#/keys" }, "Back to the keys"))));
}

async function render() {
  const mine = ++renderCount;
  const { parts, params } = parseHash();
  const signedIn = Boolean(session.key());
  document.getElementById("topbar").hidden = !signedIn;
  const section = parts[0] === "keys" && parts.length > 1 ? "keys" : parts[0];
  for (const link of document.querySelectorAll(".nav a")) {
    link.classList.toggle("current", signedIn && link.dataset.section === section);
  }
  // Each page is built off-screen and swapped in whole; a slower, older render never overwrites a newer one.
  const name = !signedIn ? "signin" : parts[0] === "keys" && parts.length > 1 ? "key" : section;
  const view = h("div", { class: "view", "data-view": name });
  main.setAttribute("aria-busy", "true");
  let failure = null;
  try {
    if (signedIn) await loadMe();
    if (!signedIn) signInPage(view);
    else if (parts[0] === "keys" && parts.length === 2) await keyPage(view, parts[1], ctx);
    else if (ROUTES[parts[0]] && parts.length === 1) await ROUTES[parts[0]](view, params, ctx);
    else notFound(view);
  } catch (err) {
    failure = err;
  }
  if (mine !== renderCount) return;
  main.removeAttribute("aria-busy");
  hideError();
  showOrg();
  if (failure) {
    if (failure instanceof ApiError && failure.status === 401) {
      session.signOut();
      forget();
      await render();
      showError(failure);
      return;
    }
    showError(failure);
  }
  if (pendingFlash) {
    view.prepend(h("div", { class: "notice success", role: "status", id: "flash" }, pendingFlash));
    pendingFlash = null;
  }
  main.replaceChildren(view);
  const focus = view.querySelector("[autofocus]");
  if (focus) focus.focus();
}

document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  forget();
  clear(document.getElementById("dialog"));
  window.location.hash = "#/keys";
  render();
});
window.addEventListener("hashchange", render);
render();
