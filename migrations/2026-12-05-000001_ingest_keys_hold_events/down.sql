ALTER TABLE ingest_keys
    ADD COLUMN answer JSONB,
    ADD COLUMN owner  TEXT,
    ALTER COLUMN version DROP NOT NULL,
    ALTER COLUMN message_id DROP NOT NULL;
