//! SNS message verification: only genuine messages of the configured topic get in.
//!
//! A message is accepted when all hold:
//! - `TopicArn` is the configured topic;
//! - `SignatureVersion` is 1 (SHA1withRSA) or 2 (SHA256withRSA) and `Signature` verifies over the
//!   string to sign AWS documents: for `Notification` the fields Message, MessageId, Subject (only
//!   if present), Timestamp, TopicArn, Type; for `SubscriptionConfirmation` and
//!   `UnsubscribeConfirmation` the fields Message, MessageId, SubscribeURL, Timestamp, Token,
//!   TopicArn, Type; each as `Name\nValue\n`;
//! - the key is from the certificate `SigningCertURL` names, fetched with a short timeout, a size
//!   cap and no redirects, and cached by the URL it was fetched from ([`KeyCache`]: LRU, single
//!   flight, bounded fetches, failures remembered);
//! - `Timestamp` is no older than the configured window (and not from the future beyond it).
//!
//! Where the certificate comes from depends on the [`CertSource`]:
//! - [`CertSource::Aws`] (production): `SigningCertURL` itself, which must be
//!   `https://sns.<region>.amazonaws.com[.cn]/SimpleNotificationService-….pem` (no port, user info,
//!   query or fragment: see [`check_cert_url`]) with the topic's own region.
//! - [`CertSource::Mirror`] (`--sns-cert-mirror`, local emulators only): the URL's path, fetched
//!   from the configured mirror, whatever host or scheme the URL names (moto names the AWS host,
//!   LocalStack names itself over plain HTTP); only its shape is checked
//!   ([`check_mirrored_cert_url`]). Optionally the request is signed as an SNS API call (SigV4,
//!   service `sns`), which is how moto routes it. Trusting the mirror is what makes this local
//!   only: the signature still has to verify, so verification stays on against every emulator.
//!
//! Every check that needs no I/O (topic, type, version, timestamp, the certificate URL's shape
//! and region, the signature's encoding) runs before any certificate is fetched, so a forged
//! message costs a fetch only if it names a well-formed certificate URL, and then at most one
//! fetch per such URL per failure TTL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
use base64::Engine as _;
use rsa::RsaPublicKey;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey as _;
use rsa::signature::Verifier as _;
use x509_cert::Certificate;
use x509_cert::der::{DecodePem as _, Encode as _};

use super::certs::{CertCacheSettings, CertMetrics, KeyCache};
use super::envelope::SnsEnvelope;
use crate::Chain;
use crate::settings::HttpUrl;

/// Largest certificate accepted, in bytes.
const MAX_CERT_BYTES: usize = 16 * 1024;

/// Where signing certificates come from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// From the URL in the message (production).
    Aws,
    /// From `base` + the URL's path, whatever host or scheme the URL names: for a local emulator
    /// that serves the certificate itself. With `sign_as`, the request carries a SigV4 signature
    /// for service `sns` in that region.
    Mirror {
        base: HttpUrl,
        sign_as: Option<(SharedCredentialsProvider, String)>,
    },
}

/// Why a message was refused. Logged (without the payload) and counted; the sender gets 403, or
/// 503 for [`VerifyError::CertFetch`] (the certificate could not be had just now: SNS retries).
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("message is not from the configured topic")]
    WrongTopic,
    #[error("unsupported SignatureVersion {0:?}")]
    UnsupportedVersion(Option<String>),
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("SigningCertURL refused: {0}")]
    CertUrl(String),
    #[error("signing certificate unavailable: {0}")]
    CertFetch(String),
    #[error("signing certificate unusable: {0}")]
    BadCert(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("Timestamp {0:?} is outside the accepted window")]
    Stale(String),
}

/// Verifies SNS messages for one topic. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

struct VerifierInner {
    topic_arn: String,
    max_age: Duration,
    source: CertSource,
    http: reqwest::Client,
    /// The topic's region: certificates must be from its SNS host.
    region: Option<String>,
    keys: KeyCache,
}

