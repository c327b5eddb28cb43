-- An idempotency key holds the event its request issued, written once in
-- the transaction that issued the version: a retry publishes that event
-- again unless it is applied, so neither a claim (`owner`) nor a stored
-- answer is needed. Keys answered before keep their events; claims that
-- never issued one are forgotten (their requests were not answered).
UPDATE ingest_keys
SET version = (answer ->> 'version')::bigint, message_id = answer ->> 'message_id'
WHERE version IS NULL AND answer IS NOT NULL;
DELETE FROM ingest_keys WHERE version IS NULL OR message_id IS NULL;
ALTER TABLE ingest_keys
    DROP COLUMN owner,
    DROP COLUMN answer,
    ALTER COLUMN version SET NOT NULL,
    ALTER COLUMN message_id SET NOT NULL;
