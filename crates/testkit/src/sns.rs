//! SNS as the gateway sees it: envelopes as SNS posts them to an HTTP endpoint, signed as SNS
//! signs them, with keys and certificates generated for the test run (by the `openssl` command
//! line, into a temporary folder), and a loopback server for the certificate, the way an emulator
//! serves it to `--sns-cert-mirror`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use chorus_gateway::bus::{SnsEnvelope, string_to_sign};
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::signature::{SignatureEncoding as _, Signer as _};

/// The path at which [`cert_server`] serves the certificate.
pub const CERT_PATH: &str = "/SimpleNotificationService-test.pem";

/// The certificate URL genuine notifications name (on AWS's host: a mirror serves its path).
pub fn cert_url() -> String {
    format!("https://sns.us-east-1.amazonaws.com{CERT_PATH}")
}

/// Now, as SNS writes a `Timestamp` (RFC 3339).
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats as RFC 3339")
}

/// A notification of `topic` carrying `message`, unsigned, with a fresh `MessageId` and now as
/// its `Timestamp`.
pub fn notification(topic: &str, message: &str) -> SnsEnvelope {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = format!("msg-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    notification_at(topic, message, id, now())
}

/// A notification with the `MessageId` and `Timestamp` given, unsigned.
pub fn notification_at(
    topic: &str,
    message: &str,
    message_id: String,
    timestamp: String,
) -> SnsEnvelope {
    SnsEnvelope {
        kind: "Notification".into(),
        message_id,
        topic_arn: topic.to_owned(),
        message: message.to_owned(),
        timestamp,
        subject: None,
        token: None,
        subscribe_url: None,
        signature_version: None,
        signature: None,
        signing_cert_url: None,
    }
}

/// A SubscriptionConfirmation of `topic` with its `Token` and `SubscribeURL`, unsigned, with a
/// fresh `MessageId` and now as its `Timestamp`.
pub fn confirmation(topic: &str, token: &str, subscribe_url: &str) -> SnsEnvelope {
    SnsEnvelope {
        kind: "SubscriptionConfirmation".into(),
        token: Some(token.to_owned()),
        subscribe_url: Some(subscribe_url.to_owned()),
        ..notification(topic, "You have chosen to subscribe to the topic")
    }
}

/// The envelope as SNS posts it: a JSON object of the fields present.
pub fn to_json(envelope: &SnsEnvelope) -> String {
    let mut json = serde_json::Map::new();
    let mut put = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            json.insert(name.to_owned(), value.clone().into());
        }
    };
    put("Type", Some(&envelope.kind));
    put("MessageId", Some(&envelope.message_id));
    put("Token", envelope.token.as_ref());
    put("TopicArn", Some(&envelope.topic_arn));
    put("Subject", envelope.subject.as_ref());
    put("Message", Some(&envelope.message));
    put("SubscribeURL", envelope.subscribe_url.as_ref());
    put("Timestamp", Some(&envelope.timestamp));
    put("SignatureVersion", envelope.signature_version.as_ref());
    put("Signature", envelope.signature.as_ref());
    put("SigningCertURL", envelope.signing_cert_url.as_ref());
    serde_json::Value::Object(json).to_string()
}

/// The run's RSA key and self-signed certificate, as PEM: (key, certificate). Generated once.
pub fn generated_key_and_cert() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| key_and_cert("sns"))
}

/// Another key and certificate: a forger's.
pub fn forger_key_and_cert() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| key_and_cert("forger"))
}

fn key_and_cert(name: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("chorus-{name}-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={name}.test.invalid"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command line generates the test certificate: install openssl");
    assert!(status.success(), "openssl failed");
    let pair = (
        std::fs::read_to_string(&key).expect("the generated key"),
        std::fs::read_to_string(&cert).expect("the generated certificate"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

/// Serves the generated certificate at [`CERT_PATH`] on loopback and counts fetches:
/// (base URL, fetches).
///
/// # Panics
/// When no loopback port can be bound.
pub async fn cert_server() -> (String, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let cert = generated_key_and_cert().1.clone();
    let app = Router::new().route(
        CERT_PATH,
        get(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            let cert = cert.clone();
            async move { cert }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("a bound address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, fetches)
}

/// Signs as SNS does, with the run's key: over the string to sign, with SHA1 (`version` "1")
/// or SHA256 ("2").
pub fn sign(envelope: SnsEnvelope, version: &str) -> SnsEnvelope {
    sign_with(envelope, version, &generated_key_and_cert().0)
}

/// Signs as SNS does, with the PEM (PKCS#8) key given.
///
/// # Panics
/// When the key is not an RSA key, or the envelope has no string to sign (an unknown `Type`).
pub fn sign_with(mut envelope: SnsEnvelope, version: &str, key_pem: &str) -> SnsEnvelope {
    envelope.signature_version = Some(version.to_owned());
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(key_pem).expect("an RSA key");
    let text = string_to_sign(&envelope).expect("a string to sign");
    let signature = match version {
        "1" => SigningKey::<sha1::Sha1>::new(key)
            .sign(text.as_bytes())
            .to_vec(),
        _ => SigningKey::<sha2::Sha256>::new(key)
            .sign(text.as_bytes())
            .to_vec(),
    };
    envelope.signature = Some(base64::engine::general_purpose::STANDARD.encode(signature));
    envelope
}
