//! Service-to-service credentials for the writer's API: short-lived JWTs (HS256) signed with a
//! key the services share, like the client tokens' keys (an SSM SecureString on AWS, a file
//! locally). Gateways sign their own, per request, for a few minutes at a time; a backend gets
//! one minted for it (`chorus-writer mint-token`) that names what it may do.
//!
//! A token says who the caller is (`sub`), what kind of caller it is, which rooms it may touch
//! and which sender names it may post as:
//! - a **gateway** relays its authenticated clients' sends, so it may name any sender (the
//!   sender is the client's token `sub`, checked by the gateway) in any room;
//! - a **backend** may post only to the rooms and as the sender names its token lists.
//!
//! Rotation without downtime: configure several keys; the first signs, every one verifies. Add
//! the new key everywhere (second), make it first everywhere, then remove the old one.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The `aud` of writer tokens.
pub const AUDIENCE: &str = "chorus-writer";
/// The `iss` of writer tokens.
pub const ISSUER: &str = "chorus";
/// Shortest key accepted, in bytes (HS256 wants at least the hash's size).
pub const MIN_KEY_BYTES: usize = 32;
/// Clock skew tolerated between services.
const LEEWAY_SECS: u64 = 30;

/// What kind of caller a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerKind {
    /// A gateway: relays its clients' sends, reads history.
    Gateway,
    /// A backend service publishing with its own scopes.
    Backend,
}

/// Names a token allows: exact names, `prefix*`, or `*` for all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Patterns(pub Vec<String>);

impl Patterns {
    /// Every name.
    pub fn any() -> Self {
        Patterns(vec!["*".to_owned()])
    }

    /// Whether `name` matches one of the patterns.
    pub fn allows(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pattern == name,
            })
    }
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who the caller is (a gateway id, a backend's name): logged with what it does.
    pub sub: String,
    pub kind: CallerKind,
    pub rooms: Patterns,
    pub senders: Patterns,
}

impl Grant {
    /// A gateway's grant: any room, any sender (its clients are authenticated by it).
    pub fn gateway(id: impl Into<String>) -> Self {
        Grant {
            sub: id.into(),
            kind: CallerKind::Gateway,
            rooms: Patterns::any(),
            senders: Patterns::any(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    #[serde(flatten)]
    grant: Grant,
}

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no service key configured")]
    None,
    #[error("reading service key {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service key {path} is {len} bytes: at least {MIN_KEY_BYTES} are needed")]
    TooShort { path: PathBuf, len: usize },
}

/// Why a token was refused. The text names the rule, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("signature does not verify with any configured service key")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token is not for the writer (audience or issuer)")]
    Audience,
}

/// The shared keys: the first signs, every one verifies.
pub struct ServiceKeys {
    keys: Vec<(EncodingKey, DecodingKey)>,
    validation: Validation,
}

impl std::fmt::Debug for ServiceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("ServiceKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl ServiceKeys {
    /// Keys read from files (one secret per file; a trailing newline is not part of it).
    ///
    /// # Errors
    /// [`KeyError`] when there is no file, one cannot be read, or a key is too short.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let secrets = paths
            .iter()
            .map(|path| {
                let mut secret = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.clone(),
                    source,
                })?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                if secret.len() < MIN_KEY_BYTES {
                    return Err(KeyError::TooShort {
                        path: path.clone(),
                        len: secret.len(),
                    });
                }
                Ok(secret)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_secrets(&secrets)
    }

    /// Keys from secrets held in memory.
    ///
    /// # Errors
    /// [`KeyError::None`] without a secret.
    pub fn from_secrets(secrets: &[Vec<u8>]) -> Result<Self, KeyError> {
        if secrets.is_empty() {
            return Err(KeyError::None);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Ok(ServiceKeys {
            keys: secrets
                .iter()
                .map(|s| (EncodingKey::from_secret(s), DecodingKey::from_secret(s)))
                .collect(),
            validation,
        })
    }

    /// A token for `grant`, valid for `ttl`, signed with the first key.
    pub fn mint(&self, grant: &Grant, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
            grant: grant.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.keys[0].0)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The grant of `token`, if a configured key signed it and it is current and for the writer.
    ///
    /// # Errors
    /// [`TokenError`] naming the first rule broken.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let mut refusal = TokenError::Signature;
        for (_, key) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => return Ok(data.claims.grant),
                Err(e) => {
                    refusal = match e.kind() {
                        ErrorKind::InvalidSignature => continue,
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                            TokenError::Audience
                        }
                        _ => TokenError::Malformed,
                    };
                    break;
                }
            }
        }
        Err(refusal)
    }
}

