//! The SNS HTTP(S) delivery envelope. SNS posts it with `Content-Type: text/plain`; the body is
//! read as bytes and parsed here, and checked by [`verify`](super::verify) before anything in it
//! is used.

use serde::Deserialize;

/// An SNS HTTP(S) delivery: Notification, SubscriptionConfirmation or UnsubscribeConfirmation.
/// Fields kept as the exact strings SNS sent (they are what a signature covers).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsEnvelope {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    pub message: String,
    pub timestamp: String,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default, rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    #[serde(default)]
    pub signature_version: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    #[serde(default, rename = "SigningCertURL")]
    pub signing_cert_url: Option<String>,
}
