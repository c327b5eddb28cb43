DROP TABLE update_outbox;
