//! Properties of the protocol's parsers: any input is either a valid frame or a typed error (never
//! a panic), valid frames survive serialize → parse, and the validated newtypes hold their limits
//! exactly.

use chorus_protocol::frames::FrameError;
use chorus_protocol::{Body, BusPayload, ClientFrame, ClientMsgId, PageLimit, RoomId, Seq};
use proptest::prelude::*;

fn room() -> impl Strategy<Value = RoomId> {
    "[A-Za-z0-9_.:-]{1,128}".prop_map(|s| RoomId::parse(s).unwrap())
}

fn msg_id() -> impl Strategy<Value = ClientMsgId> {
    "[A-Za-z0-9_.:-]{1,64}".prop_map(|s| ClientMsgId::parse(s).unwrap())
}

fn body() -> impl Strategy<Value = Body> {
    // Any Unicode, including quotes, backslashes and control characters.
    any::<String>()
        .prop_filter("non-empty", |s| !s.is_empty())
        .prop_map(|s| Body::parse(s).unwrap())
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (room(), proptest::option::of(any::<u64>())).prop_map(|(room, since)| ClientFrame::Join {
            room,
            since: since.map(Seq)
        }),
        room().prop_map(|room| ClientFrame::Leave { room }),
        (room(), msg_id(), body()).prop_map(|(room, id, body)| ClientFrame::Send {
            room,
            id,
            body
        }),
        (
            room(),
            msg_id(),
            proptest::option::of(any::<u64>()),
            1..=PageLimit::MAX
        )
            .prop_map(|(room, id, before, limit)| ClientFrame::History {
                room,
                id,
                before: before.map(Seq),
                limit: PageLimit::new(limit).unwrap(),
            }),
    ]
}

/// JSON objects that look like frames, with fields of any type.
fn frame_like_json() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        any::<String>().prop_map(serde_json::Value::from),
        "[a-z#  .:-]{0,140}".prop_map(serde_json::Value::from),
    ];
    let kind = prop_oneof![
        Just("join".to_owned()),
        Just("leave".to_owned()),
        Just("send".to_owned()),
        Just("history".to_owned()),
        any::<String>()
    ];
    (
        kind,
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("room"),
                    Just("id"),
                    Just("body"),
                    Just("since"),
                    Just("before"),
                    Just("limit")
                ],
                value,
            ),
            0..4,
        ),
    )
        .prop_map(|(kind, fields)| {
            let mut object = serde_json::Map::new();
            object.insert("type".into(), kind.into());
            for (name, value) in fields {
                object.insert(name.to_owned(), value);
            }
            serde_json::Value::Object(object).to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_a_frame_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        match ClientFrame::parse(&text) {
            Ok(frame) => {
                // Whatever parsed re-serializes and parses to itself.
                let again = ClientFrame::parse(&serde_json::to_string(&frame).unwrap()).unwrap();
                prop_assert_eq!(again, frame);
            }
            Err(rejected) => prop_assert!(!rejected.error.to_string().is_empty()),
        }
    }

    #[test]
    fn frame_like_objects_parse_only_when_every_field_is_valid(text in frame_like_json()) {
        match ClientFrame::parse(&text) {
            Ok(ClientFrame::Send { room, id, body }) => {
                prop_assert!(RoomId::parse(room.as_str()).is_ok());
                prop_assert!(ClientMsgId::parse(id.as_str()).is_ok());
                prop_assert!(Body::parse(body.as_str()).is_ok());
            }
            Ok(ClientFrame::Join { room, .. } | ClientFrame::Leave { room }) => {
                prop_assert!(RoomId::parse(room.as_str()).is_ok());
            }
            Ok(ClientFrame::History { room, id, limit, .. }) => {
                prop_assert!(RoomId::parse(room.as_str()).is_ok());
                prop_assert!(ClientMsgId::parse(id.as_str()).is_ok());
                prop_assert!(PageLimit::new(limit.get()).is_ok());
            }
            Err(rejected) => {
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                let known = matches!(value["type"].as_str(), Some("join" | "leave" | "send" | "history"));
                prop_assert_eq!(matches!(rejected.error, FrameError::UnknownType(_)), !known);
            }
        }
    }

    #[test]
    fn valid_frames_round_trip(frame in client_frame()) {
        let text = serde_json::to_string(&frame).unwrap();
        prop_assert_eq!(ClientFrame::parse(&text).unwrap(), frame);
    }

    #[test]
    fn bus_payloads_never_panic(text in any::<String>()) {
        let _ = BusPayload::parse(&text);
    }

    #[test]
    fn room_ids_hold_exactly_1_to_128_characters(len in 0usize..300) {
        prop_assert_eq!(RoomId::parse("r".repeat(len)).is_ok(), (1..=128).contains(&len));
    }

    #[test]
    fn bodies_hold_exactly_1_to_16384_bytes(len in 0usize..20_000, wide in any::<bool>()) {
        // 'é' is two bytes: the limit is in bytes, not characters.
        let body = if wide { "é".repeat(len / 2) } else { "x".repeat(len) };
        prop_assert_eq!(Body::parse(body.clone()).is_ok(), (1..=Body::MAX_BYTES).contains(&body.len()));
    }
}