/// A caller's own token, minted again before it gets old: for a gateway's calls to the writer.
#[derive(Debug)]
pub struct TokenSource {
    keys: ServiceKeys,
    grant: Grant,
    ttl: Duration,
    /// The current token and when to mint the next. A std `Mutex`: never held across `.await`.
    current: Mutex<Option<(String, SystemTime)>>,
}

impl TokenSource {
    pub fn new(keys: ServiceKeys, grant: Grant, ttl: Duration) -> Self {
        TokenSource {
            keys,
            grant,
            ttl,
            current: Mutex::new(None),
        }
    }

    /// A token with at least half its lifetime left.
    pub fn token(&self) -> String {
        let now = SystemTime::now();
        let mut current = self.current.lock().expect("token lock poisoned");
        match &*current {
            Some((token, renew_at)) if now < *renew_at => token.clone(),
            _ => {
                let token = self.keys.mint(&self.grant, self.ttl);
                *current = Some((token.clone(), now + self.ttl / 2));
                token
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> ServiceKeys {
        ServiceKeys::from_secrets(
            &secrets
                .iter()
                .map(|s| s.repeat(32).into_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn backend() -> Grant {
        Grant {
            sub: "billing".into(),
            kind: CallerKind::Backend,
            rooms: Patterns(vec!["orders-*".into()]),
            senders: Patterns(vec!["billing-bot".into()]),
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_grant() {
        let keys = keys(&["a"]);
        let token = keys.mint(&backend(), Duration::from_secs(60));
        assert_eq!(keys.verify(&token).unwrap(), backend());
    }

    #[test]
    fn rotation_verifies_with_any_configured_key_and_signs_with_the_first() {
        let old = keys(&["old"]);
        let both = keys(&["new", "old"]);
        let new = keys(&["new"]);
        let from_old = old.mint(&backend(), Duration::from_secs(60));
        assert!(
            both.verify(&from_old).is_ok(),
            "old tokens live on while both are set"
        );
        let from_both = both.mint(&backend(), Duration::from_secs(60));
        assert!(new.verify(&from_both).is_ok(), "the first key signs");
        assert_eq!(new.verify(&from_old), Err(TokenError::Signature));
    }

    #[test]
    fn expired_foreign_and_garbage_tokens_are_refused_with_the_reason() {
        let keys = keys(&["a"]);
        let mut claims = serde_json::to_value(Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: 0,
            exp: unix_now() - 3600,
            grant: backend(),
        })
        .unwrap();
        let sign = |claims: &serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                claims,
                &EncodingKey::from_secret(&"a".repeat(32).into_bytes()),
            )
            .unwrap()
        };
        assert_eq!(keys.verify(&sign(&claims)), Err(TokenError::Expired));
        claims["exp"] = (unix_now() + 3600).into();
        claims["aud"] = "chorus-gateway".into();
        assert_eq!(keys.verify(&sign(&claims)), Err(TokenError::Audience));
        assert_eq!(keys.verify("not a token"), Err(TokenError::Malformed));
        // A client token signed with another algorithm finds no key.
        let none = format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            base64_url(&claims.to_string())
        );
        assert!(keys.verify(&none).is_err());
    }

    fn base64_url(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    #[test]
    fn patterns_match_exact_names_prefixes_and_everything() {
        let p = Patterns(vec!["lobby".into(), "team-*".into()]);
        assert!(p.allows("lobby") && p.allows("team-a") && p.allows("team-"));
        assert!(!p.allows("lobby2") && !p.allows("tea"));
        assert!(Patterns::any().allows("anything"));
        assert!(!Patterns::default().allows("lobby"));
    }

    #[test]
    fn a_token_source_reuses_its_token_for_half_its_life() {
        let source = TokenSource::new(
            keys(&["a"]),
            Grant::gateway("gateway-a"),
            Duration::from_secs(300),
        );
        assert_eq!(source.token(), source.token());
        let grant = keys(&["a"]).verify(&source.token()).unwrap();
        assert_eq!(grant, Grant::gateway("gateway-a"));
    }

    #[test]
    fn keys_are_read_from_files_and_short_ones_refused() {
        let dir = std::env::temp_dir().join(format!("chorus-service-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, format!("{}\n", "k".repeat(48))).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "too short\n").unwrap();
        assert!(ServiceKeys::from_files(std::slice::from_ref(&good)).is_ok());
        let err = ServiceKeys::from_files(&[good, short]).unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
        assert!(matches!(ServiceKeys::from_files(&[]), Err(KeyError::None)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
