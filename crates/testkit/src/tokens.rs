//! Tokens as their issuers mint them: client JWTs, which an auth service gives users and a
//! gateway checks, and service tokens, which the writer wants from its callers.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_service::service_auth::{Grant, ServiceKeys};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Seconds since the epoch, as JWTs count time.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The claims of a client token: the user (`sub`), the room patterns it may join, and its
/// expiry in seconds since the epoch.
pub fn client_claims(sub: &str, rooms: &[&str], exp: u64) -> Value {
    json!({"sub": sub, "rooms": rooms, "exp": exp})
}

/// `claims` signed with HS256 and `secret`.
pub fn hs256(secret: &[u8], claims: &Value) -> String {
    encode(Algorithm::HS256, &EncodingKey::from_secret(secret), claims)
}

/// `claims` signed with `algorithm` and `key`.
///
/// # Panics
/// When the key does not fit the algorithm.
pub fn encode(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    // jsonwebtoken wants a crypto provider chosen once per process; a gateway in the same process
    // may have chosen it already.
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("a signed token")
}

/// A client token for `sub` and `rooms`, signed with HS256 and `secret`, expiring at `exp`.
pub fn client_token(secret: &[u8], sub: &str, rooms: &[&str], exp: u64) -> String {
    hs256(secret, &client_claims(sub, rooms, exp))
}

/// A random secret for client tokens, in a file for gateways' `--jwt-secret-file`; it mints
/// tokens as an auth service would. The file is removed on drop.
pub struct TokenIssuer {
    secret_file: PathBuf,
    secret: String,
}

impl TokenIssuer {
    /// A fresh secret, written to a file of its own in the temporary folder.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn new() -> TokenIssuer {
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let secret_file =
            std::env::temp_dir().join(format!("chorus-test-jwt-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&secret_file, &secret).expect("writing the JWT secret");
        TokenIssuer {
            secret_file,
            secret,
        }
    }

    /// The file holding the secret.
    pub fn secret_file(&self) -> &Path {
        &self.secret_file
    }

    /// The gateway flags that make it take this issuer's tokens, with no leeway on expiry.
    pub fn gateway_flags(&self) -> Vec<String> {
        vec![
            "--jwt-secret-file".into(),
            self.secret_file.to_string_lossy().into_owned(),
            "--jwt-leeway-secs".into(),
            "0".into(),
        ]
    }

    /// A token for `sub` and `rooms`, valid for `ttl` (whole seconds, as JWTs count).
    pub fn mint(&self, sub: &str, rooms: &[&str], ttl: Duration) -> String {
        client_token(
            self.secret.as_bytes(),
            sub,
            rooms,
            unix_now() + ttl.as_secs(),
        )
    }
}

impl Default for TokenIssuer {
    fn default() -> Self {
        TokenIssuer::new()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.secret_file);
    }
}

/// Headers that send `token` as a bearer token.
///
/// # Panics
/// When the token is not a valid header value.
pub fn bearer_headers(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .expect("a token is a header value"),
    );
    headers
}

/// An HTTP client that sends `token` with every request.
///
/// # Panics
/// When the client cannot be built.
pub fn bearer_client(token: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(bearer_headers(token))
        .build()
        .expect("an HTTP client")
}

/// A gateway's service token named `name`, signed with `keys` and valid for a day: what a
/// gateway sends the writer.
pub fn gateway_token(keys: &ServiceKeys, name: &str) -> String {
    keys.mint(&Grant::gateway(name), Duration::from_secs(24 * 3600))
}

/// An HTTP client that calls writers as gateway `name` does (with [`gateway_token`]).
pub fn gateway_client(keys: &ServiceKeys, name: &str) -> reqwest::Client {
    bearer_client(&gateway_token(keys, name))
}
