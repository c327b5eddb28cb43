//! Domain values, parsed once at the edge so that the rest of the code can
//! rely on them being valid.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A product identifier: a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProductId(i64);

impl ProductId {
    pub fn new(value: i64) -> Option<Self> {
        (value > 0).then_some(Self(value))
    }

    pub fn parse(text: &str) -> Option<Self> {
        // Plain decimal digits only: "+1", " 1" or "0x1" are not ids.
        if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().and_then(Self::new)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which attribute of a product an event changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Price,
    Stock,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Price, Kind::Stock];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Price => "price",
            Kind::Stock => "stock",
        }
    }

    /// Routing key / topic of this kind of change for one product.
    pub fn topic(self, id: ProductId) -> String {
        format!("product.{}.{}", self.as_str(), id)
    }
}

/// Largest price accepted: ten million currency units. Anything above is a
/// broken upstream, not a price.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000;
/// Largest stock accepted.
pub const MAX_STOCK: i64 = 1_000_000_000;

/// A price in cents, strictly positive and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceCents(i64);

impl TryFrom<i64> for PriceCents {
    type Error = &'static str;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match value {
            v if v <= 0 => Err("price must be positive"),
            v if v > MAX_PRICE_CENTS => Err("price is absurdly large"),
            v => Ok(Self(v)),
        }
    }
}

impl PriceCents {
    pub fn get(self) -> i64 {
        self.0
    }
}

/// A stock level, never negative and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock(i64);

impl TryFrom<i64> for Stock {
    type Error = &'static str;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match value {
            v if v < 0 => Err("stock must not be negative"),
            v if v > MAX_STOCK => Err("stock is absurdly large"),
            v => Ok(Self(v)),
        }
    }
}

impl Stock {
    pub fn get(self) -> i64 {
        self.0
    }
}

/// Largest version accepted: 2^53 - 1. Versions reach browsers as JSON
/// numbers, and JavaScript holds integers exactly only up to this
/// (`Number.MAX_SAFE_INTEGER`): above it two versions can compare equal. It
/// also leaves 2^10 times the room below `i64::MAX`, so issuing the next
/// version (one more each time) cannot overflow: at a million events a second
/// on one product, reaching the bound takes some 285 years.
pub const MAX_VERSION: i64 = (1 << 53) - 1;

/// A version of one product's attribute: positive and at most [`MAX_VERSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(i64);

impl TryFrom<i64> for Version {
    type Error = &'static str;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match value {
            v if v <= 0 => Err("version must be positive"),
            v if v > MAX_VERSION => Err("version is above 2^53 - 1"),
            v => Ok(Self(v)),
        }
    }
}

impl Version {
    pub fn get(self) -> i64 {
        self.0
    }
}

/// The new value an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Price(PriceCents),
    Stock(Stock),
}

impl Change {
    pub fn kind(self) -> Kind {
        match self {
            Change::Price(_) => Kind::Price,
            Change::Stock(_) => Kind::Stock,
        }
    }

    pub fn value(self) -> i64 {
        match self {
            Change::Price(p) => p.get(),
            Change::Stock(s) => s.get(),
        }
    }
}

/// One change of one attribute of one product, as the generator publishes it
/// and the consumer applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub product_id: ProductId,
    pub change: Change,
    /// Per product and kind; higher wins.
    pub version: i64,
    pub occurred_at: DateTime<Utc>,
    /// Publish time in microseconds since the epoch, for end-to-end latency.
    pub ts_us: i64,
}

impl Event {
    pub fn kind(&self) -> Kind {
        self.change.kind()
    }

    pub fn topic(&self) -> String {
        self.kind().topic(self.product_id)
    }
}

pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}
