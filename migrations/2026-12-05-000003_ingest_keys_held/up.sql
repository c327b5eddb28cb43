-- What the given idempotency keys hold, looked up by the key's index
-- whatever the planner would guess: ingest admission is a prepared
-- statement, and a plan cached while this table was small would scan it
-- whole once it is large (its statistics lag behind a table that grows
-- thousands of keys a second). A function with its own setting keeps the
-- lookup an index probe per key; it reads the calling statement's
-- snapshot (STABLE), like the lookup it replaces.
CREATE FUNCTION ingest_keys_held(keys TEXT[])
RETURNS TABLE (key TEXT, request TEXT, version BIGINT, message_id TEXT)
LANGUAGE sql STABLE ROWS 10
SET enable_seqscan = off
AS $$
    SELECT k.key, k.request, k.version, k.message_id FROM ingest_keys k WHERE k.key = ANY (keys)
$$;
