//! Fills an empty catalog with products, in batches of a single statement
//! each, showing progress: a bar on a terminal, log lines otherwise.
//! Photos are not stored: a product without one of its own is shown with
//! an image drawn from its id (see `photos`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;

use crate::store::{Db, StoreError};

/// Products per statement: large enough that a million take a few dozen
/// round trips, small enough that each commits in well under a second.
const BATCH: i64 = 50_000;

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

/// The name of product `id`, as the seed gives it.
pub fn name_of(id: i64) -> String {
    format!(
        "{} {} {id}",
        ADJECTIVES[(id as usize) % ADJECTIVES.len()],
        NOUNS[(id as usize / ADJECTIVES.len()) % NOUNS.len()],
    )
}

/// Inserts products 1..=n unless the catalog already has products. Returns
/// how many were inserted.
pub async fn seed(db: &Db, n: u32) -> Result<u32, StoreError> {
    if crate::store::catalog::count(db).await? > 0 {
        return Ok(0);
    }
    let total = i64::from(n);
    let progress = Progress::new(total);
    let mut conn = db.get().await?;
    let quoted = |words: &[&str]| words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(",");
    // Names as `name_of` makes them; prices and stocks at random, as before.
    let insert = format!(
        "INSERT INTO products (id, name, price_cents, stock) \
         SELECT g, (ARRAY[{adjectives}])[g % {a} + 1] || ' ' || (ARRAY[{nouns}])[(g / {a}) % {b} + 1] || ' ' || g, \
                199 + floor(random() * 199801)::bigint, floor(random() * 501)::bigint \
         FROM generate_series($1::bigint, $2::bigint) AS g \
         ON CONFLICT DO NOTHING",
        adjectives = quoted(&ADJECTIVES),
        nouns = quoted(&NOUNS),
        a = ADJECTIVES.len(),
        b = NOUNS.len(),
    );
    let mut inserted = 0;
    let mut first = 1;
    while first <= total {
        let last = (first + BATCH - 1).min(total);
        inserted += diesel::sql_query(&insert)
            .bind::<BigInt, _>(first)
            .bind::<BigInt, _>(last)
            .execute(&mut conn)
            .await? as u32;
        progress.set(last);
        first = last + 1;
    }
    progress.finish(inserted);
    Ok(inserted)
}

/// Seeding progress: a bar when a person watches, a line every few seconds
/// when a log does.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: i64,
    started: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(total: i64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "seeding {bar:40} {human_pos}/{human_len} products, {eta} left",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            total,
            started: Instant::now(),
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn set(&self, done: i64) {
        match &self.bar {
            Some(bar) => bar.set_position(done as u64),
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                tracing::info!(done, total = self.total, "seeding");
            }
            None => {}
        }
    }

    fn finish(&self, inserted: u32) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        tracing::info!(inserted, secs = self.started.elapsed().as_secs_f64(), "catalog seeded");
    }
}
