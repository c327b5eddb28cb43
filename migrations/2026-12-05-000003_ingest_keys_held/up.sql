-- What the given idempotency keys hold, looked up by the key's index
-- whatever the planner would guess: a plan made from statistics taken
-- while this table was small (and ingest admission, a prepared statement,
-- keeps its plan) scans it whole once it is large, and its statistics lag
-- behind a table that grows by thousands of keys a second. A function with
-- its own setting keeps the lookup an index probe per key; it reads the
-- calling statement's snapshot (STABLE), like the join it replaces.
CREATE FUNCTION ingest_keys_held(keys TEXT[])
RETURNS TABLE (key TEXT, request TEXT, version BIGINT, message_id TEXT)
LANGUAGE sql STABLE ROWS 10
SET enable_seqscan = off
AS $$
    SELECT k.key, k.request, k.version, k.message_id FROM ingest_keys k WHERE k.key = ANY (keys)
$$;
