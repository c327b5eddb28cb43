-- The event a claimed idempotency key issued, stored before it is
-- published: a retry publishes this same event (same version, same message
-- id) rather than issuing a newer version, so a change is applied once
-- whatever failed after it was issued. `owner` names the request holding
-- the claim, so one that lost its claim to a retry stores nothing.
ALTER TABLE ingest_keys
    ADD COLUMN owner      TEXT,
    ADD COLUMN version    BIGINT,
    ADD COLUMN message_id TEXT;
