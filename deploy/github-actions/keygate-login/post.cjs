// keygate-login, post step (runs when the job ends, also after a failure): the key revokes
// itself, so it is dead before its lifetime runs out. Nothing saved (the main step failed, or
// `revoke: false`) means nothing to do. A failed revocation is a warning, never a failed job:
// the key still expires at the end of its lifetime.
'use strict';

const { Failure, info, warning, state } = require('./commands.cjs');
const { revokeEndpoint, send, jsonBody, describe } = require('./gateway.cjs');

async function run(env) {
  const key = state(env, 'key');
  const gateway = state(env, 'gateway');
  if (!key || !gateway) {
    info('keygate-login: no key to revoke');
    return;
  }
  const response = await send(revokeEndpoint(gateway), {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}` },
    // SECURITY: the header holds the key; never send it on to wherever a redirect points.
    redirect: 'manual',
  }, `Keygate at ${gateway}`);
  const body = await jsonBody(response);
  if (response.status === 200) {
    info(`Revoked Keygate key ${body && typeof body.revoked === 'string' ? body.revoked : ''}`.trimEnd());
  } else if (response.status === 401) {
    // Keygate's answer to any key it no longer takes: expired, or revoked already.
    info('The Keygate key was already expired or revoked');
  } else {
    warning(`Keygate did not revoke the key (${describe(response, body)}); it expires at the end of its lifetime`);
  }
}

run(process.env).catch((err) => {
  const message = err instanceof Failure ? err.message : `unexpected ${err && err.name ? err.name : 'error'}`;
  warning(`Could not revoke the Keygate key: ${message}; it expires at the end of its lifetime`);
});
