//! Fakes for running a gateway without AWS, in tests and benchmarks outside this crate. Behind
//! the `test-support` feature: never in the service binary.

use crate::bus::{BusError, Endpoint, SubscriptionState, TopicSubscriptions};

/// [`TopicSubscriptions`] with no SNS behind them: every subscription is confirmed as soon as it
/// is made. For running a gateway in tests and benchmarks, whose bus messages are posted to its
/// `/sns` directly.
#[derive(Debug, Clone)]
pub struct ConfirmedAtOnce {
    /// The ARN every subscription gets.
    pub subscription_arn: String,
}

#[async_trait::async_trait]
impl TopicSubscriptions for ConfirmedAtOnce {
    async fn subscribe(&self, _: &Endpoint) -> Result<String, BusError> {
        Ok(self.subscription_arn.clone())
    }
    async fn state(&self, _: &str) -> Result<SubscriptionState, BusError> {
        Ok(SubscriptionState::Confirmed)
    }
    async fn confirm(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
    async fn unsubscribe(&self, _: &str) -> Result<(), BusError> {
        Ok(())
    }
}
