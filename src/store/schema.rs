//! Diesel schema of the catalog tables (see `migrations/`).

diesel::table! {
    products (id) {
        id -> Int8,
        name -> Text,
        price_cents -> Int8,
        stock -> Int8,
        price_version -> Int8,
        stock_version -> Int8,
        price_issued -> Int8,
        stock_issued -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    product_photos (product_id) {
        product_id -> Int8,
        content_type -> Text,
        etag -> Text,
        bytes -> Bytea,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(product_photos -> products (product_id));
diesel::allow_tables_to_appear_in_same_query!(products, product_photos);
