// What main.cjs and post.cjs share about the gateway: its URL, the two endpoints, and how an
// HTTP failure is put into words without the key or the ID token in them.
'use strict';

const { Failure } = require('./commands.cjs');

const TIMEOUT_MS = 30_000;
const USER_AGENT = 'keygate-login (GitHub Actions)';
const LOOPBACK = /^(localhost|127(\.\d{1,3}){3}|\[::1\])$/;

// The gateway's base URL without trailing slashes. SECURITY: https only (http for loopback, as
// Keygate allows it for issuers), since the ID token and then the key travel to it.
function gatewayBase(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    throw new Failure(`gateway-url: "${text}" is not a URL`);
  }
  if (url.protocol !== 'https:' && !(url.protocol === 'http:' && LOOPBACK.test(url.hostname))) {
    throw new Failure(`gateway-url: ${text} must be an https:// URL (the ID token and the key are sent to it)`);
  }
  if (url.search || url.hash || url.username || url.password) {
    throw new Failure(`gateway-url: ${text} must not carry a query, a fragment or credentials`);
  }
  return url.href.replace(/\/+$/, '');
}

const tokenEndpoint = (base) => `${base}/.well-known/keygate/token`;
const revokeEndpoint = (base) => `${base}/.well-known/keygate/revoke`;

function reason(err) {
  if (err && err.name === 'TimeoutError') return `no answer within ${TIMEOUT_MS / 1000} s`;
  const cause = err && err.cause;
  return (cause && (cause.code || cause.message)) || (err && err.message) || 'unknown error';
}

// fetch with a deadline; a connection failure becomes a Failure naming `what`.
async function send(url, options, what) {
  try {
    return await fetch(url, {
      ...options,
      headers: { 'User-Agent': USER_AGENT, Accept: 'application/json', ...options.headers },
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
  } catch (err) {
    throw new Failure(`${what} is unreachable: ${reason(err)}`);
  }
}

// The answer's JSON object, or null. Never JSON.parse's message: it quotes the text it read.
async function jsonBody(response) {
  let text;
  try {
    text = await response.text();
  } catch {
    return null;
  }
  try {
    const value = JSON.parse(text);
    return value && typeof value === 'object' && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

// "HTTP 400 invalid_grant: the token matches no trust policy" from an RFC 6749 §5.2 answer.
function describe(response, body) {
  let text = `HTTP ${response.status}`;
  if (body && typeof body.error === 'string') text += ` ${body.error}`;
  if (body && typeof body.error_description === 'string') text += `: ${body.error_description}`;
  return text;
}

module.exports = { TIMEOUT_MS, gatewayBase, tokenEndpoint, revokeEndpoint, send, jsonBody, describe };
