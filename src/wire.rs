//! The wire format of events and updates, and the one place where a message
//! from the broker is decoded: into a valid [`Event`] or a [`Reject`] reason.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Change, Event, Kind, PriceCents, ProductId, Stock, Version};

/// Current schema of events on `product.events`.
pub const SCHEMA: u32 = 1;
pub const CONTENT_TYPE: &str = "application/json";
/// Routing key of update batches on `product.updates`.
pub const BATCH_ROUTING_KEY: &str = "product.updates.batch";
/// Largest encoded update (`encode_update`) of any valid event: the bound
/// of a stream message is this times its updates.
pub const MAX_UPDATE_BYTES: usize = 256;

/// Header carrying the reason of a dead letter.
/// Header of an update stream message: the id of the database transaction
/// that committed its updates.
pub const TXID_HEADER: &str = "x-txid";

/// Header of an update stream message: its row in the update outbox. A
/// message published again (its confirm lost) carries the same number.
pub const OUTBOX_SEQ_HEADER: &str = "x-outbox-seq";

pub const REASON_HEADER: &str = "x-reject-reason";
/// Header carrying a human-readable detail of the reason.
pub const DETAIL_HEADER: &str = "x-reject-detail";

/// JSON shape of an event (schema 1) and of an applied update.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<u32>,
    pub product_id: i64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock: Option<i64>,
    pub version: i64,
    pub occurred_at: DateTime<Utc>,
    pub ts_us: i64,
}

impl WireChange {
    fn of(event: &Event, schema: Option<u32>) -> Self {
        let (price_cents, stock) = match event.change {
            Change::Price(p) => (Some(p.get()), None),
            Change::Stock(s) => (None, Some(s.get())),
        };
        WireChange {
            schema,
            product_id: event.product_id.get(),
            kind: event.kind(),
            price_cents,
            stock,
            version: event.version,
            occurred_at: event.occurred_at,
            ts_us: event.ts_us,
        }
    }
}

/// Serialises an event as published to `product.events`.
/// An error is never expected (plain fields into a Vec), but is passed on
/// rather than publishing an empty body.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&WireChange::of(event, Some(SCHEMA)))
}

/// Serialises an applied update as published to `product.updates` and sent to clients.
pub fn encode_update(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&WireChange::of(event, None))
}

/// Why a message can never be applied. The code goes into the dead letter's
/// reason header and the metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    WrongContentType(String),
    WrongContentEncoding(String),
    Oversize(usize),
    NotUtf8,
    NotJson(String),
    WrongSchema(String),
    UnsupportedVersion(u32),
    InvalidValue(String),
    RoutingKeyMismatch { expected: String, actual: String },
    UnknownProduct(i64),
}

impl Reject {
    pub fn code(&self) -> &'static str {
        match self {
            Reject::WrongContentType(_) => "wrong_content_type",
            Reject::WrongContentEncoding(_) => "wrong_content_encoding",
            Reject::Oversize(_) => "oversize",
            Reject::NotUtf8 => "not_utf8",
            Reject::NotJson(_) => "not_json",
            Reject::WrongSchema(_) => "wrong_schema",
            Reject::UnsupportedVersion(_) => "unsupported_schema_version",
            Reject::InvalidValue(_) => "invalid_value",
            Reject::RoutingKeyMismatch { .. } => "routing_key_mismatch",
            Reject::UnknownProduct(_) => "unknown_product",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Reject::WrongContentType(ct) => format!("content type {ct:?}, expected {CONTENT_TYPE}"),
            Reject::WrongContentEncoding(e) => format!("content encoding {e:?}; events are sent as plain JSON"),
            Reject::Oversize(n) => format!("body of {n} bytes is over the limit"),
            Reject::NotUtf8 => "body is not UTF-8".into(),
            Reject::NotJson(e) | Reject::WrongSchema(e) | Reject::InvalidValue(e) => e.clone(),
            Reject::UnsupportedVersion(v) => format!("schema {v} is not supported"),
            Reject::RoutingKeyMismatch { expected, actual } => {
                format!("routing key {actual:?} does not match the event ({expected:?})")
            }
            Reject::UnknownProduct(id) => format!("product {id} does not exist"),
        }
    }

    /// All codes, for pre-registering metrics labels and for tests.
    pub const CODES: [&'static str; 11] = [
        "wrong_content_type",
        "wrong_content_encoding",
        "oversize",
        "not_utf8",
        "not_json",
        "wrong_schema",
        "unsupported_schema_version",
        "invalid_value",
        "routing_key_mismatch",
        "unknown_product",
        "delivery_limit",
    ];
}