impl Verifier {
    /// A verifier for `topic_arn` accepting messages up to `max_age` old.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        topic_arn: impl Into<String>,
        max_age: Duration,
        source: CertSource,
    ) -> Result<Self, reqwest::Error> {
        Self::with_cache(
            topic_arn,
            max_age,
            source,
            CertCacheSettings::default(),
            Arc::default(),
        )
    }

    /// [`Self::new`] with the key cache's limits and metrics given.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn with_cache(
        topic_arn: impl Into<String>,
        max_age: Duration,
        source: CertSource,
        cache: CertCacheSettings,
        metrics: Arc<CertMetrics>,
    ) -> Result<Self, reqwest::Error> {
        let topic_arn = topic_arn.into();
        // arn:aws:sns:<region>:<account>:<name>
        let region = topic_arn.split(':').nth(3).map(str::to_owned);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Verifier {
            inner: Arc::new(VerifierInner {
                topic_arn,
                max_age,
                source,
                http,
                region,
                keys: KeyCache::new(cache, metrics),
            }),
        })
    }

    /// Checks `message`; see the module docs for the rules.
    ///
    /// # Errors
    /// [`VerifyError`] naming the first rule broken.
    pub async fn verify(&self, message: &SnsEnvelope) -> Result<(), VerifyError> {
        if message.topic_arn != self.inner.topic_arn {
            return Err(VerifyError::WrongTopic);
        }
        let hash = match message.signature_version.as_deref() {
            Some("1") => Hash::Sha1,
            Some("2") => Hash::Sha256,
            other => return Err(VerifyError::UnsupportedVersion(other.map(str::to_owned))),
        };
        self.check_timestamp(&message.timestamp)?;
        let cert_url = message
            .signing_cert_url
            .as_deref()
            .ok_or(VerifyError::MissingField("SigningCertURL"))?;
        let fetch_from = match &self.inner.source {
            CertSource::Aws => {
                check_cert_url(cert_url)?;
                self.check_cert_region(cert_url)?;
                cert_url.to_owned()
            }
            CertSource::Mirror { base, .. } => {
                let path = check_mirrored_cert_url(cert_url)?;
                format!("{}{path}", base.base())
            }
        };
        let signature = message
            .signature
            .as_deref()
            .ok_or(VerifyError::MissingField("Signature"))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| VerifyError::BadSignature)?;
        let signature =
            Signature::try_from(signature.as_slice()).map_err(|_| VerifyError::BadSignature)?;
        let text = string_to_sign(message)?;
        let key = self.key(&fetch_from).await?;
        let verified = match hash {
            Hash::Sha1 => {
                VerifyingKey::<sha1::Sha1>::new((*key).clone()).verify(text.as_bytes(), &signature)
            }
            Hash::Sha256 => VerifyingKey::<sha2::Sha256>::new((*key).clone())
                .verify(text.as_bytes(), &signature),
        };
        verified.map_err(|_| VerifyError::BadSignature)
    }

    fn check_timestamp(&self, timestamp: &str) -> Result<(), VerifyError> {
        let stale = || VerifyError::Stale(timestamp.chars().take(40).collect());
        let at =
            time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339)
                .map_err(|_| stale())?;
        let age = time::OffsetDateTime::now_utc() - at;
        let window = time::Duration::try_from(self.inner.max_age).unwrap_or(time::Duration::HOUR);
        if age > window || age < -window {
            return Err(stale());
        }
        Ok(())
    }

    /// The certificate must be from the SNS host of the topic's own region.
    fn check_cert_region(&self, cert_url: &str) -> Result<(), VerifyError> {
        let Some(region) = &self.inner.region else {
            return Ok(());
        };
        let host = url::Url::parse(cert_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let expected = format!("sns.{region}.amazonaws.com");
        if host == expected || host == format!("{expected}.cn") {
            Ok(())
        } else {
            Err(VerifyError::CertUrl(format!(
                "host must be {expected}, the topic's region"
            )))
        }
    }

    async fn key(&self, cert_url: &str) -> Result<Arc<RsaPublicKey>, VerifyError> {
        let this = self.clone();
        let url = cert_url.to_owned();
        self.inner
            .keys
            .get(cert_url, move || async move {
                let pem = this.fetch(&url).await?;
                parse_key(&pem).map(Arc::new)
            })
            .await
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, VerifyError> {
        let fetch_err = |e: &dyn std::fmt::Display| VerifyError::CertFetch(e.to_string());
        let mut request = self.inner.http.get(url);
        if let CertSource::Mirror {
            sign_as: Some((credentials, region)),
            ..
        } = &self.inner.source
        {
            // The reason is cached and shared with every waiter (VerifyError is Clone): the
            // cause chain goes into its text.
            for (name, value) in sigv4_headers(url, credentials, region)
                .await
                .map_err(|e| fetch_err(&Chain(&e)))?
            {
                request = request.header(name, value);
            }
        }
        let mut response = request.send().await.map_err(|e| fetch_err(&e))?;
        if !response.status().is_success() {
            return Err(VerifyError::CertFetch(format!(
                "HTTP {}",
                response.status()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fetch_err(&e))? {
            if body.len() + chunk.len() > MAX_CERT_BYTES {
                return Err(VerifyError::CertFetch(format!(
                    "certificate over {MAX_CERT_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The RSA public key of a PEM certificate.
fn parse_key(pem: &[u8]) -> Result<RsaPublicKey, VerifyError> {
    let cert = Certificate::from_pem(pem).map_err(|e| VerifyError::BadCert(e.to_string()))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| VerifyError::BadCert(e.to_string()))?;
    RsaPublicKey::from_public_key_der(&spki).map_err(|e| VerifyError::BadCert(e.to_string()))
}

enum Hash {
    Sha1,
    Sha256,
}

/// Checks that a `SigningCertURL` can only name an SNS certificate.
///
/// # Errors
/// [`VerifyError::CertUrl`] saying which part is wrong.
pub fn check_cert_url(raw: &str) -> Result<(), VerifyError> {
    let refuse = |why: &str| Err(VerifyError::CertUrl(why.to_owned()));
    let url = url::Url::parse(raw).map_err(|e| VerifyError::CertUrl(format!("not a URL: {e}")))?;
    if url.scheme() != "https" {
        return refuse("scheme must be https");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("user info not allowed");
    }
    if url.port().is_some() {
        return refuse("port not allowed");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return refuse("query or fragment not allowed");
    }
    let Some(host) = url.host_str() else {
        return refuse("no host");
    };
    let region = host.strip_prefix("sns.").and_then(|rest| {
        rest.strip_suffix(".amazonaws.com")
            .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))
    });
    let region_ok = region.is_some_and(|r| {
        !r.is_empty()
            && r.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    if !region_ok {
        return refuse("host must be sns.<region>.amazonaws.com");
    }
    let path = url.path();
    let file_ok = path
        .strip_prefix("/SimpleNotificationService-")
        .and_then(|rest| rest.strip_suffix(".pem"))
        .is_some_and(|id| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !file_ok {
        return refuse("path must be /SimpleNotificationService-<id>.pem");
    }
    Ok(())
}

/// Checks the shape of a `SigningCertURL` whose certificate is fetched from a mirror, and returns
/// the path to fetch there: any host and an `http` or `https` scheme (the mirror is trusted, not
/// the host the URL names), no user info, query or fragment, and a path that names a `.pem` file.
///
/// # Errors
/// [`VerifyError::CertUrl`] saying which part is wrong.
pub(crate) fn check_mirrored_cert_url(raw: &str) -> Result<String, VerifyError> {
    let refuse = |why: &str| Err(VerifyError::CertUrl(why.to_owned()));
    let url = url::Url::parse(raw).map_err(|e| VerifyError::CertUrl(format!("not a URL: {e}")))?;
    if !(url.scheme() == "https" || url.scheme() == "http") {
        return refuse("scheme must be http or https");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("user info not allowed");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return refuse("query or fragment not allowed");
    }
    let path = url.path();
    let file_ok = path.rsplit('/').next().is_some_and(|file| {
        file.len() > ".pem".len()
            && file.ends_with(".pem")
            && file
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    });
    if !file_ok {
        return refuse("path must name a .pem file");
    }
    Ok(path.to_owned())
}

/// The string SNS signs, for this message's type.
///
/// # Errors
/// [`VerifyError::MissingField`] when a field the type requires is absent.
pub fn string_to_sign(message: &SnsEnvelope) -> Result<String, VerifyError> {
    let mut out = String::with_capacity(message.message.len() + 256);
    let mut field = |name: &str, value: &str| {
        out.push_str(name);
        out.push('\n');
        out.push_str(value);
        out.push('\n');
    };
    match message.kind.as_str() {
        "Notification" => {
            field("Message", &message.message);
            field("MessageId", &message.message_id);
            if let Some(subject) = &message.subject {
                field("Subject", subject);
            }
            field("Timestamp", &message.timestamp);
            field("TopicArn", &message.topic_arn);
            field("Type", &message.kind);
        }
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
            let subscribe_url = message
                .subscribe_url
                .as_deref()
                .ok_or(VerifyError::MissingField("SubscribeURL"))?;
            let token = message
                .token
                .as_deref()
                .ok_or(VerifyError::MissingField("Token"))?;
            field("Message", &message.message);
            field("MessageId", &message.message_id);
            field("SubscribeURL", subscribe_url);
            field("Timestamp", &message.timestamp);
            field("Token", token);
            field("TopicArn", &message.topic_arn);
            field("Type", &message.kind);
        }
        _ => return Err(VerifyError::MissingField("Type")),
    }
    Ok(out)
}

/// Why a certificate request could not be signed as an SNS call.
#[derive(Debug, thiserror::Error)]
enum SigningError {
    #[error("no AWS credentials to sign the certificate request with")]
    Credentials(#[from] aws_credential_types::provider::error::CredentialsError),
    #[error("bad signing parameters")]
    Params(#[from] aws_sigv4::sign::v4::signing_params::BuildError),
    #[error("signing the certificate request failed")]
    Sign(#[from] aws_sigv4::http_request::SigningError),
}

/// SigV4 headers for a GET of `url` as an SNS call (how an emulator recognizes the request).
async fn sigv4_headers(
    url: &str,
    credentials: &SharedCredentialsProvider,
    region: &str,
) -> Result<Vec<(String, String)>, SigningError> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;

    let credentials = credentials.provide_credentials().await?;
    let identity = credentials.into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sns")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()?
        .into();
    let request = SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(&[]))?;
    let (instructions, _signature) = sign(request, &params)?.into_parts();
    let (headers, _query) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| (h.name().to_owned(), h.value().to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sns_certificate_urls_pass() {
        for good in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        ] {
            check_cert_url(good).unwrap();
        }
        for bad in [
            "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-abc.pem",
            "https://evil.com/SimpleNotificationService-abc.pem",
            "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-abc.pem",
            "https://user:pw@sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem?x=1",
            "https://sns.us-east-1.amazonaws.com/other.pem",
            "https://sns.us-east-1.amazonaws.com/a/SimpleNotificationService-abc.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-../x.pem",
            "https://sns..amazonaws.com/SimpleNotificationService-abc.pem",
            "not a url",
        ] {
            assert!(check_cert_url(bad).is_err(), "{bad} passed");
        }
    }

    #[tokio::test]
    async fn a_certificate_of_another_region_is_refused_before_any_fetch() {
        let metrics = Arc::new(CertMetrics::default());
        let verifier = Verifier::with_cache(
            "arn:aws:sns:us-east-1:123456789012:chorus",
            Duration::from_secs(3600),
            CertSource::Aws,
            CertCacheSettings::default(),
            Arc::clone(&metrics),
        )
        .unwrap();
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let message: SnsEnvelope = serde_json::from_value(serde_json::json!({
            "Type": "Notification",
            "MessageId": "m",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:chorus",
            "Message": "{}",
            "Timestamp": timestamp,
            "SignatureVersion": "2",
            "Signature": "AAAA",
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        }))
        .unwrap();
        let refused = verifier.verify(&message).await.unwrap_err();
        assert!(matches!(refused, VerifyError::CertUrl(_)), "{refused}");
        assert_eq!(metrics.fetched.get() + metrics.failed.get(), 0, "no fetch");
    }

    #[test]
    fn mirrored_certificate_urls_keep_their_path_whatever_the_host() {
        for (url, path) in [
            (
                "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
                "/SimpleNotificationService-abc.pem",
            ),
            (
                "http://127.0.0.1:4566/_aws/sns/SimpleNotificationService-6c6f63616c.pem",
                "/_aws/sns/SimpleNotificationService-6c6f63616c.pem",
            ),
            (
                "http://localhost.localstack.cloud:4566/a/b/c.pem",
                "/a/b/c.pem",
            ),
        ] {
            assert_eq!(check_mirrored_cert_url(url).unwrap(), path);
        }
        for bad in [
            "ftp://127.0.0.1/cert.pem",
            "file:///etc/ssl/cert.pem",
            "http://user:pw@127.0.0.1/cert.pem",
            "http://127.0.0.1/cert.pem?x=1",
            "http://127.0.0.1/cert.pem#x",
            "http://127.0.0.1/cert.txt",
            "http://127.0.0.1/.pem",
            "http://127.0.0.1/",
            "not a url",
        ] {
            assert!(check_mirrored_cert_url(bad).is_err(), "{bad} passed");
        }
    }
}
