//! Golden round trips: each fixture parses into its type and serializes back to the same JSON.
//! A failing test here means the wire format changed: update the fixture only on purpose, and the
//! README's protocol section with it.

use chorus_protocol::api::{ApiError, HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{BusPayload, ClientFrame, ServerFrame, StoredBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(fixture: &[u8]) -> T {
    let expected: serde_json::Value = serde_json::from_slice(fixture).expect("fixture is JSON");
    let parsed: T = serde_json::from_slice(fixture).expect("fixture parses");
    let written = serde_json::to_value(&parsed).expect("serializes");
    assert_eq!(written, expected, "round trip changed {parsed:?}");
    parsed
}

macro_rules! golden {
    ($test:ident, $ty:ty, $file:literal) => {
        #[test]
        fn $test() {
            round_trip::<$ty>(include_bytes!(concat!("fixtures/", $file)));
        }
    };
}

golden!(client_join, ClientFrame, "client_join.json");
golden!(client_join_since, ClientFrame, "client_join_since.json");
golden!(client_leave, ClientFrame, "client_leave.json");
golden!(client_send, ClientFrame, "client_send.json");
golden!(client_history, ClientFrame, "client_history.json");
golden!(
    client_history_newest,
    ClientFrame,
    "client_history_newest.json"
);
golden!(server_joined, ServerFrame, "server_joined.json");
golden!(server_history, ServerFrame, "server_history.json");
golden!(server_left, ServerFrame, "server_left.json");
golden!(server_message, ServerFrame, "server_message.json");
golden!(server_ack, ServerFrame, "server_ack.json");
golden!(server_error, ServerFrame, "server_error.json");
golden!(server_error_no_ref, ServerFrame, "server_error_no_ref.json");
golden!(
    server_error_history_expired,
    ServerFrame,
    "server_error_history_expired.json"
);
golden!(api_send_request, SendRequest, "api_send_request.json");
golden!(api_send_response, SendResponse, "api_send_response.json");
golden!(api_history_page, HistoryPage, "api_history_page.json");
golden!(api_error, ApiError, "api_error.json");
golden!(bus_payload, BusPayload, "bus_payload.json");
golden!(stored_batch, StoredBatch, "stored_batch.json");

#[test]
fn client_frames_parse_through_the_validating_entry_point() {
    for fixture in [
        &include_bytes!("fixtures/client_join.json")[..],
        include_bytes!("fixtures/client_join_since.json"),
        include_bytes!("fixtures/client_leave.json"),
        include_bytes!("fixtures/client_send.json"),
        include_bytes!("fixtures/client_history.json"),
        include_bytes!("fixtures/client_history_newest.json"),
    ] {
        let text = std::str::from_utf8(fixture).unwrap();
        ClientFrame::parse(text).expect("fixture is a valid client frame");
    }
}

#[test]
fn bus_payload_refuses_other_versions() {
    let err = BusPayload::parse(r#"{"v":2,"events":[]}"#).unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
    assert!(BusPayload::parse(include_str!("fixtures/bus_payload.json")).is_ok());
}
