//! Client tokens: what is accepted, what is refused and why. Keys are generated per run (HS256
//! secrets here; RSA and EC keys by the `openssl` command line, into a temporary folder).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use chorus_gateway::auth::{
    AuthConfigError, AuthError, AuthSettings, Authenticator, Offered, bearer_token,
};
use chorus_protocol::RoomId;
use chorus_testkit::tokens::{client_claims, encode, hs256, unix_now as now};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
const OTHER_SECRET: &[u8] = b"another secret, also long enough to be accepted";

struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command line generates the test keys: install openssl");
    assert!(status.success(), "openssl {args:?} failed");
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("chorus-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), [SECRET, b"\n"].concat()).unwrap();
        std::fs::write(dir.join("other-secret"), OTHER_SECRET).unwrap();
        std::fs::write(dir.join("short-secret"), b"too short").unwrap();
        std::fs::write(dir.join("not-a-key.pem"), b"-----BEGIN NOTHING-----\n").unwrap();
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "rsa.pem",
            ],
        );
        openssl(
            &dir,
            &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"],
        );
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ec.pem",
            ],
        );
        openssl(
            &dir,
            &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"],
        );
        Keys { dir }
    })
}

fn claims(sub: &str, rooms: &[&str]) -> Value {
    client_claims(sub, rooms, now() + 600)
}

fn settings() -> AuthSettings {
    AuthSettings {
        secret_files: vec![keys().path("secret")],
        leeway: Duration::from_secs(5),
        ..AuthSettings::default()
    }
}

fn with_token(token: &str) -> Offered<'_> {
    Offered {
        query_token: Some(token),
        ..Offered::default()
    }
}

fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

#[test]
fn a_valid_token_names_the_user_and_its_rooms() {
    let auth = Authenticator::new(&settings()).unwrap();
    let token = hs256(SECRET, &claims("john", &["lobby", "team-*"]));
    let identity = auth.authenticate(with_token(&token)).unwrap();
    assert_eq!(identity.user.as_str(), "john");
    assert!(identity.rooms.allows(&room("lobby")));
    assert!(identity.rooms.allows(&room("team-red")));
    assert!(
        !identity.rooms.allows(&room("lobby2")),
        "exact names are exact"
    );
    assert!(!identity.rooms.allows(&room("admin")));
    assert!(!identity.expired(SystemTime::now()));
    assert!(identity.expired(SystemTime::now() + Duration::from_secs(700)));
}

#[test]
fn the_token_may_come_as_a_subprotocol() {
    let auth = Authenticator::new(&settings()).unwrap();
    let token = hs256(SECRET, &claims("lucy", &["*"]));
    let header = format!("chorus.v1, bearer.{token}");
    assert_eq!(bearer_token(&header), Some(token.as_str()));
    let identity = auth
        .authenticate(Offered {
            protocols: Some(&header),
            ..Offered::default()
        })
        .unwrap();
    assert_eq!(identity.user.as_str(), "lucy");
    assert!(identity.rooms.allows(&room("anything")), "* is every room");
}

#[test]
fn expired_not_yet_valid_and_forged_tokens_are_refused() {
    let auth = Authenticator::new(&settings()).unwrap();
    let expired = json!({"sub": "john", "exp": now() - 60, "rooms": ["*"]});
    assert_eq!(
        auth.authenticate(with_token(&hs256(SECRET, &expired)))
            .unwrap_err(),
        AuthError::Expired
    );
    let early = json!({"sub": "john", "exp": now() + 600, "nbf": now() + 300, "rooms": ["*"]});
    assert_eq!(
        auth.authenticate(with_token(&hs256(SECRET, &early)))
            .unwrap_err(),
        AuthError::NotYetValid
    );
    let forged = hs256(OTHER_SECRET, &claims("john", &["*"]));
    assert_eq!(
        auth.authenticate(with_token(&forged)).unwrap_err(),
        AuthError::Signature
    );
    // The payload swapped under a genuine signature.
    let genuine = hs256(SECRET, &claims("john", &["lobby"]));
    let other = hs256(SECRET, &claims("admin", &["*"]));
    let parts: Vec<&str> = genuine.split('.').collect();
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(
        auth.authenticate(with_token(&swapped)).unwrap_err(),
        AuthError::Signature
    );
    assert_eq!(
        auth.authenticate(with_token("not.a.jwt")).unwrap_err(),
        AuthError::Malformed
    );
    assert_eq!(
        auth.authenticate(with_token(&"x".repeat(10_000)))
            .unwrap_err(),
        AuthError::TooLong
    );
}

#[test]
fn unusable_claims_are_refused_with_the_reason() {
    let auth = Authenticator::new(&settings()).unwrap();
    let no_exp = json!({"sub": "john", "rooms": ["*"]});
    let err = auth
        .authenticate(with_token(&hs256(SECRET, &no_exp)))
        .unwrap_err();
    assert!(err.to_string().contains("exp"), "{err}");
    let no_sub = json!({"exp": now() + 60, "rooms": ["*"]});
    let err = auth
        .authenticate(with_token(&hs256(SECRET, &no_sub)))
        .unwrap_err();
    assert!(err.to_string().contains("sub"), "{err}");
    let bad_room = hs256(SECRET, &claims("john", &["has space*"]));
    let err = auth.authenticate(with_token(&bad_room)).unwrap_err();
    assert!(matches!(err, AuthError::Claims(_)), "{err}");
    let no_rooms = json!({"sub": "john", "exp": now() + 60});
    let identity = auth
        .authenticate(with_token(&hs256(SECRET, &no_rooms)))
        .unwrap();
    assert!(
        !identity.rooms.allows(&room("lobby")),
        "no rooms claim: no room"
    );
}

