-- The id of the transaction that wrote each stream message. A snapshot read
-- in one database snapshot skips exactly the updates of transactions that
-- snapshot already sees, without remembering a version per product.
ALTER TABLE update_outbox
    ADD COLUMN txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
