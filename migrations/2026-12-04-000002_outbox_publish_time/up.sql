-- The mean publish time (µs since the epoch) of a stream message's updates,
-- so that the relay can measure the pipeline up to the stream per update;
-- 0 where unknown.
ALTER TABLE update_outbox ADD COLUMN ts_us BIGINT NOT NULL DEFAULT 0;
