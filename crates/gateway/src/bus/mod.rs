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
pub use self::subscription::{Endpoint, SnsSubscriptions, SubscriptionState, TopicSubscriptions};
pub use self::verify::{CertSource, Verifier, VerifyError, check_cert_url, string_to_sign};

/// Why a call about the bus (SNS, SQS) failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// An AWS call failed; the SDK's error, with its causes, is the source.
    #[error("{call} failed")]
    Aws {
        call: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An AWS call answered without something it always sends.
    #[error("{call} returned no {missing}")]
    Missing {
        call: &'static str,
        missing: &'static str,
    },
    /// No subscription was confirmed in the attempts allowed.
    #[error(
        "the subscription of {endpoint} was not confirmed in {attempts} attempts of \
         {timeout:?}{}: check that SNS reaches the endpoint and that its messages verify (with an \
         emulator: --sns-cert-mirror)",
        refused_because(refused.as_deref())
    )]
    NotConfirmed {
        endpoint: String,
        attempts: u32,
        timeout: std::time::Duration,
        /// Why the last SubscriptionConfirmation was refused, if one was.
        refused: Option<String>,
    },
    /// The janitor's HTTP client could not be built.
    #[error("building the HTTP client")]
    HttpClient(#[source] reqwest::Error),
}

fn refused_because(why: Option<&str>) -> String {
    why.map(|why| format!(" (the last SubscriptionConfirmation was refused: {why})"))
        .unwrap_or_default()
}

/// Turns an AWS SDK error into a [`BusError`] naming the call, the SDK's error as its source.
pub(crate) fn aws_error<E: std::error::Error + Send + Sync + 'static>(
    call: &'static str,
) -> impl FnOnce(E) -> BusError {
    move |e| BusError::Aws {
        call,
        source: Box::new(e),
    }
}
