//! The writer's HTTP API, end to end over a loopback socket, on the in-memory store.
//! (The DynamoDB store is tested against the emulator in tests/e2e.)

mod helpers;

use std::sync::Arc;
use std::time::Duration;

use chorus_protocol::api::{ApiError, HISTORY_EXPIRED, HistoryPage, SendResponse};
use chorus_writer::store::{ManualClock, MemoryStore, MemoryTable, Settings};
use helpers::{spawn_app, spawn_app_with};
use serde_json::json;

#[tokio::test]
async fn sends_get_dense_seqs_and_history_returns_them_in_order() {
    let app = spawn_app().await;
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let res = app
            .send(
                "lobby",
                json!({"id": id, "sender": "john", "body": format!("msg {i}")}),
            )
            .await;
        assert_eq!(res.status(), 201);
        let body: SendResponse = res.json().await.unwrap();
        assert_eq!(body.seq.0, i as u64 + 1);
        assert!(body.ts.ends_with('Z') && body.ts.len() == 24, "{}", body.ts);
    }
    let page: HistoryPage = app
        .get("/v1/rooms/lobby/messages?after=1&limit=10")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.head.0, 3);
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(page.messages[0].body.as_str(), "msg 1");
    assert_eq!(page.messages[0].sender.as_str(), "john");

    // Scrollback: the newest messages below `before`, oldest first.
    for (query, expected) in [
        ("before=3&limit=10", vec![1, 2]),
        ("before=4&limit=2", vec![2, 3]),
        ("before=1", vec![]),
        ("before=99&limit=1", vec![3]),
        // Both: forwards from after, stopping below before.
        ("after=1&before=3", vec![2]),
        ("after=0&before=1", vec![]),
        ("after=2&before=2", vec![]),
    ] {
        let page: HistoryPage = app
            .get(&format!("/v1/rooms/lobby/messages?{query}"))
            .await
            .json()
            .await
            .unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq.0).collect();
        assert_eq!((page.head.0, seqs), (3, expected), "{query}");
    }
}

#[tokio::test]
async fn a_retried_send_is_stored_once_with_the_same_seq() {
    let app = spawn_app().await;
    let msg = json!({"id": "m-1", "sender": "john", "body": "Hello world"});
    let first = app.send("lobby", msg.clone()).await;
    assert_eq!(first.status(), 201);
    let first: SendResponse = first.json().await.unwrap();
    let again = app.send("lobby", msg).await;
    assert_eq!(again.status(), 200);
    let again: SendResponse = again.json().await.unwrap();
    assert_eq!(first, again);
    let page: HistoryPage = app
        .get("/v1/rooms/lobby/messages")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
}

