ALTER TABLE update_outbox DROP COLUMN first_ts_us;
