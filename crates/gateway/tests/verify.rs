//! SNS signature verification with a key and certificate generated for this test run (by the
//! `openssl` command line, into a temporary folder), served on loopback the way a mirror serves it;
//! and which certificate URLs are fetched on AWS (an SNS host over HTTPS only) and with a mirror
//! (the mirror, whatever host the URL names).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chorus_gateway::bus::SnsEnvelope;
use chorus_gateway::bus::{CertSource, Verifier, VerifyError, string_to_sign};
use chorus_testkit::sns::{
    cert_server, cert_url, confirmation, forger_key_and_cert, sign, sign_with,
};

const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:chorus";

async fn verifier() -> (Verifier, Arc<AtomicUsize>) {
    let (base, fetches) = cert_server().await;
    let verifier = Verifier::new(
        TOPIC,
        Duration::from_secs(3600),
        CertSource::Mirror {
            base: base.parse().unwrap(),
            sign_as: None,
        },
    )
    .unwrap();
    (verifier, fetches)
}

/// A notification of [`TOPIC`] naming the genuine certificate, with an empty signature.
fn notification(message: &str) -> SnsEnvelope {
    SnsEnvelope {
        signature_version: Some("2".into()),
        signature: Some(String::new()),
        signing_cert_url: Some(cert_url()),
        ..chorus_testkit::sns::notification(TOPIC, message)
    }
}

