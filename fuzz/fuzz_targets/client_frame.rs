//! Client frames: any text is a frame or a typed error, and a parsed frame round-trips.
#![no_main]

use chorus_protocol::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(frame) = ClientFrame::parse(&text) {
        let again = ClientFrame::parse(&serde_json::to_string(&frame).unwrap()).unwrap();
        assert_eq!(again, frame);
    }
});
