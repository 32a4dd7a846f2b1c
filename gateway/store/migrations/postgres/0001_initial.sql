-- Keys: the id is public, only an argon2id hash of the secret is kept.
CREATE TABLE keys (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    org           TEXT NOT NULL,
    user_name     TEXT NOT NULL DEFAULT '',
    role          TEXT,
    operations    JSONB NOT NULL DEFAULT '[]',
    servers       JSONB NOT NULL DEFAULT '["*"]',
    ip_allowlist  JSONB NOT NULL DEFAULT '[]',
    rate_limit    TEXT,
    agent         BOOLEAN NOT NULL DEFAULT FALSE,
    secret_hash   TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    last_used_at  TIMESTAMPTZ,
    last_used_ip  TEXT
);
CREATE INDEX keys_by_org_user ON keys (org, user_name);
-- At most one agent key per user and org that is not revoked (a rotated one
-- with a grace period carries a future revoked_at, so it does not count).
CREATE UNIQUE INDEX keys_one_agent ON keys (org, user_name) WHERE agent AND revoked_at IS NULL;

CREATE TABLE roles (
    name        TEXT PRIMARY KEY,
    grants      JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE members (
    org         TEXT NOT NULL,
    user_name   TEXT NOT NULL,
    role        TEXT NOT NULL REFERENCES roles (name),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (org, user_name)
);

CREATE TABLE audit_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    details  JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_by_target ON audit_events (target, at);
CREATE INDEX audit_events_by_at ON audit_events (at);

CREATE TABLE request_records (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           TIMESTAMPTZ NOT NULL,
    key_id       TEXT,
    method       TEXT NOT NULL,
    path         TEXT NOT NULL,
    server       TEXT,
    operation    TEXT,
    decision     TEXT NOT NULL,
    status       INTEGER NOT NULL,
    client_ip    TEXT,
    duration_ms  DOUBLE PRECISION NOT NULL,
    reason       TEXT
);
CREATE INDEX request_records_by_key ON request_records (key_id, at);
CREATE INDEX request_records_by_at ON request_records (at);

-- Store-generated settings (the pepper when none is configured).
CREATE TABLE meta (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- The change feed: every authorization change adds a row, so running
-- gateways can poll "anything after seq N?" cheaply.
CREATE TABLE changes (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    entity  TEXT NOT NULL,
    target  TEXT NOT NULL
);
