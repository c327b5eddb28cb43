-- The traceparent of the apply batch that wrote a stream message: the relay
-- publishes it on, so the change's trace continues past the outbox.
ALTER TABLE update_outbox ADD COLUMN traceparent TEXT;
