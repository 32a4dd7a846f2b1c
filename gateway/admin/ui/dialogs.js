// Modal dialogs: a confirmation for destructive actions, and the one place a
// full key is ever shown.

import { ApiError } from "./api.js";
import { add, clear, h } from "./dom.js";

function dialog() {
  return document.getElementById("dialog");
}

function open(...children) {
  const d = dialog();
  clear(d).append(...children);
  d.showModal();
  return d;
}

// Resolves true only when the operator presses the confirming button.
export function confirmAction({ title, body, confirm, danger = true }) {
  return new Promise((resolve) => {
    const d = open(
      h("form", { method: "dialog", class: "dialog-body", id: "confirm-form" },
        h("h2", null, title),
        h("p", null, body),
        h("div", { class: "actions" },
          h("button", { type: "submit", value: "cancel", class: "button ghost", id: "confirm-cancel" }, "Cancel"),
          h("button", { type: "submit", value: "ok", class: danger ? "button danger" : "button primary",
            id: "confirm-ok" }, confirm))));
    d.addEventListener("close", () => {
      resolve(d.returnValue === "ok");
      clear(d);
    }, { once: true });
  });
}

async function copy(text, element) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context (admin listener on a LAN address over HTTP): select and copy.
    window.getSelection().selectAllChildren(element);
    return document.execCommand("copy");
  }
}

// Shows a new key exactly once. On close the key is dropped from the page, so
// it is not left in the DOM for anything that reads it later.
export function showKeyOnce(key, { title = "Your new API key", id = null } = {}) {
  return new Promise((resolve) => {
    const secret = h("code", { class: "secret", id: "new-key", "aria-label": "The new API key" }, key);
    const status = h("span", { class: "copy-status", id: "copy-status", role: "status" });
    const copyButton = h("button", { type: "button", class: "button primary", id: "copy-key",
      onclick: async () => {
        status.textContent = (await copy(key, secret)) ? "Copied to the clipboard." : "Select the key and copy it.";
      } }, "Copy key");
    const d = open(
      h("form", { method: "dialog", class: "dialog-body once", id: "key-once" },
        h("h2", null, title),
        id ? h("p", { class: "muted" }, "Key id ", h("code", null, id)) : null,
        h("div", { class: "notice warning", role: "note" },
          h("strong", null, "Copy this key now. It will not be shown again."),
          " Keygate keeps only a hash of it. If it is lost, rotate the key to get a new one."),
        h("div", { class: "secret-row" }, secret, copyButton),
        status,
        h("div", { class: "actions" },
          h("button", { type: "submit", class: "button", id: "key-once-done" }, "I have stored the key"))));
    d.addEventListener("close", () => {
      clear(d);
      resolve();
    }, { once: true });
  });
}

// A form in the dialog: `save` runs on submit with the form's values. When the API refuses
// (e.g. 422 with a problem per field), its title, detail and field errors are shown inside the
// dialog, which stays open with what was typed; resolves with save's result once it succeeds,
// or null when cancelled.
export function formDialog({ title, id, body, submit = "Save", save }) {
  return new Promise((resolve) => {
    const problem = h("div", { class: "notice error dialog-error", id: `${id}-error`, role: "alert", hidden: true });
    const button = h("button", { type: "submit", class: "button primary", id: `${id}-submit` }, submit);
    let result = null;
    const form = h("form", { class: "dialog-body form", id, onsubmit: async (e) => {
      e.preventDefault();
      button.disabled = true;
      try {
        result = await save();
        d.close();
      } catch (err) {
        const apiError = err instanceof ApiError;
        // Per-field problems are listed one per line; their summary (the detail) would repeat them.
        const fieldErrors = apiError && err.errors && err.errors.length ? err.errors : null;
        clear(problem);
        add(problem, h("div", null, h("strong", null, apiError ? err.title : "Something went wrong"),
          fieldErrors ? null : [" ", h("span", { class: "dialog-error-detail" },
            apiError ? err.detail : String(err.message || err))],
          fieldErrors ? h("ul", { class: "field-errors" }, fieldErrors.map((fe) => h("li", { "data-field": fe.field },
            h("code", null, fe.field), " ", fe.message))) : null));
        problem.hidden = false;
        problem.scrollIntoView({ block: "nearest" });
      } finally {
        button.disabled = false;
      }
    } },
    h("h2", null, title), problem, body,
    h("div", { class: "actions" },
      h("button", { type: "button", class: "button ghost", id: `${id}-cancel`, onclick: () => d.close() }, "Cancel"),
      button));
    const d = open(form);
    d.addEventListener("close", () => {
      clear(d);
      resolve(result);
    }, { once: true });
  });
}
