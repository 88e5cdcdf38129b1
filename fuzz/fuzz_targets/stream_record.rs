//! Stream records: whatever a record holds, the publisher classifies it without panicking.
#![no_main]

use aws_lambda_events::dynamodb::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<Event>(data) {
        for record in &event.records {
            let _ = chorus_publisher::classify(record);
        }
    }
});
