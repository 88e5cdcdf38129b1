//! The writer's one-shot commands (`create-table`, `mint-token`): each returns the one line it
//! prints.

use chorus_service::service_auth::{CallerKind, Grant, Patterns, ServiceKeys};

use crate::BuildError;
use crate::config::{Config, MintToken};
use crate::store::ensure_table;

/// Creates the messages table if it is missing; returns its stream ARN.
///
/// # Errors
/// When the table cannot be described or created.
pub async fn create_table(config: &Config) -> anyhow::Result<String> {
    let client = aws_sdk_dynamodb::Client::new(&chorus_service::load_aws_config().await);
    ensure_table(&client, &config.table).await
}

/// A backend's service token, signed with the first service key.
///
/// # Errors
/// [`BuildError::Keys`] when the keys cannot be read.
pub fn mint_token(config: &Config, mint: MintToken) -> Result<String, BuildError> {
    let keys = ServiceKeys::from_files(&config.service_key_file).map_err(BuildError::Keys)?;
    let grant = Grant {
        sub: mint.sub,
        kind: CallerKind::Backend,
        rooms: Patterns(mint.rooms),
        senders: Patterns(mint.senders),
    };
    Ok(keys.mint(&grant, mint.ttl))
}

/// Prints a command's answer: the one line of output scripts read (a CLI answer, not a log).
#[allow(clippy::print_stdout)]
pub fn answer(line: String) {
    println!("{line}");
}
