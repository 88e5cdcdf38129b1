//! Signing as SNS does, with keys and certificates generated for this test run (by the `openssl`
//! command line, into a temporary folder), and a loopback server for the certificate, the way an
//! emulator serves it to `--sns-cert-mirror`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use chorus_gateway::bus::SnsEnvelope;
use chorus_gateway::bus::string_to_sign;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::signature::{SignatureEncoding as _, Signer as _};

/// The path at which [`cert_server`] serves the certificate.
pub(crate) const CERT_PATH: &str = "/SimpleNotificationService-test.pem";

/// A fresh RSA key and self-signed certificate, as PEM: (key, certificate).
pub(crate) fn generated_key_and_cert() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| key_and_cert("sns"))
}

/// Another key and certificate: a forger's.
pub(crate) fn forger_key_and_cert() -> &'static (String, String) {
    static PAIR: OnceLock<(String, String)> = OnceLock::new();
    PAIR.get_or_init(|| key_and_cert("forger"))
}

fn key_and_cert(name: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("chorus-{name}-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::read_to_string(&key).unwrap(),
        std::fs::read_to_string(&cert).unwrap(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

/// Serves the generated certificate at [`CERT_PATH`] and counts fetches: (base URL, fetches).
pub(crate) async fn cert_server() -> (String, Arc<AtomicUsize>) {
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, fetches)
}

/// Signs as SNS does: over the string to sign, with SHA1 (v1) or SHA256 (v2).
pub(crate) fn sign(envelope: SnsEnvelope, version: &str) -> SnsEnvelope {
    sign_with(envelope, version, &generated_key_and_cert().0)
}

pub(crate) fn sign_with(mut envelope: SnsEnvelope, version: &str, key_pem: &str) -> SnsEnvelope {
    envelope.signature_version = Some(version.to_owned());
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(key_pem).unwrap();
    let text = string_to_sign(&envelope).unwrap();
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
