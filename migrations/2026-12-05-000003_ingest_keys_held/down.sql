DROP FUNCTION ingest_keys_held(TEXT[]);