/// Decodes one delivery with its AMQP properties: a compressed or
/// otherwise encoded body is refused before anything reads it.
pub fn decode_delivery(
    body: &[u8],
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    routing_key: &str,
    max_body: usize,
) -> Result<Event, Reject> {
    if let Some(enc) = content_encoding
        && !enc.is_empty()
        && !enc.eq_ignore_ascii_case("identity")
        && !enc.eq_ignore_ascii_case("utf-8")
    {
        return Err(Reject::WrongContentEncoding(enc.chars().take(64).collect()));
    }
    decode_event(body, content_type, routing_key, max_body)
}

/// Decodes one body. `content_type` is the AMQP property; a missing one
/// is accepted when the body is JSON, since many publishers leave it out.
pub fn decode_event(
    body: &[u8],
    content_type: Option<&str>,
    routing_key: &str,
    max_body: usize,
) -> Result<Event, Reject> {
    if body.len() > max_body {
        return Err(Reject::Oversize(body.len()));
    }
    if let Some(ct) = content_type {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case(CONTENT_TYPE) {
            return Err(Reject::WrongContentType(ct.to_owned()));
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| Reject::NotUtf8)?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Reject::NotJson(e.to_string()))?;
    let wire: WireChange = serde_json::from_value(value).map_err(|e| Reject::WrongSchema(e.to_string()))?;
    if let Some(schema) = wire.schema
        && schema != SCHEMA
    {
        return Err(Reject::UnsupportedVersion(schema));
    }
    let event = validate(wire)?;
    let expected = event.topic();
    if routing_key != expected {
        return Err(Reject::RoutingKeyMismatch {
            expected,
            actual: routing_key.to_owned(),
        });
    }
    Ok(event)
}

