// A real OpenID provider for Keygate's tests: panva's oidc-provider (the release pinned in
// package.json) with the OAuth 2.0 device authorization grant (RFC 8628), on 127.0.0.1 over
// plain http. tests/oidc_provider/__init__.py (DeviceProvider) starts it; by hand:
//
//   npm ci && PORT=4000 INTERVAL=1 node provider.mjs
//
// Environment (every variable optional):
//   PORT             port on 127.0.0.1; 0 (the default) lets the system pick one. The issuer is
//                    http://127.0.0.1:PORT.
//   DEVICE_CODE_TTL  seconds a device_code and its user_code live (default 600, oidc-provider's).
//   INTERVAL         seconds; when set, device authorization responses carry `interval`.
//                    oidc-provider sends none (clients then poll every 5 s, RFC 8628 section 3.2).
//   SLOW_DOWN        "0" turns slow_down off (see below); on by default.
//   USERS_FILE       JSON list of test users (default users.json beside this file): sub, email,
//                    email_verified, name, password.
//   CLIENT_IDS       comma-separated ids of the public clients (default "keygate-cli,another-cli").
//   STOP_ON_STDIN_CLOSE  "1": exit when standard input closes, so that the provider never outlives
//                    the test process that started it with a pipe there, however that process ends.
//
// Once listening it prints one JSON line on stdout: {"issuer": "http://127.0.0.1:PORT", "port": PORT}.
// Requests are logged on stderr, one line each.
//
// What is this file's own and not oidc-provider's, each through a documented extension point:
// - the sign-in and consent pages (`interactions.url` and the interaction helpers), since
//   oidc-provider ships none past its development ones (devInteractions, turned off here);
// - `interval` in the device authorization response and the token endpoint's `slow_down`
//   (RFC 8628 section 3.5), which oidc-provider does not implement: a post-middleware turns an
//   `authorization_pending` answer into `slow_down` when the same device_code is polled sooner
//   than its interval after the previous poll, and from then on asks for 5 s more, as the RFC says.
// Storage is oidc-provider's own in-memory adapter: it keeps an expired device code (it evicts
// only past 1000 entries), so a late poll gets the grant's own `expired_token`.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const SLOW_DOWN_STEP = 5; // seconds, RFC 8628 section 3.5
const SLACK_MS = 100; // a poll this much early still counts as on time

function seconds(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a whole number of seconds, not ${JSON.stringify(raw)}`);
  }
  return value;
}

const PORT = seconds('PORT', 0);
const DEVICE_CODE_TTL = seconds('DEVICE_CODE_TTL', 600);
const INTERVAL = seconds('INTERVAL', undefined);
const SLOW_DOWN = process.env.SLOW_DOWN !== '0';
const USERS_FILE = process.env.USERS_FILE || new URL('./users.json', import.meta.url);
const CLIENT_IDS = (process.env.CLIENT_IDS || 'keygate-cli,another-cli').split(',').map((s) => s.trim()).filter(Boolean);

if (DEVICE_CODE_TTL < 1) throw new Error('DEVICE_CODE_TTL must be at least 1 second');

const USERS = JSON.parse(fs.readFileSync(USERS_FILE, 'utf8'));
const bySub = new Map(USERS.map((u) => [u.sub, u]));
const byEmail = new Map(USERS.map((u) => [u.email.toLowerCase(), u]));

// -- pages ------------------------------------------------------------------------------------
const escape = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escape(title)}</title></head>
<body>
<h1>${escape(title)}</h1>
${body}
</body>
</html>
`;
}

