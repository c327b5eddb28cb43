//! Subscriber tokens: JWTs whose `topics` claim lists the patterns their
//! holder may subscribe to, checked with an HS256 secret or RS256/ES256
//! public keys (jsonwebtoken: no hand-written crypto). A connection without
//! a token gets the anonymous patterns.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::HttpRequest;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use super::error::TokenError;
use crate::hub::pattern::Pattern;
use crate::hub::scope::{Grant, Scope};
use crate::metrics::Metrics;
use crate::settings::AuthSettings;

/// Patterns one token may grant; a longer list is refused, so a token
/// cannot make every subscribe check expensive.
pub const MAX_GRANTED_PATTERNS: usize = 256;

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    sub: Option<String>,
}

/// A key tokens may be signed with; `kid` is its file name for public keys.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Checks tokens against the configured keys. Built once at start: a key
/// that does not load stops the service with the file's name.
pub struct Verifier {
    keys: Vec<Key>,
    anonymous: Scope,
    validation: Validation,
    max_words: usize,
}

impl Verifier {
    pub fn new(settings: &AuthSettings, max_words: usize) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        let secret = settings.hs256_secret.expose();
        if !secret.is_empty() {
            anyhow::ensure!(
                secret.len() >= 32,
                "auth.hs256_secret must be at least 32 bytes (HS256 keys shorter than the hash are weak)"
            );
            keys.push(Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if !settings.public_keys.trim().is_empty() {
            keys.extend(load_public_keys(Path::new(settings.public_keys.trim()))?);
        }
        let anonymous = settings
            .anonymous()
            .map(|p| Pattern::parse(p, max_words).map_err(|e| anyhow::anyhow!("auth.anonymous_patterns: {p:?}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Algorithms are set per key when checking; these are the claims.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = settings.leeway.as_secs();
        // A token is not good before its `nbf`, when it has one.
        validation.validate_nbf = true;
        if !settings.issuer.is_empty() {
            validation.set_issuer(&[&settings.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        if settings.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&settings.audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        Ok(Self {
            keys,
            anonymous: Scope::new(anonymous),
            validation,
            max_words,
        })
    }

    /// The grant of a connection without a token.
    pub fn anonymous(&self) -> Grant {
        Grant {
            scope: self.anonymous.clone(),
            expires: None,
            subject: None,
        }
    }

    /// The grant a token carries: the anonymous patterns and its own.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        // `alg: none` and unknown algorithms fail here: the crate's
        // algorithm list has neither.
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(format!("{e}")))?;
        let family = header.alg.family();
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.key.family() == family)
            .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(TokenError::Invalid(format!(
                "no key here checks {:?} tokens{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let mut refusal = TokenError::Invalid("bad signature".into());
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return self.grant(data.claims),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => {}
                    ErrorKind::ExpiredSignature => return Err(TokenError::Expired),
                    _ => refusal = TokenError::Invalid(format!("{e}")),
                },
            }
        }
        Err(refusal)
    }

    fn grant(&self, claims: Claims) -> Result<Grant, TokenError> {
        if claims.topics.len() > MAX_GRANTED_PATTERNS {
            return Err(TokenError::Invalid(format!(
                "the topics claim lists more than {MAX_GRANTED_PATTERNS} patterns"
            )));
        }
        let granted = claims
            .topics
            .iter()
            .map(|t| {
                Pattern::parse(t, self.max_words)
                    .map_err(|e| TokenError::Invalid(format!("topics claim: {:.80}: {e}", t)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // An `exp` past what the clock can hold (2^63 s and more) is no
        // date at all: refused, where adding it to the epoch would panic.
        let expires = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .and_then(|t| t.checked_add(self.validation_leeway()))
            .ok_or_else(|| TokenError::Invalid(format!("exp {} is past any date", claims.exp)))?;
        Ok(Grant {
            scope: self.anonymous.with(granted),
            expires: Some(expires),
            subject: claims.sub,
        })
    }

    fn validation_leeway(&self) -> Duration {
        Duration::from_secs(self.validation.leeway)
    }
}

/// An HS256 subscriber token granting `topics` for `ttl`, signed with the
/// configured secret: what `product-gateway token` prints, for trying the
/// service and for backends that sign with the shared secret.
pub fn sign_hs256(settings: &AuthSettings, subject: &str, topics: &[String], ttl: Duration) -> anyhow::Result<String> {
    let secret = settings.hs256_secret.expose();
    anyhow::ensure!(!secret.is_empty(), "auth.hs256_secret is not set: no key to sign with");
    let exp = (std::time::SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({ "sub": subject, "exp": exp, "topics": topics });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Public keys from one PEM file or every `*.pem` of a folder, each named
/// by its file stem (the `kid` a token may ask for).
fn load_public_keys(path: &Path) -> anyhow::Result<Vec<Key>> {
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| anyhow::anyhow!("auth.public_keys: cannot read folder {}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect();
        files.sort();
        anyhow::ensure!(
            !files.is_empty(),
            "auth.public_keys: no .pem file in {}",
            path.display()
        );
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .iter()
        .map(|f| {
            let pem =
                std::fs::read(f).map_err(|e| anyhow::anyhow!("auth.public_keys: cannot read {}: {e}", f.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "auth.public_keys: {} is not an RSA, EC or Ed25519 public key in PEM: {e}",
                        f.display()
                    )
                })?;
            Ok(Key {
                kid: f.file_stem().map(|s| s.to_string_lossy().into_owned()),
                key,
            })
        })
        .collect()
}

/// The token a request carries: `Authorization: Bearer …`, else the
/// `token` query parameter (EventSource and browsers' WebSocket cannot set
/// headers).
pub fn request_token<'a>(req: &'a HttpRequest, query_token: Option<&'a str>) -> Option<&'a str> {
    super::extract::bearer(req).or(query_token).filter(|t| !t.is_empty())
}

/// When a grant runs out: a timer per connection, set from
/// [`Grant::remaining`]; none for a grant that does not expire.
pub type Expiry = Option<std::pin::Pin<Box<tokio::time::Sleep>>>;

pub fn expiry(grant: &Grant) -> Expiry {
    grant.remaining().map(|left| Box::pin(tokio::time::sleep(left)))
}

/// Whether the grant has run out, by the clock (a timer not polled since
/// may not have fired yet).
pub fn has_expired(expiry: &Expiry) -> bool {
    expiry
        .as_ref()
        .is_some_and(|sleep| sleep.deadline() <= tokio::time::Instant::now())
}

/// Resolves when the grant has run out; never without an expiry.
pub async fn expired(expiry: &mut Expiry) {
    match expiry {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Counts a refused token or subscribe by its error code; other codes are
/// not about authorisation and are left alone.
pub fn count_refusal(metrics: &Metrics, code: &'static str) {
    if matches!(code, "unauthorized" | "token_expired" | "forbidden") {
        metrics.auth_refused.get_or_create(&[("reason", code)]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    use crate::settings::Secret;

    fn settings() -> AuthSettings {
        AuthSettings {
            anonymous_patterns: vec!["product.price.*".into(), String::new()],
            hs256_secret: Secret::new(""),
            public_keys: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::ZERO,
        }
    }

    fn refusal(s: &AuthSettings) -> String {
        Verifier::new(s, 32).err().expect("refused").to_string()
    }

    #[test]
    fn keys_that_cannot_serve_stop_the_start_naming_what_is_wrong() {
        let mut s = settings();
        s.hs256_secret = Secret::new("short");
        assert!(refusal(&s).contains("auth.hs256_secret"));

        let mut s = settings();
        s.public_keys = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into();
        assert!(refusal(&s).contains("Cargo.toml is not an RSA, EC or Ed25519 public key"));

        let mut s = settings();
        s.public_keys = concat!(env!("CARGO_MANIFEST_DIR"), "/src").into();
        assert!(refusal(&s).contains("no .pem file"));

        let mut s = settings();
        s.anonymous_patterns = vec!["product..price".into()];
        assert!(refusal(&s).contains("auth.anonymous_patterns"));
    }

    #[test]
    fn without_keys_every_token_is_refused_and_empty_anonymous_entries_are_none() {
        let v = Verifier::new(&settings(), 32).unwrap();
        assert_eq!(v.anonymous().scope.patterns().collect::<Vec<_>>(), ["product.price.*"]);
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({ "exp": 4_000_000_000u64, "topics": ["#"] }),
            &jsonwebtoken::EncodingKey::from_secret(b"any secret at all, 32 bytes long!"),
        )
        .unwrap();
        assert!(matches!(v.verify(&token), Err(TokenError::Invalid(m)) if m.contains("no key here checks HS256")));
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn verifier() -> Verifier {
        let mut s = settings();
        s.hs256_secret = Secret::new(SECRET);
        Verifier::new(&s, 32).unwrap()
    }

    #[test]
    fn a_token_before_its_nbf_is_refused_and_after_it_verifies() {
        let v = verifier();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let early = signed(serde_json::json!({ "exp": now + 600, "nbf": now + 300, "topics": ["#"] }));
        assert!(
            matches!(v.verify(&early), Err(TokenError::Invalid(m)) if m.contains("Immature")),
            "a token not yet valid is refused"
        );
        let ripe = signed(serde_json::json!({ "exp": now + 600, "nbf": now - 1, "topics": ["#"] }));
        assert!(v.verify(&ripe).is_ok());
    }

    #[test]
    fn a_token_whose_exp_no_clock_can_hold_is_refused_without_a_panic() {
        let v = verifier();
        for exp in [1u64 << 63, u64::MAX] {
            let token = signed(serde_json::json!({ "exp": exp, "topics": ["#"] }));
            assert!(
                matches!(v.verify(&token), Err(TokenError::Invalid(m)) if m.contains("past any date")),
                "exp {exp}"
            );
        }
    }

    #[test]
    fn a_token_of_the_token_command_verifies_and_grants_its_topics() {
        let mut s = settings();
        s.hs256_secret = Secret::new("0123456789abcdef0123456789abcdef");
        let v = Verifier::new(&s, 32).unwrap();
        let token = sign_hs256(&s, "cli", &["product.*.42".into()], Duration::from_secs(60)).unwrap();
        let grant = v.verify(&token).unwrap();
        assert_eq!(grant.subject.as_deref(), Some("cli"));
        let p = |t| Pattern::parse(t, 32).unwrap();
        assert!(grant.scope.allows(&p("product.stock.42")));
        assert!(!grant.scope.allows(&p("product.stock.43")));
        assert!((50..=60).contains(&grant.remaining().unwrap().as_secs()));
    }
}
