//! The writer's command line ([`Cli`], flags and `CHORUS_*` environment variables) and the
//! [`Settings`] it is turned into (`TryFrom<&Config>`), which refuse what breaks a promise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chorus_service::LogArgs;

use crate::store::{InvalidSettings, Settings as StoreSettings};

/// `chorus-writer [serve] …` or `chorus-writer create-table …`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "chorus-writer",
    version,
    about = "Chorus writer: the HTTP API in front of DynamoDB"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Create the messages table (stream NEW_IMAGE, TTL on `ttl`) if it does not exist, and print
    /// its stream ARN.
    CreateTable,
    /// Print a service token for a backend (signed with the first --service-key-file): it may post
    /// to the rooms and as the sender names listed, and read those rooms' history.
    MintToken(MintToken),
}

/// `chorus-writer mint-token`.
#[derive(Debug, Clone, clap::Args)]
pub struct MintToken {
    /// Who the backend is (logged with what it does).
    #[arg(long)]
    pub sub: String,
    /// Rooms it may use: names, `prefix*`, or `*`; comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub rooms: Vec<String>,
    /// Sender names it may post as: names, `prefix*`, or `*`; comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub senders: Vec<String>,
    /// How long the token is valid, e.g. 1h, 30d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        global = true,
        env = "CHORUS_WRITER_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Also serve `/metrics` on this address (e.g. a port only the monitoring network reaches).
    #[arg(long, global = true, env = "CHORUS_WRITER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Files holding the service keys (at least 32 bytes each): every `/v1` request must carry a
    /// token signed with one of them. The first signs `mint-token`'s tokens. Several for
    /// rotation; comma-separated in the environment variable.
    #[arg(
        long,
        global = true,
        env = "CHORUS_SERVICE_KEY_FILE",
        value_delimiter = ','
    )]
    pub service_key_file: Vec<PathBuf>,
    /// DynamoDB table holding messages.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TABLE",
        default_value = "chorus-messages"
    )]
    pub table: String,
    /// How long messages are kept (`90m`, `72h`, `3d` …; at least 1 hour): each item's `ttl`.
    /// Older history answers 410 `history_expired`.
    #[arg(long, global = true, env = "CHORUS_RETENTION", default_value = "3d", value_parser = parse_duration)]
    pub retention: Duration,
    /// A retried send is recognized (and answered with its original seq) if the original was
    /// stored less than this long ago …
    #[arg(long, global = true, env = "CHORUS_DEDUPE_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub dedupe_window: Duration,
    /// … or is among the room's last this many messages.
    #[arg(
        long,
        global = true,
        env = "CHORUS_DEDUPE_WINDOW_MESSAGES",
        default_value_t = 10_000
    )]
    pub dedupe_window_messages: usize,
    /// Most (sender, id) entries kept in memory over all rooms (about 150 bytes each); idle rooms
    /// are dropped first and read back from the table when used again.
    #[arg(
        long,
        global = true,
        env = "CHORUS_DEDUPE_MEMORY_ENTRIES",
        default_value_t = 1_000_000
    )]
    pub dedupe_memory_entries: usize,
    #[command(flatten)]
    pub log: LogArgs,
}

/// What a serving writer needs, checked: [`crate::App::build`] takes it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the API is served.
    pub listen: SocketAddr,
    /// Where `/metrics` is served too, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The service keys callers sign their tokens with (the first signs `mint-token`'s).
    pub service_key_files: Vec<PathBuf>,
    /// The DynamoDB table holding messages.
    pub table: String,
    /// Retention and the dedupe window.
    pub store: StoreSettings,
}

impl TryFrom<&Config> for Settings {
    type Error = InvalidSettings;

    fn try_from(config: &Config) -> Result<Settings, InvalidSettings> {
        Ok(Settings {
            listen: config.listen,
            metrics_listen: config.metrics_listen,
            service_key_files: config.service_key_file.clone(),
            table: config.table.clone(),
            store: config.settings()?,
        })
    }
}

impl Config {
    /// The store settings, checked.
    ///
    /// # Errors
    /// [`InvalidSettings`] naming the setting that does not make sense.
    pub fn settings(&self) -> Result<StoreSettings, InvalidSettings> {
        let settings = StoreSettings {
            retention: self.retention,
            dedupe_window: self.dedupe_window,
            dedupe_window_messages: self.dedupe_window_messages,
            dedupe_memory_entries: self.dedupe_memory_entries,
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// `90s`, `10m`, `72h`, `3d` (a whole number and a unit).
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} has no unit: write e.g. 90s, 10m, 72h or 3d"))?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_keep_three_days_and_ten_minutes_or_ten_thousand_messages() {
        let settings = Cli::parse_from(["chorus-writer"])
            .config
            .settings()
            .unwrap();
        assert_eq!(settings.retention, Duration::from_secs(3 * 86_400));
        assert_eq!(settings.dedupe_window, Duration::from_secs(600));
        assert_eq!(settings.dedupe_window_messages, 10_000);
    }

    #[test]
    fn the_serving_settings_carry_every_flag_and_refuse_what_breaks_a_promise() {
        let config = Cli::parse_from([
            "chorus-writer",
            "--listen",
            "127.0.0.1:9000",
            "--table",
            "t1",
            "--service-key-file",
            "/k1,/k2",
        ])
        .config;
        let settings = Settings::try_from(&config).unwrap();
        assert_eq!(settings.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(settings.table, "t1");
        assert_eq!(
            settings.service_key_files,
            [PathBuf::from("/k1"), PathBuf::from("/k2")]
        );
        assert_eq!(settings.store, StoreSettings::default());
        let short = Cli::parse_from(["chorus-writer", "--retention", "30m"]).config;
        assert!(Settings::try_from(&short).is_err());
    }

    #[test]
    fn durations_need_a_unit_and_settings_that_break_promises_are_refused() {
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("90").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unit"));
        let short = Cli::parse_from(["chorus-writer", "--retention", "30m"]).config;
        assert!(
            short
                .settings()
                .unwrap_err()
                .to_string()
                .contains("at least 1 hour")
        );
        let window = Cli::parse_from([
            "chorus-writer",
            "--retention",
            "1h",
            "--dedupe-window",
            "20m",
        ])
        .config;
        assert!(
            window
                .settings()
                .unwrap_err()
                .to_string()
                .contains("4 times")
        );
        let memory = Cli::parse_from(["chorus-writer", "--dedupe-memory-entries", "10"]).config;
        assert!(
            memory
                .settings()
                .unwrap_err()
                .to_string()
                .contains("at least the dedupe window")
        );
    }
}