#[tokio::test]
async fn rooms_have_independent_sequences() {
    let app = spawn_app().await;
    app.send("a", json!({"id": "1", "sender": "x", "body": "hi"}))
        .await;
    let res: SendResponse = app
        .send("b", json!({"id": "1", "sender": "x", "body": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(res.seq.0, 1);
}

async fn assert_bad_request(res: reqwest::Response, code: &str, mentions: &str) {
    assert_eq!(res.status(), 400);
    let err: ApiError = res.json().await.unwrap();
    assert_eq!(err.error.code, code);
    assert!(
        err.error.message.contains(mentions),
        "{:?}",
        err.error.message
    );
}

#[tokio::test]
async fn invalid_input_gets_a_clear_400_and_stores_nothing() {
    let app = spawn_app().await;
    let ok = json!({"id": "m", "sender": "john", "body": "x"});
    assert_bad_request(
        app.send("bad%20room", ok.clone()).await,
        "invalid_room",
        "room must be",
    )
    .await;
    assert_bad_request(
        app.send("lobby", json!({"id": "m", "sender": "john", "body": ""}))
            .await,
        "invalid_body",
        "body must not be empty",
    )
    .await;
    assert_bad_request(
        app.send(
            "lobby",
            json!({"id": "m", "sender": "john", "body": "x".repeat(16 * 1024 + 1)}),
        )
        .await,
        "invalid_body",
        "limit is 16384 bytes",
    )
    .await;
    assert_bad_request(
        app.send("lobby", json!({"id": "m", "body": "x"})).await,
        "invalid_body",
        "sender",
    )
    .await;
    let not_json = app
        .http
        .post(format!("{}/v1/rooms/lobby/messages", app.base))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_bad_request(not_json, "invalid_body", "invalid send request").await;
    assert_bad_request(
        app.get("/v1/rooms/lobby/messages?after=-1").await,
        "invalid_after",
        "after",
    )
    .await;
    assert_bad_request(
        app.get("/v1/rooms/lobby/messages?before=0").await,
        "invalid_before",
        "before must be a whole number from 1",
    )
    .await;
    assert_bad_request(
        app.get("/v1/rooms/lobby/messages?limit=501").await,
        "invalid_limit",
        "500",
    )
    .await;

    let page: HistoryPage = app
        .get("/v1/rooms/lobby/messages")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.head.0, 0);
    assert!(page.messages.is_empty());
    // The store still works after all that.
    assert_eq!(app.send("lobby", ok).await.status(), 201);
}

#[tokio::test]
async fn oversized_requests_and_unknown_paths_are_refused() {
    let app = spawn_app().await;
    let huge = app
        .http
        .post(format!("{}/v1/rooms/lobby/messages", app.base))
        .body(vec![b'x'; 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    let missing = app.get("/v2/nothing").await;
    assert_eq!(missing.status(), 404);
    let err: ApiError = missing.json().await.unwrap();
    assert_eq!(err.error.code, "not_found");
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.send("lobby", json!({"id": "1", "sender": "x", "body": "hi"}))
        .await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("chorus_writer_sends_total{result=\"stored\"} 1"),
        "{text}"
    );
}

/// Every operation the OpenAPI document names is served (not the 404 fallback) and answers with a
/// status it documents; the served document is the one in the repo.
#[tokio::test]
async fn the_openapi_document_matches_what_is_served() {
    let app = spawn_app().await;
    let served: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    let in_repo: serde_json::Value = serde_json::from_str(chorus_writer::OPENAPI).unwrap();
    assert_eq!(served, in_repo);
    let paths = in_repo["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path.replace("{room}", "lobby");
        for method in ["get", "post"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            operations += 1;
            let res = match method {
                "get" => app.get(&concrete).await,
                _ => {
                    app.send("lobby", json!({"id": "oa", "sender": "x", "body": "hi"}))
                        .await
                }
            };
            let status = res.status().as_u16().to_string();
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&status),
                "{method} {path} answered {status}, not documented"
            );
        }
    }
    assert_eq!(operations, 5, "send, history, health, metrics, openapi");
    // Request schema field names are the protocol's.
    let required = &in_repo["components"]["schemas"]["SendRequest"]["required"];
    let fixture: serde_json::Value = serde_json::to_value(chorus_protocol::api::SendRequest {
        id: chorus_protocol::ClientMsgId::parse("a").unwrap(),
        sender: chorus_protocol::UserId::parse("b").unwrap(),
        body: chorus_protocol::Body::parse("c").unwrap(),
    })
    .unwrap();
    for field in required.as_array().unwrap() {
        assert!(
            fixture.get(field.as_str().unwrap()).is_some(),
            "{field} not in SendRequest"
        );
    }
}

#[tokio::test]
async fn history_past_retention_is_410_history_expired_naming_the_oldest_stored_seq() {
    let clock = ManualClock::at(1_796_000_000_000);
    let settings = Settings {
        retention: Duration::from_secs(3600),
        dedupe_window: Duration::from_secs(60),
        ..Settings::default()
    };
    let store = MemoryStore::with_clock(MemoryTable::default(), settings, clock.clone());
    let app = spawn_app_with(Arc::new(store)).await;
    for id in ["a", "b"] {
        app.send("lobby", json!({"id": id, "sender": "x", "body": "old"}))
            .await;
    }
    clock.advance(Duration::from_secs(1800));
    app.send("lobby", json!({"id": "c", "sender": "x", "body": "new"}))
        .await;
    clock.advance(Duration::from_secs(1801));

    let res = app.get("/v1/rooms/lobby/messages?after=0").await;
    assert_eq!(res.status(), 410);
    let err: ApiError = res.json().await.unwrap();
    assert_eq!(err.error.code, HISTORY_EXPIRED);
    assert!(
        err.error
            .message
            .contains("the oldest stored seq of room lobby is 3"),
        "{}",
        err.error.message
    );
    // From the oldest stored seq on, history is served; the head read still works.
    let page: HistoryPage = app
        .get("/v1/rooms/lobby/messages?after=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body.as_str(), "new");
    let head: HistoryPage = app
        .get("/v1/rooms/lobby/messages?after=0&limit=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(head.head.0, 3);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("chorus_writer_history_expired_total 1"),
        "{text}"
    );
    assert!(
        text.contains("chorus_writer_dynamodb_total{kind=\"items_written\"} 3"),
        "{text}"
    );
}

mod service_tokens {
    use chorus_service::service_auth::{CallerKind, Grant, Patterns, ServiceKeys};

    use super::*;
    use chorus_testkit::tokens::{bearer_client, hs256};

    use crate::helpers::keys;

    fn backend() -> Grant {
        Grant {
            sub: "billing".into(),
            kind: CallerKind::Backend,
            rooms: Patterns(vec!["orders-*".into()]),
            senders: Patterns(vec!["billing-bot".into()]),
        }
    }

    async fn error_code(res: reqwest::Response) -> String {
        res.json::<ApiError>().await.unwrap().error.code
    }

    async fn head(app: &helpers::TestApp, room: &str) -> u64 {
        let page: HistoryPage = app
            .get(&format!("/v1/rooms/{room}/messages"))
            .await
            .json()
            .await
            .unwrap();
        page.head.0
    }

    #[tokio::test]
    async fn a_call_without_a_valid_service_token_is_refused_and_changes_nothing() {
        let app = spawn_app().await;
        let url = format!("{}/v1/rooms/lobby/messages", app.base);
        let send = json!({"id": "m1", "sender": "mallory", "body": "forged"});
        let foreign =
            ServiceKeys::from_secrets(&[b"another key of at least thirty-two bytes".to_vec()])
                .unwrap()
                .mint(&Grant::gateway("impostor"), Duration::from_secs(60));
        for client in [
            reqwest::Client::new(),
            bearer_client("not-a-token"),
            bearer_client(&foreign),
        ] {
            let res = client.post(&url).json(&send).send().await.unwrap();
            assert_eq!(res.status(), 401);
            assert!(res.headers().contains_key("www-authenticate"));
            let body: ApiError = res.json().await.unwrap();
            assert_eq!(body.error.code, "unauthorized");
            assert!(
                !body.error.message.contains("Bearer ey"),
                "never echoes a token"
            );
            let res = client.get(&url).send().await.unwrap();
            assert_eq!(res.status(), 401, "history needs a token too");
        }
        assert_eq!(head(&app, "lobby").await, 0, "nothing was stored");
        let metrics = app.get("/metrics").await.text().await.unwrap();
        for line in [
            r#"chorus_writer_requests_refused_total{reason="missing"} 2"#,
            r#"chorus_writer_requests_refused_total{reason="malformed"} 2"#,
            r#"chorus_writer_requests_refused_total{reason="signature"} 2"#,
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
        // Health, metrics and the contract stay open.
        let anonymous = reqwest::Client::new();
        for path in ["/healthz", "/metrics", "/openapi.json"] {
            let res = anonymous
                .get(format!("{}{path}", app.base))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{path}");
        }
    }

    #[tokio::test]
    async fn a_backend_publishes_idempotently_only_to_its_rooms_and_as_its_senders() {
        let app = spawn_app().await;
        let billing = bearer_client(&keys().mint(&backend(), Duration::from_secs(600)));
        let post = |room: &str, sender: &str, id: &str| {
            billing
                .post(format!("{}/v1/rooms/{room}/messages", app.base))
                .json(&json!({"id": id, "sender": sender, "body": "order 42 shipped"}))
                .send()
        };
        let first = post("orders-42", "billing-bot", "o-1").await.unwrap();
        assert_eq!(first.status(), 201);
        let first: SendResponse = first.json().await.unwrap();
        let again = post("orders-42", "billing-bot", "o-1").await.unwrap();
        assert_eq!(
            again.status(),
            200,
            "a retry with the same id is stored once"
        );
        assert_eq!(again.json::<SendResponse>().await.unwrap().seq, first.seq);

        let room = post("lobby", "billing-bot", "o-2").await.unwrap();
        assert_eq!(room.status(), 403);
        assert_eq!(error_code(room).await, "forbidden_room");
        let sender = post("orders-42", "john", "o-3").await.unwrap();
        assert_eq!(sender.status(), 403);
        assert_eq!(error_code(sender).await, "forbidden_sender");
        assert_eq!(head(&app, "orders-42").await, 1);
        assert_eq!(head(&app, "lobby").await, 0);
        // It reads its own rooms' history, not others'.
        let own = billing
            .get(format!("{}/v1/rooms/orders-42/messages", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(own.status(), 200);
        let other = billing
            .get(format!("{}/v1/rooms/lobby/messages", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 403);
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_with_the_reason() {
        let app = spawn_app().await;
        let claims = json!({
            "iss": "chorus", "aud": "chorus-writer", "iat": 1, "exp": 2,
            "sub": "gateway-a", "kind": "gateway", "rooms": ["*"], "senders": ["*"],
        });
        let token = hs256(helpers::KEY, &claims);
        let res = bearer_client(&token)
            .get(format!("{}/v1/rooms/lobby/messages", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        assert!(
            res.json::<ApiError>()
                .await
                .unwrap()
                .error
                .message
                .contains("expired")
        );
    }
}
