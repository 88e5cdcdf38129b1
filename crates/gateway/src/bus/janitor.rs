//! The janitor: removes the subscriptions of gateways that died without draining.

use std::time::Duration;

use aws_sdk_sns::Client;

use super::{BusError, aws_error};
use crate::Chain;

/// Removes the topic's HTTP(S) subscriptions whose gateway no longer answers at all (connection
/// refused or timed out on `GET <endpoint base>/healthz`, twice): the subscriptions of gateways
/// that crashed without draining. Any HTTP answer, even 503 while draining, counts as alive.
///
/// This is the janitor's job (a timer, or the terminating instance's lifecycle hook): on AWS a
/// dead endpoint only fails its own deliveries until SNS gives up on them, but some emulators fail
/// every publish while one subscriber is dead. Returns the removed subscription ARNs.
///
/// # Errors
/// When the subscriptions cannot be listed; a failed unsubscribe is logged and skipped.
pub async fn prune_dead_subscriptions(
    client: &Client,
    topic_arn: &str,
) -> Result<Vec<String>, BusError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(BusError::HttpClient)?;
    let mut removed = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let page = client
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .set_next_token(next_token.take())
            .send()
            .await
            .map_err(aws_error("ListSubscriptionsByTopic"))?;
        for sub in page.subscriptions.unwrap_or_default() {
            let (Some(arn), Some(endpoint), Some(protocol)) =
                (sub.subscription_arn, sub.endpoint, sub.protocol)
            else {
                continue;
            };
            if !(protocol == "http" || protocol == "https") || !arn.starts_with("arn:") {
                continue;
            }
            let health = format!("{}/healthz", endpoint.trim_end_matches("/sns"));
            let mut alive = false;
            for _ in 0..2 {
                if http.get(&health).send().await.is_ok() {
                    alive = true;
                    break;
                }
            }
            if alive {
                continue;
            }
            match client.unsubscribe().subscription_arn(&arn).send().await {
                Ok(_) => {
                    tracing::info!(%endpoint, subscription = %arn, "removed the subscription of a dead gateway");
                    removed.push(arn);
                }
                Err(e) => {
                    tracing::warn!(%endpoint, error.message = %Chain(&e), "unsubscribing a dead gateway failed")
                }
            }
        }
        next_token = page.next_token;
        if next_token.is_none() {
            return Ok(removed);
        }
    }
}
