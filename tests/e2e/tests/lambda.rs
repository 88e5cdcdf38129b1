//! The publisher's Lambda entry point, for real: this test serves the Lambda Runtime API on
//! loopback, runs the built `chorus-publisher` binary against it with an event made of real
//! emulator stream records (with `eventSourceARN`, as Lambda adds it), and checks the response
//! body and what reached SNS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::dynamodb::Event;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use chorus_e2e::Service;
use chorus_protocol::{Body, BusPayload, ClientMsgId, RoomId, UserId};
use chorus_publisher::poller::to_lambda_record;
use chorus_testkit::emulator::aws;
use chorus_writer::store::{
    DynamoStore, DynamoTable, MessageStore as _, NewMessage, Settings, ensure_table,
};
use tokio::sync::{mpsc, oneshot};

/// A one-invocation Lambda Runtime API.
#[derive(Clone)]
struct RuntimeApi {
    event: Arc<Mutex<Option<String>>>,
    results: mpsc::UnboundedSender<(String, String)>,
}

async fn next(State(api): State<RuntimeApi>) -> (HeaderMap, String) {
    let event = api.event.lock().unwrap().take();
    let Some(event) = event else {
        // Later polls wait, as Lambda's do, until the test ends.
        std::future::pending::<()>().await;
        unreachable!()
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "lambda-runtime-aws-request-id",
        HeaderValue::from_static("req-1"),
    );
    headers.insert(
        "lambda-runtime-deadline-ms",
        HeaderValue::from_static("4102444800000"),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:123456789012:function:chorus-publisher"),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        HeaderValue::from_static("Root=1-00000000-000000000000000000000000"),
    );
    (headers, event)
}

async fn respond(
    State(api): State<RuntimeApi>,
    Path((id, kind)): Path<(String, String)>,
    body: Bytes,
) -> StatusCode {
    let _ = api.results.send((
        format!("{id}/{kind}"),
        String::from_utf8_lossy(&body).into_owned(),
    ));
    StatusCode::ACCEPTED
}