fn validate(wire: WireChange) -> Result<Event, Reject> {
    let invalid = |m: &str| Reject::InvalidValue(m.to_owned());
    let product_id = ProductId::new(wire.product_id).ok_or_else(|| invalid("product_id must be positive"))?;
    let version = Version::try_from(wire.version).map_err(invalid)?;
    let change = match (wire.kind, wire.price_cents, wire.stock) {
        (Kind::Price, Some(p), None) => Change::Price(PriceCents::try_from(p).map_err(invalid)?),
        (Kind::Stock, None, Some(s)) => Change::Stock(Stock::try_from(s).map_err(invalid)?),
        (Kind::Price, _, _) => return Err(Reject::WrongSchema("a price event carries price_cents only".into())),
        (Kind::Stock, _, _) => return Err(Reject::WrongSchema("a stock event carries stock only".into())),
    };
    Ok(Event {
        product_id,
        change,
        version: version.get(),
        occurred_at: wire.occurred_at,
        ts_us: wire.ts_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            product_id: ProductId::new(42).unwrap(),
            change: Change::Price(PriceCents::try_from(1299).unwrap()),
            version: 3,
            occurred_at: Utc::now(),
            ts_us: 1,
        }
    }

    #[test]
    fn encoded_event_decodes_to_itself() {
        let e = sample();
        let body = encode_event(&e).unwrap();
        let back = decode_event(&body, Some("application/json"), "product.price.42", 4096).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn largest_update_fits_max_update_bytes() {
        let e = Event {
            product_id: ProductId::new(i64::MAX).unwrap(),
            change: Change::Price(PriceCents::try_from(crate::domain::MAX_PRICE_CENTS).unwrap()),
            version: crate::domain::MAX_VERSION,
            occurred_at: DateTime::<Utc>::MAX_UTC,
            ts_us: i64::MIN,
        };
        let n = encode_update(&e).unwrap().len();
        assert!(n <= MAX_UPDATE_BYTES, "{n}");
    }

    #[test]
    fn each_malformed_body_has_its_reason() {
        let rk = "product.price.42";
        let cases: Vec<(&[u8], Option<&str>, &str)> = vec![
            (b"\xff\xfe", None, "not_utf8"),
            (b"{not json", None, "not_json"),
            (b"[1,2]", None, "wrong_schema"),
            (br#"{"product_id":"x","kind":"price","price_cents":1,"version":1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "wrong_schema"),
            (br#"{"product_id":42,"kind":"price","price_cents":-5,"version":1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "invalid_value"),
            (br#"{"product_id":42,"kind":"price","price_cents":99999999999999,"version":1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "invalid_value"),
            (br#"{"schema":9,"product_id":42,"kind":"price","price_cents":5,"version":1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "unsupported_schema_version"),
            (br#"{"product_id":43,"kind":"price","price_cents":5,"version":1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "routing_key_mismatch"),
            (b"{}", Some("text/plain"), "wrong_content_type"),
            (br#"{"product_id":42,"kind":"price","price_cents":5,"version":9007199254740992,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "invalid_value"),
            (br#"{"product_id":42,"kind":"price","price_cents":5,"version":-1,"occurred_at":"2026-01-01T00:00:00Z","ts_us":1}"#, None, "invalid_value"),
        ];
        for (body, ct, code) in cases {
            let err = decode_event(body, ct, rk, 4096).unwrap_err();
            assert_eq!(err.code(), code, "{:?}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            decode_event(&[b' '; 5000], None, rk, 4096).unwrap_err().code(),
            "oversize"
        );
    }
}

#[cfg(test)]
mod properties {
    //! The event decoder never panics, whatever the bytes, and holds the
    //! documented version bound.

    use super::*;
    use proptest::prelude::*;

    /// The documented version bound: 2^53 - 1, the largest integer a
    /// JavaScript client holds exactly.
    const JS_SAFE: i64 = (1 << 53) - 1;

    proptest! {
        #![proptest_config(crate::testing::proptest_config())]

        #[test]
        fn decoder_never_panics_on_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..600), rk in "[a-z.0-9]{0,30}") {
            let _ = decode_event(&body, Some("application/json"), &rk, 512);
            let _ = decode_event(&body, None, &rk, 512);
        }

        #[test]
        fn decoder_never_panics_on_json_like_text(
            id in any::<i64>(), v in any::<i64>(), price in any::<i64>(), kind in "(price|stock|x)", ts in any::<i64>(),
            extra in "[a-z\"{}:,0-9 ]{0,20}",
        ) {
            let body = format!(r#"{{"product_id":{id},"kind":"{kind}","price_cents":{price},"version":{v},"occurred_at":"2026-11-24T00:00:00Z","ts_us":{ts}{extra}}}"#);
            match decode_event(body.as_bytes(), None, &format!("product.{kind}.{id}"), 4096) {
                Ok(e) => {
                    prop_assert!(e.version > 0 && e.product_id.get() > 0 && e.change.value() > 0);
                }
                Err(reason) => prop_assert!(!reason.code().is_empty()),
            }
        }

        #[test]
        fn decoder_accepts_exactly_the_versions_within_the_bound(
            v in prop_oneof![any::<i64>(), (JS_SAFE - 3)..=(JS_SAFE + 3), -3i64..=3, Just(i64::MAX), Just(i64::MIN)],
        ) {
            let body = format!(r#"{{"product_id":42,"kind":"price","price_cents":5,"version":{v},"occurred_at":"2026-11-24T00:00:00Z","ts_us":1}}"#);
            match decode_event(body.as_bytes(), None, "product.price.42", 4096) {
                Ok(e) => prop_assert!((1..=JS_SAFE).contains(&v) && e.version == v, "version {} accepted", v),
                Err(reason) => {
                    prop_assert!(!(1..=JS_SAFE).contains(&v), "version {} refused: {:?}", v, reason);
                    prop_assert_eq!(reason.code(), "invalid_value");
                }
            }
        }
    }
}
