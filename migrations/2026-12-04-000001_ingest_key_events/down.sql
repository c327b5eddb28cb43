ALTER TABLE ingest_keys
    DROP COLUMN owner,
    DROP COLUMN version,
    DROP COLUMN message_id;
