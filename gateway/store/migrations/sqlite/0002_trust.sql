-- Trust policies: which OIDC tokens may be exchanged for a short-lived key,
-- and the key they yield. Lists and conditions are JSON text, as in keys.
CREATE TABLE trust_policies (
    name          TEXT PRIMARY KEY,
    issuer        TEXT NOT NULL,
    audience      TEXT NOT NULL,
    conditions    TEXT NOT NULL,
    org           TEXT NOT NULL,
    -- A role in use by a policy cannot be deleted (the service says so first).
    role          TEXT REFERENCES roles (name),
    operations    TEXT NOT NULL DEFAULT '[]',
    servers       TEXT NOT NULL DEFAULT '["*"]',
    ip_allowlist  TEXT NOT NULL DEFAULT '[]',
    rate_limit    TEXT,
    lifetime      INTEGER NOT NULL,
    jwks_file     TEXT,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX trust_policies_by_issuer ON trust_policies (issuer);

-- Tokens already exchanged (by jti, or the token's hash): a token is
-- exchanged once. A row may go once its token has expired.
CREATE TABLE exchanged_tokens (
    token_id      TEXT PRIMARY KEY,
    policy        TEXT NOT NULL,
    exchanged_at  TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
CREATE INDEX exchanged_tokens_by_expiry ON exchanged_tokens (expires_at);
