//! What every Chorus service binary shares at its edge: logging set-up, the shutdown signal,
//! Prometheus text exposition and AWS configuration. Nothing here knows about chat.

pub mod http;
pub mod metrics;
pub mod service_auth;
pub mod systemd;

use std::future::Future;

use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for production log pipelines.
    Json,
}

/// Log options every service binary accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: `text` for terminals, `json` for production.
    #[arg(
        long,
        global = true,
        env = "CHORUS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (e.g. `info,chorus_gateway=debug`); `RUST_LOG` also works.
    #[arg(long, global = true, env = "CHORUS_LOG", default_value = "info")]
    pub log: String,
}

/// Installs the global `tracing` subscriber. Logs go to stderr.
///
/// # Errors
/// When the filter does not parse or a subscriber is already installed.
pub fn init_tracing(args: &LogArgs) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env)?,
        _ => EnvFilter::try_new(&args.log)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM (systemd stop, Auto Scaling termination).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received: shutting down"),
        () = terminate => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Loads the AWS SDK configuration once, from the environment: region, credentials, and endpoint
/// overrides (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`) for an emulator.
pub async fn load_aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

/// Runs `fut` to completion, or logs a warning and gives up when `grace` passes first.
pub async fn with_grace<F: Future<Output = ()>>(what: &str, grace: std::time::Duration, fut: F) {
    if tokio::time::timeout(grace, fut).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "{what} did not finish within the grace period"
        );
    }
}
