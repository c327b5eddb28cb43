ALTER TABLE update_outbox DROP COLUMN traceparent;
