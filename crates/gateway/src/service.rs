//! The gateway as a system service: what `main` adds around an [`App`] and nothing else needs.
//! Its external effects on AWS ([`deps`]), the janitor ([`prune_subscriptions`]), and [`run`]:
//! systemd notifications (ready, stopping, the watchdog) and `/metrics` on a second address.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_service::service_auth::{Grant, ServiceKeys, TokenSource};

use crate::bus::{CertSource, SnsSubscriptions, prune_dead_subscriptions};
use crate::writer_client::WriterClient;
use crate::{App, Deps, GatewayError, Phase, Settings};

/// How long a service token for the writers lives.
const WRITER_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// The gateway's effects on AWS and the writers, from `settings` and the SDK configuration.
///
/// # Errors
/// [`GatewayError`] when the writers' service key cannot be read or the writer client built.
pub fn deps(settings: &Settings, aws: &aws_config::SdkConfig) -> Result<Deps, GatewayError> {
    let writer_keys =
        ServiceKeys::from_files(&settings.writer.key_files).map_err(GatewayError::WriterKeys)?;
    let caller = settings
        .gateway_id
        .clone()
        .unwrap_or_else(|| "gateway".to_owned());
    let writers = WriterClient::new(&settings.writer.urls, settings.writer.timeout)
        .map_err(GatewayError::WriterClient)?
        .with_auth(TokenSource::new(
            writer_keys,
            Grant::gateway(caller),
            WRITER_TOKEN_LIFETIME,
        ));
    Ok(Deps {
        log: Arc::new(writers),
        subscriptions: Arc::new(SnsSubscriptions::new(
            aws_sdk_sns::Client::new(aws),
            &settings.bus.topic_arn,
        )),
        sqs: Some(aws_sdk_sqs::Client::new(aws)),
        certs: match settings
            .bus
            .verify
            .as_ref()
            .and_then(|v| v.cert_mirror.as_ref())
        {
            None => CertSource::Aws,
            Some(base) => CertSource::Mirror {
                base: base.clone(),
                sign_as: aws.credentials_provider().map(|credentials| {
                    let region = aws
                        .region()
                        .map_or("us-east-1".to_owned(), |r| r.to_string());
                    (credentials, region)
                }),
            },
        },
    })
}

/// The janitor (`prune-subscriptions`): removes the topic's subscriptions of gateways that no
/// longer answer, then returns.
///
/// # Errors
/// When the topic's subscriptions cannot be listed.
pub async fn prune_subscriptions(
    aws: &aws_config::SdkConfig,
    topic_arn: &str,
) -> Result<(), GatewayError> {
    let sns = aws_sdk_sns::Client::new(aws);
    let removed = prune_dead_subscriptions(&sns, topic_arn).await?;
    tracing::info!(removed = removed.len(), "janitor done");
    Ok(())
}

/// Runs `app` as a service until `shutdown`: tells systemd when it is ready and when it stops,
/// pings systemd's watchdog, and serves `/metrics` on `metrics_listen` too, if given (the
/// settings' `metrics_listen`).
///
/// # Errors
/// [`GatewayError`] when the metrics address cannot be bound, or from [`App::run_until`].
pub async fn run(
    app: App,
    metrics_listen: Option<SocketAddr>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    chorus_service::systemd::spawn_watchdog();
    let stopped = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        tokio::spawn(chorus_service::metrics::serve(
            listener,
            app.metrics(),
            stopped.clone().cancelled_owned(),
        ));
    }
    let mut phases = app.phases();
    tokio::spawn(async move {
        while phases.changed().await.is_ok() {
            match *phases.borrow_and_update() {
                Phase::Starting => {}
                Phase::Ready => chorus_service::systemd::ready(),
                Phase::Draining => chorus_service::systemd::stopping(),
            }
        }
    });
    let result = app.run_until(shutdown).await;
    stopped.cancel();
    result
}
