//! Who a client is, and which rooms it may use: a JWT, checked once when the socket opens.
//!
//! - Where the token comes from: the subprotocol `bearer.<JWT>`, offered next to `chorus.v1`
//!   (`new WebSocket(url, ["chorus.v1", "bearer." + jwt])`; the gateway answers `chorus.v1` and
//!   never echoes the token), or the `token` query parameter. Browsers cannot set headers on a
//!   WebSocket, and query strings end up in proxies' access logs, so the subprotocol is preferred.
//! - Keys: HS256 shared secrets and RS256/ES256 public keys (PEM), several at once so that keys
//!   can be rotated without a gap; a token is checked against the keys of its header's algorithm.
//! - Claims: `sub` is the sender of everything the connection sends (a frame can never name its
//!   sender); `exp` is required and `nbf` checked, with a small leeway; `aud` and `iss` when
//!   configured; `rooms` lists exact room names or `prefix*` patterns (`*` alone: every room).
//!   Without a `rooms` claim the token allows no room.
//! - The connection is closed with [`close::TOKEN_EXPIRED`](chorus_protocol::close) when its
//!   token expires.
//!
//! Tokens never reach logs: errors describe the token, never quote it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_protocol::{InvalidValue, RoomId, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The subprotocol prefix that carries a token.
pub const BEARER_PREFIX: &str = "bearer.";

/// Longest token accepted (a JWT with a long `rooms` list is still far below this).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Shortest HS256 secret accepted: 256 bits, the size of the hash (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// How clients are authenticated.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// HS256 secrets, one file each.
    pub secret_files: Vec<PathBuf>,
    /// PEM public keys: RSA for RS256, EC P-256 for ES256.
    pub public_key_files: Vec<PathBuf>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Development only: `?user=NAME`, unauthenticated, every room.
    pub dev_users: bool,
}

/// Why the authenticator could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "no client authentication is configured: set --jwt-secret-file or --jwt-public-key-file \
         (or --insecure-dev-users, for development only)"
    )]
    Nothing,
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes, found {found}")]
    ShortSecret { path: String, found: usize },
    #[error("{path}: not a PEM RSA or EC (P-256) public key")]
    BadPublicKey { path: String },
}

/// Why a client's credentials were refused. The text is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token: offer the subprotocol \"bearer.<JWT>\" next to \"chorus.v1\", or add ?token=<JWT>"
    )]
    Missing,
    #[error("this gateway takes tokens only (no ?user= names)")]
    DevUsersOff,
    #[error("missing ?user=NAME (dev mode)")]
    MissingDevUser,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("tokens signed with {0} are not accepted here")]
    Algorithm(String),
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is for another audience (aud)")]
    Audience,
    #[error("the token is from another issuer (iss)")]
    Issuer,
    #[error("the token's claims are unusable: {0}")]
    Claims(ClaimsError),
    #[error("bad ?user=: {0}")]
    DevUser(InvalidValue),
}

/// Why a token's claims cannot be used. Like [`AuthError`], its text goes to the client, who
/// sees no chain of causes: each variant says what is wrong in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// A claim this gateway requires is absent.
    #[error("no {0}")]
    Missing(String),
    #[error("sub: {0}")]
    Sub(InvalidValue),
    #[error(transparent)]
    Rooms(#[from] RoomPatternError),
    /// The claims are not the JSON expected (serde's description of where).
    #[error("{0}")]
    Json(String),
}

/// A `rooms` entry that is neither a room name nor a room-name prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rooms: {pattern:?}: {reason}")]
pub struct RoomPatternError {
    pub pattern: String,
    pub reason: InvalidValue,
}

/// The kind of a refusal, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    Missing,
    Malformed,
    Signature,
    Expired,
    Audience,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Missing => "missing",
            RefusalReason::Malformed => "malformed",
            RefusalReason::Signature => "signature",
            RefusalReason::Expired => "expired",
            RefusalReason::Audience => "audience",
        }
    }
}

impl AuthError {
    pub fn reason(&self) -> RefusalReason {
        match self {
            AuthError::Missing
            | AuthError::MissingDevUser
            | AuthError::DevUsersOff
            | AuthError::DevUser(_) => RefusalReason::Missing,
            AuthError::Malformed | AuthError::TooLong | AuthError::Claims(_) => {
                RefusalReason::Malformed
            }
            AuthError::Algorithm(_) | AuthError::Signature => RefusalReason::Signature,
            AuthError::Expired | AuthError::NotYetValid => RefusalReason::Expired,
            AuthError::Audience | AuthError::Issuer => RefusalReason::Audience,
        }
    }
}

/// A room pattern of the `rooms` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPattern {
    Exact(String),
    Prefix(String),
}

/// The rooms a connection may join and send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomGrants {
    Every,
    Only(Vec<RoomPattern>),
}

