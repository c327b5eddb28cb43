ALTER TABLE update_outbox DROP COLUMN ts_us;