#[tokio::test]
async fn genuine_v1_and_v2_notifications_verify_and_the_certificate_is_fetched_once() {
    let (verifier, fetches) = verifier().await;
    verifier
        .verify(&sign(notification(r#"{"v":1,"events":[]}"#), "2"))
        .await
        .unwrap();
    verifier
        .verify(&sign(notification("another"), "1"))
        .await
        .unwrap();
    let mut with_subject = notification("with a subject");
    with_subject.subject = Some("hello".into());
    verifier.verify(&sign(with_subject, "1")).await.unwrap();
    assert_eq!(fetches.load(Ordering::Relaxed), 1, "cached by URL");
}

#[tokio::test]
async fn a_tampered_message_or_signature_is_refused() {
    let (verifier, _) = verifier().await;
    let mut tampered = sign(notification(r#"{"v":1,"events":[]}"#), "2");
    tampered.message = r#"{"v":1,"events":[{"forged":true}]}"#.into();
    assert!(matches!(
        verifier.verify(&tampered).await,
        Err(VerifyError::BadSignature)
    ));

    let mut wrong_version = sign(notification("x"), "2");
    wrong_version.signature_version = Some("1".into());
    assert!(matches!(
        verifier.verify(&wrong_version).await,
        Err(VerifyError::BadSignature)
    ));

    let mut garbage = sign(notification("x"), "2");
    garbage.signature = Some("not base64!".into());
    assert!(matches!(
        verifier.verify(&garbage).await,
        Err(VerifyError::BadSignature)
    ));

    let mut unsigned = notification("x");
    unsigned.signature = None;
    assert!(verifier.verify(&unsigned).await.is_err());

    let mut unknown = sign(notification("x"), "2");
    unknown.signature_version = Some("3".into());
    assert!(matches!(
        verifier.verify(&unknown).await,
        Err(VerifyError::UnsupportedVersion(_))
    ));
}

#[tokio::test]
async fn tampering_with_any_signed_field_is_refused() {
    let (verifier, _) = verifier().await;
    let mut signed = notification(r#"{"v":1,"events":[]}"#);
    signed.subject = Some("subject".into());
    let signed = sign(signed, "2");
    verifier.verify(&signed).await.unwrap();
    let earlier = time::OffsetDateTime::now_utc()
        .checked_sub(time::Duration::seconds(7))
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    type Tamper = Box<dyn Fn(&mut SnsEnvelope)>;
    let tamperings: Vec<(&str, Tamper)> = vec![
        ("Message", Box::new(|e| e.message.push(' '))),
        ("MessageId", Box::new(|e| e.message_id.push('x'))),
        ("Subject", Box::new(|e| e.subject = Some("other".into()))),
        ("no Subject", Box::new(|e| e.subject = None)),
        (
            "Timestamp",
            Box::new(move |e| e.timestamp = earlier.clone()),
        ),
        ("TopicArn", Box::new(|e| e.topic_arn.push('x'))),
        ("Type", Box::new(|e| e.kind = "Unknown".into())),
        (
            "SignatureVersion",
            Box::new(|e| e.signature_version = Some("1".into())),
        ),
    ];
    for (field, tamper) in tamperings {
        let mut forged = signed.clone();
        tamper(&mut forged);
        assert!(
            verifier.verify(&forged).await.is_err(),
            "tampered {field} passed"
        );
    }
}

#[tokio::test]
async fn other_topics_and_stale_timestamps_are_refused() {
    let (verifier, _) = verifier().await;
    let mut other_topic = notification("x");
    other_topic.topic_arn = "arn:aws:sns:us-east-1:123456789012:other".into();
    assert!(matches!(
        verifier.verify(&sign(other_topic, "2")).await,
        Err(VerifyError::WrongTopic)
    ));

    let mut stale = notification("x");
    stale.timestamp = "2020-01-01T00:00:00.000Z".into();
    assert!(matches!(
        verifier.verify(&sign(stale, "2")).await,
        Err(VerifyError::Stale(_))
    ));
}

#[tokio::test]
async fn on_aws_only_certificates_of_an_sns_host_over_https_are_fetched() {
    // A certificate server on loopback that the refused URLs below could reach: nothing may be
    // fetched from it.
    let (base, fetches) = cert_server().await;
    let verifier = Verifier::new(TOPIC, Duration::from_secs(3600), CertSource::Aws).unwrap();
    let refused = [
        format!("{base}/SimpleNotificationService-test.pem"),
        "https://attacker.example/SimpleNotificationService-test.pem".to_owned(),
        cert_url().replacen("https", "http", 1),
        "https://sns.us-east-1.amazonaws.com/evil/cert.pem".to_owned(),
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-test.pem".to_owned(),
    ];
    for url in refused {
        let mut message = notification("x");
        message.signing_cert_url = Some(url.clone());
        assert!(
            matches!(
                verifier.verify(&sign(message, "2")).await,
                Err(VerifyError::CertUrl(_))
            ),
            "{url} was not refused"
        );
    }
    assert_eq!(
        fetches.load(Ordering::Relaxed),
        0,
        "nothing is fetched for refused URLs"
    );
}

#[tokio::test]
async fn a_mirror_serves_the_certificate_whatever_host_or_scheme_the_url_names() {
    let (verifier, fetches) = verifier().await;
    // moto names the AWS host; LocalStack names itself over plain HTTP; a name that does not
    // resolve proves that the host named is never contacted.
    for url in [
        cert_url(),
        "http://127.0.0.1:4566/SimpleNotificationService-test.pem".to_owned(),
        "https://attacker.invalid/SimpleNotificationService-test.pem".to_owned(),
    ] {
        let mut message = notification(r#"{"v":1,"events":[]}"#);
        message.signing_cert_url = Some(url.clone());
        verifier
            .verify(&sign(message, "1"))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    assert_eq!(
        fetches.load(Ordering::Relaxed),
        1,
        "one path on one mirror: fetched once"
    );

    // The mirror's certificate must still verify the signature: a message signed with another
    // key, naming the forger's own certificate, is refused.
    let mut forged = notification(r#"{"v":1,"events":[{"forged":true}]}"#);
    forged.signing_cert_url =
        Some("https://forger.invalid/SimpleNotificationService-test.pem".into());
    assert!(matches!(
        verifier
            .verify(&sign_with(forged, "2", &forger_key_and_cert().0))
            .await,
        Err(VerifyError::BadSignature)
    ));

    // Only the shape is checked: a certificate path, no query, no user info.
    for url in [
        "http://127.0.0.1:4566/SimpleNotificationService-test.pem?Action=x",
        "http://127.0.0.1:4566/SimpleNotificationService-test.txt",
        "http://me:pw@127.0.0.1:4566/SimpleNotificationService-test.pem",
        "ftp://127.0.0.1/SimpleNotificationService-test.pem",
    ] {
        let mut message = notification("x");
        message.signing_cert_url = Some(url.into());
        assert!(
            matches!(
                verifier.verify(&sign(message, "2")).await,
                Err(VerifyError::CertUrl(_))
            ),
            "{url} was not refused"
        );
    }
    assert_eq!(fetches.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn subscription_confirmations_sign_the_token_and_subscribe_url() {
    let (verifier, _) = verifier().await;
    let mut confirmation = confirmation(
        TOPIC,
        "2336412f37fb687f5d51e6e2425",
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336",
    );
    confirmation.message_id = "m-1".into();
    confirmation.signing_cert_url = Some(cert_url());
    let text = string_to_sign(&confirmation).unwrap();
    assert!(text.starts_with(
        "Message\nYou have chosen to subscribe to the topic\nMessageId\nm-1\nSubscribeURL\n"
    ));
    assert!(text.ends_with("Token\n2336412f37fb687f5d51e6e2425\nTopicArn\narn:aws:sns:us-east-1:123456789012:chorus\nType\nSubscriptionConfirmation\n"));
    let signed = sign(confirmation, "1");
    verifier.verify(&signed).await.unwrap();
    let mut forged = signed;
    forged.token = Some("another-token".into());
    assert!(matches!(
        verifier.verify(&forged).await,
        Err(VerifyError::BadSignature)
    ));
}
