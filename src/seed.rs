//! Fills an empty catalog with products and a generated photo for each.
//! Start-up work beside the pipeline: it uses both the store and photos.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use rand::Rng;

use crate::photos::image;
use crate::store::schema::{product_photos, products};
use crate::store::{Db, StoreError};

const ADJECTIVES: [&str; 12] = [
    "Compact", "Ultra", "Classic", "Smart", "Rugged", "Silent", "Pocket", "Studio", "Travel", "Solar", "Modular",
    "Wireless",
];
const NOUNS: [&str; 12] = [
    "Kettle",
    "Headphones",
    "Backpack",
    "Lamp",
    "Keyboard",
    "Speaker",
    "Camera",
    "Blender",
    "Drone",
    "Watch",
    "Router",
    "Bicycle",
];

/// Inserts products 1..=n with photos unless the catalog already has
/// products. Returns how many were inserted.
pub async fn seed(db: &Db, n: u32) -> Result<u32, StoreError> {
    if crate::store::catalog::count(db).await? > 0 {
        return Ok(0);
    }
    let mut conn = db.get().await?;
    let mut rng = rand::rng();
    let mut inserted = 0;
    for chunk_start in (1..=n as i64).step_by(100) {
        let chunk_end = (chunk_start + 99).min(n as i64);
        let rows: Vec<_> = (chunk_start..=chunk_end)
            .map(|id| {
                let name = format!(
                    "{} {} {}",
                    ADJECTIVES[(id as usize) % ADJECTIVES.len()],
                    NOUNS[(id as usize / ADJECTIVES.len()) % NOUNS.len()],
                    id
                );
                (
                    products::id.eq(id),
                    products::name.eq(name),
                    products::price_cents.eq(rng.random_range(199..=199_999i64)),
                    products::stock.eq(rng.random_range(0..=500i64)),
                )
            })
            .collect();
        let n_rows = diesel::insert_into(products::table)
            .values(&rows)
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
        let photos: Vec<_> = (chunk_start..=chunk_end)
            .map(|id| {
                let png = image::product_png(id as u64);
                (
                    product_photos::product_id.eq(id),
                    product_photos::content_type.eq("image/png"),
                    product_photos::etag.eq(image::etag(&png)),
                    product_photos::bytes.eq(png),
                )
            })
            .collect();
        diesel::insert_into(product_photos::table)
            .values(&photos)
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
        inserted += n_rows as u32;
    }
    Ok(inserted)
}
