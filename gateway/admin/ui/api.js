// The admin API client: the pasted admin key lives in this tab's sessionStorage
// only (gone when the tab closes or on sign-out) and goes out as a Bearer token.

const STORAGE_KEY = "keygate.admin-key";
// The org a cross-org admin (orgs:any) chose in the header's switcher; empty = every org.
const ORG_KEY = "keygate.org";
const BASE = "/admin/v1";

export const session = {
  key: () => sessionStorage.getItem(STORAGE_KEY),
  signIn: (key) => sessionStorage.setItem(STORAGE_KEY, key),
  signOut: () => {
    sessionStorage.removeItem(STORAGE_KEY);
    sessionStorage.removeItem(ORG_KEY);
  },
  chosenOrg: () => sessionStorage.getItem(ORG_KEY) || "",
  chooseOrg: (org) => (org ? sessionStorage.setItem(ORG_KEY, org) : sessionStorage.removeItem(ORG_KEY)),
};

export class ApiError extends Error {
  constructor(status, title, detail, errors = null) {
    super(detail ? `${title}: ${detail}` : title);
    this.status = status;
    this.title = title;
    this.detail = detail;
    // A 422's problem per field: [{field, message}].
    this.errors = errors;
  }
}

export function path(...segments) {
  return segments.map((s) => "/" + encodeURIComponent(s)).join("");
}

// One call to the admin API; answers its JSON, or throws ApiError carrying the
// problem+json title and detail so the page can show them as they are.
export async function api(method, route, { query, body } = {}) {
  const url = new URL(BASE + route, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json, application/problem+json" };
  const key = session.key();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, "The admin listener did not answer", String(err.message || err));
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const title = (data && data.title) || response.statusText || "Request failed";
    const detail = (data && (data.detail || data.error_description)) || (data ? "" : text.slice(0, 300));
    const errors = data && Array.isArray(data.errors) ? data.errors : null;
    throw new ApiError(response.status, `${title} (${response.status})`, detail, errors);
  }
  return data;
}
