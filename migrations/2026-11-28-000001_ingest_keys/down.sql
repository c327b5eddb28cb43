DROP TABLE ingest_keys;