function loginPage(uid, clientId, error, username = '') {
  return page('Sign in', `<p>Sign in to continue to <strong>${escape(clientId)}</strong>.</p>
${error ? `<p class="error" role="alert">${escape(error)}</p>` : ''}
<form id="login" method="post" action="/interaction/${escape(uid)}/login">
  <label>Email <input type="email" name="username" value="${escape(username)}" autocomplete="username" required autofocus></label>
  <label>Password <input type="password" name="password" autocomplete="current-password" required></label>
  <button type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientId, user, scopes) {
  const items = scopes.map((s) => `<li>${escape(s)}</li>`).join('');
  return page('Authorize', `<p>Signed in as <strong>${escape(user.email)}</strong>.</p>
<p><strong>${escape(clientId)}</strong> asks for:</p>
<ul>${items}</ul>
<form id="consent" method="post" action="/interaction/${escape(uid)}/consent">
  <button type="submit" name="decision" value="approve" autofocus>Approve</button>
  <button type="submit" name="decision" value="deny">Deny</button>
</form>`);
}

async function formBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new errors.InvalidRequest('request body too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function checkPassword(user, password) {
  if (!user) return false;
  const want = Buffer.from(user.password, 'utf8');
  const got = Buffer.from(password || '', 'utf8');
  return want.length === got.length && crypto.timingSafeEqual(want, got);
}

// -- the provider -----------------------------------------------------------------------------
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(PORT, HOST, resolve);
});
const { port } = server.address();
const ISSUER = `http://${HOST}:${port}`;

const signingKey = {
  ...crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
  kid: `test-${crypto.randomBytes(6).toString('hex')}`,
  alg: 'RS256',
  use: 'sig',
};

const provider = new Provider(ISSUER, {
  clients: CLIENT_IDS.map((clientId) => ({
    client_id: clientId,
    client_name: clientId,
    token_endpoint_auth_method: 'none',
    grant_types: [DEVICE_GRANT, 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    id_token_signed_response_alg: 'RS256',
  })),
  async findAccount(ctx, sub) {
    const user = bySub.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, email: user.email, email_verified: user.email_verified, name: user.name };
      },
    };
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
  },
  scopes: ['openid', 'email', 'profile', 'offline_access'],
  // Scope-requested claims (email, name) in the ID token itself, which is what Keygate verifies;
  // by default oidc-provider puts them only in userinfo when an access token is issued too.
  conformIdTokenClaims: false,
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: {
    AccessToken: 3600,
    DeviceCode: DEVICE_CODE_TTL,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 3600,
  },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      async userCodeInputSource(ctx, form, out, err) {
        let message = 'Enter the code displayed on your device.';
        if (err && (err.userCode || err.name === 'NoCodeError')) message = 'The code you entered is incorrect. Try again.';
        else if (err && err.name === 'AbortedError') message = 'The sign-in request was interrupted.';
        else if (err) message = `There was an error processing your request: ${out?.error || err.message}.`;
        ctx.body = page('Device sign-in', `<p class="message">${escape(message)}</p>
${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
        ctx.body = page('Confirm device', `<p><strong>${escape(client.clientName || client.clientId)}</strong>
asks to sign in. The code on your device should be <code>${escape(userCode)}</code>.</p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
      },
      async successSource(ctx) {
        const { clientId, clientName } = ctx.oidc.client;
        ctx.body = page('Sign-in success', `<p>You signed in to <strong>${escape(clientName || clientId)}</strong>.
You can close this page.</p>`);
      },
    },
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<p class="error" role="alert"><code>${escape(out.error)}</code>: ${escape(out.error_description || '')}</p>`);
  },
});

// A request log on stderr, for a test's failure message.
provider.use(async (ctx, next) => {
  try {
    await next();
  } finally {
    const error = ctx.body && typeof ctx.body === 'object' && ctx.body.error ? ` ${ctx.body.error}` : '';
    process.stderr.write(`${ctx.method} ${ctx.path} ${ctx.status}${error}\n`);
  }
});

// RFC 8628's interval and slow_down (see the top of this file).
const polls = new Map(); // device_code -> { last: ms, interval: s }
provider.use(async (ctx, next) => {
  await next();
  const route = ctx.oidc?.route;
  if (route === 'device_authorization' && ctx.status === 200 && INTERVAL !== undefined) {
    ctx.body = { ...ctx.body, interval: INTERVAL };
  }
  const params = ctx.oidc?.params;
  if (route === 'token' && params?.grant_type === DEVICE_GRANT && typeof params.device_code === 'string') {
    const now = Date.now();
    const seen = polls.get(params.device_code) || { last: undefined, interval: INTERVAL ?? 5 };
    if (SLOW_DOWN && ctx.body?.error === 'authorization_pending' && seen.last !== undefined
        && now - seen.last < seen.interval * 1000 - SLACK_MS) {
      seen.interval += SLOW_DOWN_STEP;
      ctx.body = {
        error: 'slow_down',
        error_description: `polling too fast: wait ${seen.interval} seconds between requests`,
      };
    }
    seen.last = now;
    polls.set(params.device_code, seen);
  }
});

// The sign-in and consent pages.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|consent))?$/.exec(ctx.path);
  if (!match) return next();
  const [, uid, step] = match;
  ctx.set('cache-control', 'no-store');
  try {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid) throw new errors.SessionNotFound('interaction session mismatch');
    const { prompt, params } = details;
    const clientId = params.client_id;

    if (ctx.method === 'GET' && !step) {
      ctx.type = 'html';
      if (prompt.name === 'login') {
        ctx.body = loginPage(uid, clientId);
      } else if (prompt.name === 'consent') {
        const user = bySub.get(details.session.accountId);
        const scopes = String(params.scope || '').split(' ').filter(Boolean);
        ctx.body = consentPage(uid, clientId, user, scopes);
      } else {
        throw new errors.InvalidRequest(`unexpected prompt ${prompt.name}`);
      }
      return undefined;
    }

    if (ctx.method !== 'POST' || !step) {
      ctx.status = 405;
      ctx.body = page('Method not allowed', '');
      return undefined;
    }
    const body = await formBody(ctx.req);

    if (step === 'login') {
      if (prompt.name !== 'login') throw new errors.InvalidRequest('this interaction does not ask for a sign-in');
      const username = (body.get('username') || '').trim();
      const user = byEmail.get(username.toLowerCase());
      if (!checkPassword(user, body.get('password'))) {
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginPage(uid, clientId, 'Invalid email or password.', username);
        return undefined;
      }
      const to = await provider.interactionResult(ctx.req, ctx.res, { login: { accountId: user.sub } }, {
        mergeWithLastSubmission: false,
      });
      ctx.status = 303;
      return ctx.redirect(to);
    }

    // step === 'consent'
    if (prompt.name !== 'consent') throw new errors.InvalidRequest('this interaction does not ask for consent');
    const decision = body.get('decision');
    if (decision === 'deny') {
      const to = await provider.interactionResult(ctx.req, ctx.res, {
        error: 'access_denied',
        error_description: 'End-User denied the request',
      }, { mergeWithLastSubmission: false });
      ctx.status = 303;
      return ctx.redirect(to);
    }
    if (decision !== 'approve') throw new errors.InvalidRequest('decision must be approve or deny');
    const { details: missing } = prompt;
    let grant;
    if (details.grantId) {
      grant = await provider.Grant.find(details.grantId);
    } else {
      grant = new provider.Grant({ accountId: details.session.accountId, clientId });
    }
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    if (missing.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    const consent = details.grantId ? {} : { grantId };
    const to = await provider.interactionResult(ctx.req, ctx.res, { consent }, { mergeWithLastSubmission: true });
    ctx.status = 303;
    return ctx.redirect(to);
  } catch (err) {
    if (!(err instanceof errors.OIDCProviderError)) throw err;
    ctx.status = err.status;
    ctx.type = 'html';
    ctx.body = page('Error', `<p class="error" role="alert"><code>${escape(err.message)}</code>: ${escape(err.error_description || '')}</p>`);
    return undefined;
  }
});

provider.on('server_error', (ctx, err) => {
  process.stderr.write(`server_error on ${ctx.method} ${ctx.path}: ${err.stack || err}\n`);
});

server.on('request', provider.callback());

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (process.env.STOP_ON_STDIN_CLOSE === '1') {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ issuer: ISSUER, port })}\n`);
