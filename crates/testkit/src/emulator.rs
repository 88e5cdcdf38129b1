//! The AWS emulator that the end-to-end tests and the benchmarks run against, named by
//! `AWS_ENDPOINT_URL` (`scripts/test` and `scripts/bench` start one). DynamoDB may have an endpoint
//! of its own, `AWS_ENDPOINT_URL_DYNAMODB`, which the SDK picks up by itself.

/// The emulator endpoint.
///
/// # Panics
/// When `AWS_ENDPOINT_URL` is not set: these tests and benchmarks need the emulator.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").expect(
        "AWS_ENDPOINT_URL is not set: the e2e tests need the AWS emulator; run ./scripts/test",
    )
}

/// The endpoint serving SNS, which also serves its signing certificates: the gateways'
/// `--sns-cert-mirror`.
pub fn sns_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_SNS").unwrap_or_else(|_| endpoint())
}

/// The SDK configuration for the emulator, as the services load theirs.
///
/// # Panics
/// When `AWS_ENDPOINT_URL` is not set.
pub async fn aws() -> aws_config::SdkConfig {
    endpoint();
    chorus_service::load_aws_config().await
}
