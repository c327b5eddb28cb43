-- The publish time (µs since the epoch) of a stream message's first update,
-- so that the relay can measure the pipeline up to the stream; 0 where unknown.
ALTER TABLE update_outbox ADD COLUMN first_ts_us BIGINT NOT NULL DEFAULT 0;
