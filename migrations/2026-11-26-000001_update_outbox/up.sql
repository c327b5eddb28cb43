-- Transactional outbox of the update stream: an apply batch writes its stream
-- message here in the transaction that changes the catalog, so a committed
-- version can never miss the stream. The relay publishes the rows in `seq`
-- order with confirms, then deletes them.
CREATE TABLE update_outbox (
    seq        BIGSERIAL   PRIMARY KEY,
    message_id TEXT        NOT NULL,
    body       BYTEA       NOT NULL,
    updates    INT         NOT NULL CHECK (updates > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
