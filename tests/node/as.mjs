// A real OAuth 2.1 / OpenID Connect authorization server for proxyd's tests: npm `oidc-provider`
// (panva), configured the way an MCP deployment needs it. Driven by tests/kit/oauth.py.
//
//   node as.mjs [--scopes "mcp:tools mcp:write"] [--client-id ID --client-secret SECRET]
//               [--exit-on-eof]
//
// Issuer http://127.0.0.1:<port> (port 0: the system picks; `LISTENING <port>` on stdout once
// it serves). Features:
//   * RFC 8414 metadata at /.well-known/oauth-authorization-server (the same document as the
//     OIDC discovery at /.well-known/openid-configuration), JWKS at /jwks (an ES256 key made
//     at start-up, `kid` "as-es256").
//   * RFC 7591 dynamic client registration at /reg, open (no initial access token).
//   * Authorization code with PKCE required (S256) for every client.
//   * RFC 8707 resource indicators: any absolute http(s) URL is a resource; its access tokens
//     are JWTs (RFC 9068, ES256) whose `aud` is that resource and whose `scope` holds the
//     granted scopes among --scopes. A user's token also carries `email`.
//   * client_credentials for the confidential client --client-id/--client-secret (scope:
//     --scopes), with resource indicators too (no user: `sub` is the client id, no email).
//   * No UI: the interaction URL /interaction/<uid> completes itself. Login: the fixed test
//     user `alice` (email alice@example.com). Consent: everything the client asked for (OIDC
//     scopes, claims, and the resource scopes of each requested resource). The redirects only
//     need the cookies the provider sets along the way (an HTTP client with a cookie jar).
//   * Every registration, consent and token issued is logged on stderr as one JSON line
//     (event, client, account, aud, scope; never token material).
import crypto from 'node:crypto';
import http from 'node:http';
import process from 'node:process';

import Provider from 'oidc-provider';

const TEST_USER = { accountId: 'alice', email: 'alice@example.com' };

function parseArgs(argv) {
  const args = { scopes: 'mcp:tools', clientId: 'machine', clientSecret: '', exitOnEof: false };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--scopes') args.scopes = argv[++i];
    else if (arg === '--client-id') args.clientId = argv[++i];
    else if (arg === '--client-secret') args.clientSecret = argv[++i];
    else if (arg === '--exit-on-eof') args.exitOnEof = true;
    else throw new Error(`unknown argument ${arg}`);
  }
  if (!args.clientSecret) args.clientSecret = crypto.randomBytes(24).toString('base64url');
  return args;
}

const args = parseArgs(process.argv.slice(2));
const resourceScopes = args.scopes.split(' ').filter(Boolean);

const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'as-es256', alg: 'ES256', use: 'sig' };

function isResourceUrl(indicator) {
  try {
    const url = new URL(indicator);
    return (url.protocol === 'http:' || url.protocol === 'https:') && !url.hash;
  } catch {
    return false;
  }
}

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: args.clientId,
        client_secret: args.clientSecret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        // Every scope the AS lists: a client that finds no scope in the resource's metadata
        // asks for all of `scopes_supported` (the MCP SDK does, whatever scope it was given);
        // the token only gets those of its resource (getResourceServerInfo).
        scope: ['openid', 'offline_access', 'email', ...resourceScopes].join(' '),
      },
    ],
    jwks: { keys: [signingKey] },
    clientDefaults: {
      grant_types: ['authorization_code'],
      id_token_signed_response_alg: 'ES256',
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', 'email', ...resourceScopes],
    claims: { openid: ['sub'], email: ['email', 'email_verified'] },
    pkce: { required: () => true },
    routes: { jwks: '/jwks', registration: '/reg' },
    async findAccount(_ctx, id) {
      if (id !== TEST_USER.accountId) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: TEST_USER.email, email_verified: true };
        },
      };
    },
    async extraTokenClaims(_ctx, token) {
      // The user's address in the JWT access token, where an API gateway reads it.
      if (token.accountId === TEST_USER.accountId) return { email: TEST_USER.email };
      return undefined;
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      registration: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // The resource of the authorization request is the one the code's token is for.
        defaultResource: async (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator) => {
          if (!isResourceUrl(indicator)) throw new Provider.errors.InvalidTarget();
          return {
            scope: resourceScopes.join(' '),
            audience: indicator,
            accessTokenTTL: 3600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
    },
  });

  provider.on('server_error', (_ctx, err) => log({ event: 'server_error', error: String(err) }));
  for (const model of ['access_token', 'client_credentials']) {
    for (const how of ['issued', 'saved']) { // JWTs are issued, opaque tokens saved
      provider.on(`${model}.${how}`, (token) => log({
        event: 'token',
        kind: model,
        client: token.clientId,
        account: token.accountId ?? null,
        aud: token.resourceServer?.audience ?? null,
        scope: token.scope ?? null,
      }));
    }
  }
  provider.on('registration_create.success', (_ctx, client) => log({
    event: 'registration', client: client.clientId,
  }));

  const callback = provider.callback();
  server.on('request', (req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (path === '/.well-known/oauth-authorization-server') {
      req.url = '/.well-known/openid-configuration'; // RFC 8414: the same document
    } else if (path.startsWith('/interaction/')) {
      interact(provider, req, res).catch((err) => {
        log({ event: 'interaction_error', error: String(err) });
        if (!res.headersSent) {
          res.writeHead(500, { 'content-type': 'text/plain' });
        }
        res.end(String(err));
      });
      return;
    }
    callback(req, res);
  });
  process.stdout.write(`LISTENING ${port}\n`);
});

// The login and consent a person would give, given at once (no UI): interactionFinished
// answers with the redirect back to the authorization endpoint.
async function interact(provider, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session, grantId } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId: TEST_USER.accountId } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }
  if (prompt.name !== 'consent') throw new Error(`unexpected prompt ${prompt.name}`);
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const saved = await grant.save();
  log({ event: 'consent', client: params.client_id, account: session.accountId });
  await provider.interactionFinished(req, res, { consent: { grantId: saved } }, {
    mergeWithLastSubmission: true,
  });
}

function log(record) {
  process.stderr.write(`${JSON.stringify(record)}\n`);
}

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args.exitOnEof) {
  process.stdin.on('end', stop);
  process.stdin.resume();
}
