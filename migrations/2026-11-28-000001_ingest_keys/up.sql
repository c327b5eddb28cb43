-- Idempotency keys of the ingest API: the first answer given under a key is
-- returned again for a retry of the same request, for a day. `answer` is
-- NULL while the first request is being published.
CREATE TABLE ingest_keys (
    key        TEXT PRIMARY KEY,
    request    TEXT NOT NULL,
    answer     JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ingest_keys_created_at ON ingest_keys (created_at);
