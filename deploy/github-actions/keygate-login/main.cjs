// keygate-login, main step: trade this job's GitHub OIDC ID token for a short-lived Keygate key,
// mask it, put it in the job's environment and keep it in the action's state for post.cjs to
// revoke. Every failure is one ::error:: line and exit code 1; the key and the ID token are
// never printed (only to ::add-mask::, which the runner consumes).
'use strict';

const {
  Failure, info, mask, error, notice, input, booleanInput, exportVariable, saveState, setOutput,
} = require('./commands.cjs');
const { gatewayBase, tokenEndpoint, send, jsonBody, describe } = require('./gateway.cjs');

// RFC 8693 names.
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ID_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:id_token';
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
// An answer of 429 or 503 means Keygate did not look at (nor use up) the token: ask again.
const ATTEMPTS = 3;
const MAX_WAIT_S = 10;
// The claims that trust policies are usually written against, shown when no policy matched.
const SHOWN_CLAIMS = ['sub', 'aud', 'repository', 'ref', 'environment', 'job_workflow_ref'];

function settings(env) {
  const gateway = gatewayBase(input(env, 'gateway-url') || failMissing('gateway-url'));
  const envVar = input(env, 'env-var') || 'KEYGATE_TOKEN';
  if (!ENV_NAME.test(envVar)) throw new Failure(`env-var: "${envVar}" is not an environment variable name`);
  // The runner refuses to overwrite its own variables from $GITHUB_ENV.
  if (/^(GITHUB_|RUNNER_)/i.test(envVar)) {
    throw new Failure(`env-var: ${envVar} belongs to the runner; pick another name`);
  }
  for (const file of ['GITHUB_ENV', 'GITHUB_STATE', 'GITHUB_OUTPUT']) {
    if (!env[file]) throw new Failure(`${file} is not set: this runs only as a step of a GitHub Actions job`);
  }
  return {
    gateway,
    audience: input(env, 'audience') || gateway,
    policy: input(env, 'policy'),
    envVar,
    revoke: booleanInput(env, 'revoke', true),
  };
}

function failMissing(name) {
  throw new Failure(`input ${name} is required`);
}

// GitHub's documented request: GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...,
// `Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`, answer {"value": "<JWT>"}.
async function requestIdToken(env, audience) {
  const url = env.ACTIONS_ID_TOKEN_REQUEST_URL;
  const token = env.ACTIONS_ID_TOKEN_REQUEST_TOKEN;
  if (!url || !token) {
    throw new Failure(
      'this job may not request an ID token (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are not set): ' +
      'give the job `permissions: id-token: write` (workflow or job level); ' +
      'jobs of pull requests from forks do not get it',
    );
  }
  const response = await send(`${url}&audience=${encodeURIComponent(audience)}`,
    { headers: { Authorization: `bearer ${token}` } }, "GitHub's ID token service");
  const body = await jsonBody(response);
  if (response.status !== 200) {
    throw new Failure(`GitHub did not issue an ID token for audience ${audience}: HTTP ${response.status}`);
  }
  if (!body || typeof body.value !== 'string' || !body.value) {
    throw new Failure("GitHub's ID token service answered without a token (no \"value\")");
  }
  mask(body.value);
  return body.value;
}

// The claims of our own token, to say what a trust policy would have to match. They are not
// secret (the signature is what makes the token worth stealing, and it is not shown).
function claimsOf(idToken) {
  try {
    const payload = JSON.parse(Buffer.from(idToken.split('.')[1], 'base64url').toString('utf8'));
    return SHOWN_CLAIMS.filter((c) => c in payload).map((c) => `${c}=${JSON.stringify(payload[c])}`).join(' ');
  } catch {
    return '';
  }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function retryAfter(response) {
  const seconds = Number.parseInt(response.headers.get('retry-after') || '', 10);
  return Math.min(Number.isFinite(seconds) && seconds >= 0 ? seconds : 1, MAX_WAIT_S);
}

// RFC 8693 exchange at Keygate; the answer's JSON on 200.
async function exchange(config, idToken) {
  const form = new URLSearchParams({
    grant_type: TOKEN_EXCHANGE, subject_token: idToken, subject_token_type: ID_TOKEN_TYPE,
  });
  if (config.policy) form.set('policy', config.policy);
  const url = tokenEndpoint(config.gateway);
  for (let attempt = 1; ; attempt += 1) {
    const response = await send(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: form.toString(),
      // SECURITY: the body holds the ID token; never resend it to wherever a redirect points.
      redirect: 'manual',
    }, `Keygate at ${config.gateway}`);
    const body = await jsonBody(response);
    if (response.status === 200) return body || {};
    if ((response.status === 429 || response.status === 503) && attempt < ATTEMPTS) {
      const wait = retryAfter(response);
      info(`Keygate is busy (${describe(response, body)}); asking again in ${wait} s`);
      await sleep(wait * 1000);
      continue;
    }
    let message = `Keygate refused the exchange at ${url}: ${describe(response, body)}`;
    if (body && body.error === 'invalid_grant') {
      message += `. No trust policy accepted this job's token for audience ${config.audience}` +
        (config.policy ? ` and policy ${config.policy}` : '');
      const claims = claimsOf(idToken);
      if (claims) message += `; its claims: ${claims}`;
    } else if (response.status === 404) {
      message += '. Is gateway-url the proxy listener of a Keygate that has the identity exchange?';
    }
    throw new Failure(message);
  }
}

async function run(env) {
  const config = settings(env);
  const idToken = await requestIdToken(env, config.audience);
  const answer = await exchange(config, idToken);
  const key = answer.access_token;
  // SECURITY: a key with a line break or a space could not be masked as one value.
  if (typeof key !== 'string' || !/^[\x21-\x7e]+$/.test(key)) {
    throw new Failure(`Keygate at ${config.gateway} answered 200 without a usable access_token`);
  }
  mask(key);
  exportVariable(env, config.envVar, key);
  if (config.revoke) {
    saveState(env, 'gateway', config.gateway);
    saveState(env, 'key', key);
  }
  const keyId = typeof answer.key_id === 'string' ? answer.key_id : '';
  const expiresIn = Number.isInteger(answer.expires_in) ? String(answer.expires_in) : '';
  setOutput(env, 'key-id', keyId);
  setOutput(env, 'expires-in', expiresIn);
  notice(`Keygate key ${keyId || '(no id given)'} is in $${config.envVar}` +
    (expiresIn ? `, valid for ${expiresIn} s` : '') +
    (config.revoke ? '; it is revoked when the job ends' : '; it is not revoked at the end (revoke: false)'));
}

run(process.env).catch((err) => {
  if (err instanceof Failure) {
    error(err.message);
  } else {
    // SECURITY: an unexpected error's message may quote data; its type and stack frames do not.
    const frames = String(err && err.stack ? err.stack : '').split('\n').slice(1).join('\n');
    error(`keygate-login failed unexpectedly (${err && err.name ? err.name : typeof err})\n${frames}`);
  }
  process.exitCode = 1;
});
