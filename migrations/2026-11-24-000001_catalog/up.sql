-- Catalog: one row per product, with a version per attribute so that apply
-- is monotonic (an older or repeated event never overwrites newer state).
CREATE TABLE products (
    id            BIGINT PRIMARY KEY CHECK (id > 0),
    name          TEXT        NOT NULL,
    price_cents   BIGINT      NOT NULL CHECK (price_cents > 0),
    stock         BIGINT      NOT NULL CHECK (stock >= 0),
    price_version BIGINT      NOT NULL DEFAULT 0,
    stock_version BIGINT      NOT NULL DEFAULT 0,
    -- Last version handed out by a generator; versions are issued here so that
    -- two generators can never give two events the same version.
    price_issued  BIGINT      NOT NULL DEFAULT 0,
    stock_issued  BIGINT      NOT NULL DEFAULT 0,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE product_photos (
    product_id   BIGINT PRIMARY KEY REFERENCES products (id) ON DELETE CASCADE,
    content_type TEXT        NOT NULL,
    etag         TEXT        NOT NULL,
    bytes        BYTEA       NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
