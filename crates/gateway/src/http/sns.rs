//! `POST /sns`: SNS HTTP(S) deliveries. Bounded in how many posts are read and verified at once
//! and in how long a body may take, so slow or forged posts cannot starve genuine notifications;
//! what is read goes to the [`Inbox`](crate::bus::inbox::Inbox), and its verdict becomes the
//! HTTP answer (SNS retries a 5xx, never a 4xx).

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::{AppState, plain};
use crate::bus::inbox::{Accepted, Rejection};

/// Largest SNS post accepted: a 256 KiB message, JSON-escaped, in its envelope.
pub(super) const MAX_SNS_POST_BYTES: usize = 1024 * 1024;

pub(super) async fn sns(State(state): State<AppState>, body: Body) -> Response {
    let refuse = |rejection: Rejection| {
        state.inbox.rejected(&rejection);
        answer(Err(rejection))
    };
    let Ok(_slot) = state.sns_slots.try_acquire() else {
        return refuse(Rejection::Busy);
    };
    let body: Bytes = match tokio::time::timeout(
        state.sns_body_timeout,
        axum::body::to_bytes(body, MAX_SNS_POST_BYTES),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return refuse(Rejection::TooLarge),
        Err(_) => return refuse(Rejection::BodyTimeout),
    };
    answer(state.inbox.sns_post(&body).await)
}

fn answer(verdict: Result<Accepted, Rejection>) -> Response {
    match verdict {
        Ok(Accepted::Notification | Accepted::UnsubscribeConfirmed) => plain(StatusCode::OK, "ok"),
        Ok(Accepted::Confirming) => plain(StatusCode::OK, "confirming"),
        Err(rejection) => {
            let status = match rejection {
                Rejection::Busy | Rejection::CertUnavailable { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
                Rejection::NotSns
                | Rejection::UnknownType
                | Rejection::NoToken
                | Rejection::NotPayload { .. } => StatusCode::BAD_REQUEST,
                Rejection::WrongTopic | Rejection::NotGenuine { .. } => StatusCode::FORBIDDEN,
            };
            plain(status, rejection.why())
        }
    }
}
