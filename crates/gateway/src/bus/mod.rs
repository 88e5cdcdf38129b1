//! The gateway's side of the bus: how messages published to the SNS topic reach this gateway and
//! are let in.
//!
//! - `subscription`: the subscription lifecycle (subscribe and wait for confirmation, watch it,
//!   remove it on drain) and where it stands, for `/readyz`;
//! - `envelope`, `verify`, `certs`: an SNS delivery, and the check that it is a genuine
//!   message of the configured topic (signature, signing certificate, age);
//! - `inbox`: the one way in for messages, from `/sns` or from the SQS queue, and the one place
//!   where refused messages are counted;
//! - `sqs`: the SQS transport (`--bus sqs`), for gateways SNS cannot reach over HTTP;
//! - `janitor`: removing the subscriptions of gateways that died without draining.

pub(crate) mod certs;
pub(crate) mod envelope;
pub(crate) mod inbox;
pub(crate) mod janitor;
pub(crate) mod sqs;
pub(crate) mod subscription;
pub(crate) mod verify;

pub use self::envelope::SnsEnvelope;
pub use self::janitor::prune_dead_subscriptions;
pub use self::subscription::{
    ConfirmedAtOnce, Endpoint, SnsSubscriptions, SubscriptionState, TopicSubscriptions,
};
pub use self::verify::{CertSource, Verifier, VerifyError, check_cert_url, string_to_sign};

/// Why a subscription call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BusError(pub String);

/// Turns an AWS SDK error into a [`BusError`] naming the call, with the whole cause chain in
/// words (an SDK error's own text is only "service error").
pub(crate) fn aws_error<E: std::error::Error + 'static>(
    call: &'static str,
) -> impl FnOnce(E) -> BusError {
    move |e| {
        BusError(format!(
            "{call}: {}",
            aws_sdk_sns::error::DisplayErrorContext(&e)
        ))
    }
}
