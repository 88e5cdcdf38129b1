//! Role `serve-gateway`: the real gateway (`chorus_gateway::App`) on `127.0.0.1:0`, with no
//! writer and no SNS: a message log that is always empty (every room's head is 0, so a room's
//! first bus message is seq 1) and a subscription that is confirmed at once. SNS verification
//! is off, so the load generator posts plain SNS envelopes to `/sns`, and clients name
//! themselves with `?user=`.

use std::sync::Arc;
use std::time::Duration;

use chorus_gateway::bus::CertSource;
use chorus_gateway::test_support::ConfirmedAtOnce;
use chorus_gateway::writer_client::{LogError, MessageLog};
use chorus_gateway::{App, Deps, Settings};
use chorus_protocol::api::{HistoryPage, SendRequest, SendResponse};
use chorus_protocol::{RoomId, Seq};

/// The topic the bench's gateways accept notifications of.
pub(crate) const TOPIC_ARN: &str = "arn:aws:sns:us-east-1:000000000000:chorus-gateway-bench";

/// No stored messages: rooms start at head 0; sends are refused (the bench makes none).
struct EmptyLog;

#[async_trait::async_trait]
impl MessageLog for EmptyLog {
    async fn append(&self, _: &RoomId, _: &SendRequest) -> Result<SendResponse, LogError> {
        Err(LogError::Refused {
            status: 501,
            message: "the gateway bench has no writer".into(),
        })
    }

    async fn history(&self, _: &RoomId, _: Seq, _: u32) -> Result<HistoryPage, LogError> {
        Ok(HistoryPage {
            head: Seq(0),
            messages: Vec::new(),
        })
    }

    async fn scrollback(
        &self,
        room: &RoomId,
        _: Option<Seq>,
        limit: u32,
    ) -> Result<HistoryPage, LogError> {
        self.history(room, Seq(0), limit).await
    }
}

/// Serves until stdin closes; prints `ready <addr>` once `/readyz` answers 200.
pub(crate) async fn serve() -> anyhow::Result<()> {
    // Errors only (`CHORUS_LOG` or `RUST_LOG` may say otherwise): the warnings about the
    // insecure settings would repeat for every process.
    chorus_service::init_tracing(&chorus_service::LogArgs {
        log_format: chorus_service::LogFormat::Text,
        log: std::env::var("CHORUS_LOG").unwrap_or_else(|_| "error".into()),
    })?;
    let mut settings = Settings::new(TOPIC_ARN, "http://127.0.0.1:9".parse()?);
    settings.listen = "127.0.0.1:0".parse()?;
    settings.bus.verify = None;
    settings.auth.dev_users = true;
    settings.drain_timeout = Duration::from_secs(1);
    let deps = Deps {
        log: Arc::new(EmptyLog),
        subscriptions: Arc::new(ConfirmedAtOnce {
            subscription_arn: format!("{TOPIC_ARN}:bench-subscription"),
        }),
        certs: CertSource::Aws,
        sqs: None,
    };
    let app = App::build(settings, deps).await?;
    let addr = app.local_addr()?;
    let gateway = tokio::spawn(app.run_until(crate::stdin_closed()));
    let readyz = format!("http://{addr}/readyz");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            crate::say(&format!("ready {addr}"));
            gateway.await??;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the gateway did not become ready within 5 s")
}
