//! The payload of one SNS message from the publisher to every gateway: a packed list of message
//! events, in per-room seq order. A single message is a list of one.

use serde::{Deserialize, Serialize};

use crate::message::MessageEvent;

/// Payload version this crate writes and reads.
pub const BUS_PAYLOAD_VERSION: u32 = 1;

/// `{"v":1,"events":[…]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusPayload {
    pub v: u32,
    pub events: Vec<MessageEvent>,
}

/// Why an SNS message body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BusPayloadError {
    #[error("payload is not a valid bus payload: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "payload version {0} is not supported (this build reads version {BUS_PAYLOAD_VERSION})"
    )]
    Version(u32),
}

impl BusPayload {
    /// A version-1 payload.
    pub fn new(events: Vec<MessageEvent>) -> Self {
        BusPayload {
            v: BUS_PAYLOAD_VERSION,
            events,
        }
    }

    /// Parses and version-checks an SNS `Message` string.
    ///
    /// # Errors
    /// [`BusPayloadError`] for bad JSON, invalid events or another version.
    pub fn parse(text: &str) -> Result<Self, BusPayloadError> {
        let payload: BusPayload = serde_json::from_str(text)?;
        if payload.v != BUS_PAYLOAD_VERSION {
            return Err(BusPayloadError::Version(payload.v));
        }
        Ok(payload)
    }

    /// The payload as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("bus payloads always serialize")
    }
}
