//! Role `serve-gateway`: the real gateway (`chorus_gateway::App`) on `127.0.0.1:0`, with no
//! writer and no SNS: a message log that stays empty (every room's head is 0, so a room's first
//! bus message is seq 1; the bench sends nothing) and a subscription that is confirmed at once.
//! SNS verification is off, so the load generator posts plain SNS envelopes to `/sns`, and
//! clients name themselves with `?user=`.

use std::sync::Arc;
use std::time::Duration;

use chorus_gateway::Deps;
use chorus_gateway::bus::CertSource;
use chorus_gateway::test_support::{ConfirmedAtOnce, MemoryLog};
use chorus_testkit::gateway::{Running, settings};

/// The topic the bench's gateways accept notifications of.
pub(crate) const TOPIC_ARN: &str = "arn:aws:sns:us-east-1:000000000000:chorus-gateway-bench";

/// Serves until stdin closes; prints `ready <addr>` once `/readyz` answers 200.
pub(crate) async fn serve() -> anyhow::Result<()> {
    // Errors only (`CHORUS_LOG` or `RUST_LOG` may say otherwise): the warnings about the
    // insecure settings would repeat for every process.
    chorus_service::init_tracing(&chorus_service::LogArgs {
        log_format: chorus_service::LogFormat::Text,
        log: std::env::var("CHORUS_LOG").unwrap_or_else(|_| "error".into()),
    })?;
    let mut settings = settings(TOPIC_ARN);
    settings.drain_timeout = Duration::from_secs(1);
    let deps = Deps {
        log: Arc::new(MemoryLog::default()),
        subscriptions: Arc::new(ConfirmedAtOnce {
            subscription_arn: format!("{TOPIC_ARN}:bench-subscription"),
        }),
        certs: CertSource::Aws,
        sqs: None,
    };
    let gateway = Running::start_until(settings, deps, crate::stdin_closed()).await?;
    gateway.ready().await?;
    crate::say(&format!("ready {}", gateway.addr));
    gateway.exited().await?;
    Ok(())
}
