//! SNS envelopes: parsing, the string to sign and the certificate URL check never panic.
#![no_main]

use chorus_gateway::bus::SnsEnvelope;
use chorus_gateway::bus::{check_cert_url, string_to_sign};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = serde_json::from_slice::<SnsEnvelope>(data) {
        let _ = string_to_sign(&envelope);
        if let Some(url) = &envelope.signing_cert_url {
            let _ = check_cert_url(url);
        }
        let _ = chorus_protocol::BusPayload::parse(&envelope.message);
    }
});