/// An HTTP subscriber of `topic_arn` that records notification bodies, subscribed and confirmed
/// (emulators that send a SubscriptionConfirmation, like LocalStack, get it confirmed with its
/// token; moto confirms at once).
async fn sns_sink(sns: &aws_sdk_sns::Client, topic_arn: &str) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let confirming = (sns.clone(), topic_arn.to_owned());
    let app = Router::new().route(
        "/sns",
        post(move |body: Bytes| {
            let (tx, (sns, topic_arn)) = (tx.clone(), confirming.clone());
            async move {
                let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
                match envelope["Type"].as_str() {
                    Some("Notification") => {
                        let _ = tx.send(envelope["Message"].as_str().unwrap().to_owned());
                    }
                    Some("SubscriptionConfirmation") => {
                        let token = envelope["Token"].as_str().unwrap().to_owned();
                        tokio::spawn(async move {
                            sns.confirm_subscription()
                                .topic_arn(topic_arn)
                                .token(token)
                                .send()
                                .await
                                .expect("ConfirmSubscription");
                        });
                    }
                    _ => {}
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/sns", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let subscription = sns
        .subscribe()
        .topic_arn(topic_arn)
        .protocol("http")
        .endpoint(&url)
        .return_subscription_arn(true)
        .send()
        .await
        .unwrap()
        .subscription_arn
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attributes = sns
            .get_subscription_attributes()
            .subscription_arn(&subscription)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap_or_default();
        if attributes.get("PendingConfirmation").map(String::as_str) != Some("true") {
            return rx;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink's subscription was not confirmed within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes three messages through the real store and returns the stream records as a Lambda event.
async fn stream_event(aws: &aws_config::SdkConfig, table: &str) -> (Event, Vec<String>) {
    let stream_arn = ensure_table(&aws_sdk_dynamodb::Client::new(aws), table)
        .await
        .unwrap();
    let store = DynamoStore::new(
        DynamoTable::new(aws_sdk_dynamodb::Client::new(aws), table),
        Settings::default(),
    );
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        store
            .append(NewMessage {
                room: RoomId::parse("lobby").unwrap(),
                id: ClientMsgId::parse(format!("m{i}")).unwrap(),
                sender: UserId::parse("john").unwrap(),
                body: Body::parse(*body).unwrap(),
            })
            .await
            .unwrap();
    }
    let streams = aws_sdk_dynamodbstreams::Client::new(aws);
    let shard = streams
        .describe_stream()
        .stream_arn(&stream_arn)
        .send()
        .await
        .unwrap()
        .stream_description
        .unwrap()
        .shards
        .unwrap()
        .remove(0)
        .shard_id
        .unwrap();
    let iterator = streams
        .get_shard_iterator()
        .stream_arn(&stream_arn)
        .shard_id(shard)
        .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap();
    let records = streams
        .get_records()
        .shard_iterator(iterator)
        .send()
        .await
        .unwrap()
        .records
        .unwrap();
    let mut event = Event::default();
    event.records = records
        .iter()
        .map(|r| to_lambda_record(r, &stream_arn))
        .collect();
    let message_seqs = event
        .records
        .iter()
        .filter(|r| matches!(r.change.keys.get("room"), Some(serde_dynamo::AttributeValue::S(room)) if room == "lobby"))
        // Not the room's marker (sort key 0), which the publisher skips.
        .filter(|r| !matches!(r.change.keys.get("seq"), Some(serde_dynamo::AttributeValue::N(seq)) if seq == "0"))
        .filter_map(|r| r.change.sequence_number.clone())
        .collect();
    (event, message_seqs)
}

/// Runs the publisher binary as Lambda would for one invocation and returns the response body.
async fn invoke(event: &Event, topic_arn: &str) -> (String, String) {
    let (results, mut results_rx) = mpsc::unbounded_channel();
    let api = RuntimeApi {
        event: Arc::new(Mutex::new(Some(serde_json::to_string(event).unwrap()))),
        results,
    };
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(respond))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_api = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    let mut lambda = Service::start_unlistening(
        "lambda",
        "chorus-publisher",
        &[],
        &[
            ("AWS_LAMBDA_RUNTIME_API", &runtime_api),
            ("AWS_LAMBDA_FUNCTION_NAME", "chorus-publisher"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("CHORUS_TOPIC_ARN", topic_arn),
        ],
    )
    .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), results_rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no response from the function; log:\n{}", lambda.log()))
        .unwrap();
    lambda.kill();
    let _ = stop.send(());
    result
}

#[tokio::test]
async fn the_lambda_binary_publishes_a_real_stream_batch_and_reports_success() {
    let aws = aws().await;
    let name = format!(
        "lambda-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let (event, _) = stream_event(&aws, &name).await;
    assert!(event.records.iter().all(|r| {
        r.event_source_arn
            .as_deref()
            .is_some_and(|a| a.contains("/stream/"))
    }));
    let sns = aws_sdk_sns::Client::new(&aws);
    let topic_arn = chorus_publisher::sns::ensure_topic(&sns, &name)
        .await
        .unwrap();
    let mut published = sns_sink(&sns, &topic_arn).await;

    let (path, body) = invoke(&event, &topic_arn).await;
    assert_eq!(path, "req-1/response");
    let response: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(response, serde_json::json!({"batchItemFailures": []}));

    let message = tokio::time::timeout(Duration::from_secs(5), published.recv())
        .await
        .unwrap()
        .unwrap();
    let payload = BusPayload::parse(&message).unwrap();
    let bodies: Vec<(u64, &str)> = payload
        .events
        .iter()
        .map(|e| (e.seq.0, e.body.as_str()))
        .collect();
    assert_eq!(
        bodies,
        [(1, "one"), (2, "two"), (3, "three")],
        "one packed message, bookkeeping left out"
    );
    assert!(published.try_recv().is_err(), "exactly one SNS message");
}

#[tokio::test]
async fn a_batch_whose_publish_fails_is_reported_from_its_first_message_record() {
    let aws = aws().await;
    let name = format!(
        "lambda-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let (event, message_seqs) = stream_event(&aws, &name).await;
    let missing_topic = "arn:aws:sns:us-east-1:123456789012:no-such-topic";
    let (path, body) = invoke(&event, missing_topic).await;
    assert_eq!(
        path, "req-1/response",
        "a failed publish is a partial batch response, not a function error"
    );
    let response: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": message_seqs[0]}]})
    );
}