impl RoomGrants {
    /// Parses a `rooms` claim: exact names, or `prefix*` (`*` alone: every room).
    ///
    /// # Errors
    /// [`RoomPatternError`] naming the bad entry.
    pub fn parse(patterns: &[String]) -> Result<RoomGrants, RoomPatternError> {
        let mut only = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            match pattern.strip_suffix('*') {
                Some("") => return Ok(RoomGrants::Every),
                Some(prefix) => {
                    // A prefix must itself be a valid start of a room name.
                    RoomId::parse(prefix).map_err(|reason| RoomPatternError {
                        pattern: pattern.clone(),
                        reason,
                    })?;
                    only.push(RoomPattern::Prefix(prefix.to_owned()));
                }
                None => {
                    RoomId::parse(pattern.as_str()).map_err(|reason| RoomPatternError {
                        pattern: pattern.clone(),
                        reason,
                    })?;
                    only.push(RoomPattern::Exact(pattern.clone()));
                }
            }
        }
        Ok(RoomGrants::Only(only))
    }

    pub fn allows(&self, room: &RoomId) -> bool {
        match self {
            RoomGrants::Every => true,
            RoomGrants::Only(patterns) => patterns.iter().any(|p| match p {
                RoomPattern::Exact(name) => name == room.as_str(),
                RoomPattern::Prefix(prefix) => room.as_str().starts_with(prefix.as_str()),
            }),
        }
    }
}

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub rooms: RoomGrants,
    /// When the token stops being valid (leeway included); `None` for dev users.
    pub expires: Option<SystemTime>,
}

impl Identity {
    /// Whether the credentials have expired by `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// Checks client credentials. Built once at start-up.
pub struct Authenticator {
    keys: Vec<Key>,
    leeway: Duration,
    dev_users: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "algorithms",
                &self.keys.iter().map(|k| k.algorithm).collect::<Vec<_>>(),
            )
            .field("dev_users", &self.dev_users)
            .finish_non_exhaustive()
    }
}

/// The credentials a WebSocket request offered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Offered<'a> {
    /// The `Sec-WebSocket-Protocol` header, if any.
    pub protocols: Option<&'a str>,
    /// The `token` query parameter.
    pub query_token: Option<&'a str>,
    /// The `user` query parameter (dev users).
    pub query_user: Option<&'a str>,
}

impl Authenticator {
    /// Reads the key files.
    ///
    /// # Errors
    /// [`AuthConfigError`] naming the file, or saying that nothing is configured.
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthConfigError> {
        // Two providers may be compiled in through other crates; pick one explicitly.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| AuthConfigError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let mut keys = Vec::new();
        for path in &settings.secret_files {
            let mut secret = read(path)?;
            while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                secret.pop();
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(AuthConfigError::ShortSecret {
                    path: path.display().to_string(),
                    found: secret.len(),
                });
            }
            keys.push((Algorithm::HS256, DecodingKey::from_secret(&secret)));
        }
        for path in &settings.public_key_files {
            let pem = read(path)?;
            let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                return Err(AuthConfigError::BadPublicKey {
                    path: path.display().to_string(),
                });
            };
            keys.push(key);
        }
        if keys.is_empty() && !settings.dev_users {
            return Err(AuthConfigError::Nothing);
        }
        let keys = keys
            .into_iter()
            .map(|(algorithm, key)| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = settings.leeway.as_secs();
                validation.validate_nbf = true;
                validation.set_required_spec_claims(&["exp", "sub"]);
                match &settings.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &settings.issuer {
                    validation.set_issuer(&[iss]);
                }
                Key {
                    algorithm,
                    key,
                    validation,
                }
            })
            .collect();
        Ok(Authenticator {
            keys,
            leeway: settings.leeway,
            dev_users: settings.dev_users,
        })
    }

    /// Whether tokens are accepted (some key is configured).
    pub fn takes_tokens(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Who the request is. A token wins over a dev `?user=`.
    ///
    /// # Errors
    /// [`AuthError`], safe to show the client.
    pub fn authenticate(&self, offered: Offered<'_>) -> Result<Identity, AuthError> {
        let token = offered
            .protocols
            .and_then(bearer_token)
            .or(offered.query_token);
        match (token, offered.query_user) {
            (Some(token), _) if self.takes_tokens() => self.verify(token),
            (_, Some(user)) if self.dev_users => Ok(Identity {
                user: UserId::parse(user).map_err(AuthError::DevUser)?,
                rooms: RoomGrants::Every,
                expires: None,
            }),
            (_, Some(_)) => Err(AuthError::DevUsersOff),
            _ if self.dev_users && !self.takes_tokens() => Err(AuthError::MissingDevUser),
            _ => Err(AuthError::Missing),
        }
    }

    /// Verifies a JWT against the keys of its algorithm.
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong with the token.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let mut outcome = Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        for key in self.keys.iter().filter(|k| k.algorithm == header.alg) {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => match refusal(e.kind()) {
                    // Another key of the same algorithm may have signed it.
                    AuthError::Signature => outcome = Err(AuthError::Signature),
                    // Claims are checked after the signature: this key signed it.
                    other => return Err(other),
                },
            }
        }
        outcome
    }

    fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        let sub = claims
            .sub
            .ok_or_else(|| AuthError::Claims(ClaimsError::Missing("sub".into())))?;
        let user = UserId::parse(sub).map_err(|e| AuthError::Claims(ClaimsError::Sub(e)))?;
        let rooms = RoomGrants::parse(claims.rooms.as_deref().unwrap_or_default())
            .map_err(|e| AuthError::Claims(e.into()))?;
        Ok(Identity {
            user,
            rooms,
            expires: Some(UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway),
        })
    }
}

/// The token in a `Sec-WebSocket-Protocol` list, if one is offered.
pub fn bearer_token(protocols: &str) -> Option<&str> {
    protocols
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix(BEARER_PREFIX))
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::InvalidAlgorithm => AuthError::Algorithm("another algorithm".into()),
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Claims(ClaimsError::Missing(claim.clone()))
        }
        ErrorKind::Json(e) => AuthError::Claims(ClaimsError::Json(e.to_string())),
        _ => AuthError::Malformed,
    }
}