#[test]
fn rs256_and_es256_tokens_verify_against_their_public_keys() {
    let keys = keys();
    let auth = Authenticator::new(&AuthSettings {
        public_key_files: vec![keys.path("rsa.pub"), keys.path("ec.pub")],
        ..settings()
    })
    .unwrap();
    let rs = encode(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&keys.read("rsa.pem")).unwrap(),
        &claims("rita", &["lobby"]),
    );
    let es = encode(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&keys.read("ec.pem")).unwrap(),
        &claims("eric", &["lobby"]),
    );
    assert_eq!(
        auth.authenticate(with_token(&rs)).unwrap().user.as_str(),
        "rita"
    );
    assert_eq!(
        auth.authenticate(with_token(&es)).unwrap().user.as_str(),
        "eric"
    );

    // With only the RSA key, an ES256 token has no key to verify against.
    let rsa_only = Authenticator::new(&AuthSettings {
        secret_files: vec![],
        public_key_files: vec![keys.path("rsa.pub")],
        ..settings()
    })
    .unwrap();
    let err = rsa_only.authenticate(with_token(&es)).unwrap_err();
    assert!(matches!(err, AuthError::Algorithm(_)), "{err}");
    // An HS256 token "signed" with the RSA public key (the classic confusion) is refused.
    let confused = hs256(&keys.read("rsa.pub"), &claims("mallory", &["*"]));
    let err = rsa_only.authenticate(with_token(&confused)).unwrap_err();
    assert!(matches!(err, AuthError::Algorithm(_)), "{err}");
}

#[test]
fn during_a_rotation_both_keys_are_accepted() {
    let auth = Authenticator::new(&AuthSettings {
        secret_files: vec![keys().path("secret"), keys().path("other-secret")],
        ..settings()
    })
    .unwrap();
    for secret in [SECRET, OTHER_SECRET] {
        let token = hs256(secret, &claims("john", &["lobby"]));
        assert!(auth.authenticate(with_token(&token)).is_ok());
    }
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let auth = Authenticator::new(&AuthSettings {
        audience: Some("chorus".into()),
        issuer: Some("https://id.example".into()),
        ..settings()
    })
    .unwrap();
    let mut good = claims("john", &["*"]);
    good["aud"] = json!("chorus");
    good["iss"] = json!("https://id.example");
    assert!(auth.authenticate(with_token(&hs256(SECRET, &good))).is_ok());
    let mut other_aud = good.clone();
    other_aud["aud"] = json!("billing");
    assert_eq!(
        auth.authenticate(with_token(&hs256(SECRET, &other_aud)))
            .unwrap_err(),
        AuthError::Audience
    );
    let mut other_iss = good;
    other_iss["iss"] = json!("https://evil.example");
    assert_eq!(
        auth.authenticate(with_token(&hs256(SECRET, &other_iss)))
            .unwrap_err(),
        AuthError::Issuer
    );
}

#[test]
fn dev_users_only_behind_their_flag() {
    let tokens_only = Authenticator::new(&settings()).unwrap();
    let dev = Offered {
        query_user: Some("john"),
        ..Offered::default()
    };
    assert_eq!(
        tokens_only.authenticate(dev).unwrap_err(),
        AuthError::DevUsersOff
    );
    assert_eq!(
        tokens_only.authenticate(Offered::default()).unwrap_err(),
        AuthError::Missing
    );
    let with_dev = Authenticator::new(&AuthSettings {
        secret_files: vec![],
        dev_users: true,
        ..settings()
    })
    .unwrap();
    let identity = with_dev.authenticate(dev).unwrap();
    assert_eq!(identity.user.as_str(), "john");
    assert!(identity.expires.is_none());
    let err = with_dev
        .authenticate(Offered {
            query_user: Some("has space"),
            ..Offered::default()
        })
        .unwrap_err();
    assert!(matches!(err, AuthError::DevUser(_)), "{err}");
}

#[test]
fn bad_key_configuration_fails_at_start_naming_the_file() {
    let err = Authenticator::new(&AuthSettings::default()).unwrap_err();
    assert!(matches!(err, AuthConfigError::Nothing), "{err}");
    let err = Authenticator::new(&AuthSettings {
        secret_files: vec![keys().path("short-secret")],
        ..settings()
    })
    .unwrap_err();
    assert!(err.to_string().contains("short-secret"), "{err}");
    assert!(err.to_string().contains("32 bytes"), "{err}");
    let err = Authenticator::new(&AuthSettings {
        public_key_files: vec![keys().path("not-a-key.pem")],
        ..settings()
    })
    .unwrap_err();
    assert!(err.to_string().contains("not-a-key.pem"), "{err}");
    let err = Authenticator::new(&AuthSettings {
        secret_files: vec![keys().path("missing")],
        ..settings()
    })
    .unwrap_err();
    assert!(matches!(err, AuthConfigError::Read { .. }), "{err}");
}

#[test]
fn errors_never_quote_the_token() {
    let auth = Authenticator::new(&settings()).unwrap();
    let forged = hs256(OTHER_SECRET, &claims("john", &["*"]));
    let message = auth
        .authenticate(with_token(&forged))
        .unwrap_err()
        .to_string();
    for part in forged.split('.') {
        assert!(!message.contains(part), "{message}");
    }
}
