//! The writer's configuration, parsed once from flags and `CHORUS_*` environment variables.

use std::net::SocketAddr;

use chorus_service::LogArgs;

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
    /// Create the messages table (stream NEW_IMAGE) if it does not exist, and print its stream ARN.
    CreateTable,
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
    /// DynamoDB table holding messages.
    #[arg(
        long,
        global = true,
        env = "CHORUS_TABLE",
        default_value = "chorus-messages"
    )]
    pub table: String,
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
