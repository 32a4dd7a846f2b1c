-- Key hygiene (leaked, decoy, idle and expiring keys) and webhooks.

-- A canary (decoy) key never authorizes: any use of it is an alarm.
ALTER TABLE keys ADD COLUMN canary BOOLEAN NOT NULL DEFAULT FALSE;
-- When a leak of the key was reported (set even when the kind's on_leak only flags).
ALTER TABLE keys ADD COLUMN leaked_at TIMESTAMPTZ;
-- When the key.idle event was sent for the key's current idle spell.
ALTER TABLE keys ADD COLUMN idle_notified_at TIMESTAMPTZ;
-- The expiry time the key.expiring event was sent for (a new expiry warns again).
ALTER TABLE keys ADD COLUMN expiry_warned_for TIMESTAMPTZ;

-- Webhook deliveries: one row per event and webhook, written in the same
-- transaction as the event's audit record, delivered by the serve process,
-- so a restart between the event and its delivery loses nothing.
CREATE TABLE webhook_outbox (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url              TEXT NOT NULL,
    event            TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    body             TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    delivered_at     TIMESTAMPTZ,
    abandoned_at     TIMESTAMPTZ,
    last_error       TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL AND abandoned_at IS NULL;
