//! The writer's HTTP errors: every failure becomes `{"error":{"code","message"}}` with a status
//! that says whose fault it is. Internal causes are logged, never returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chorus_protocol::api::{ApiError as ApiErrorBody, ApiErrorDetail, HISTORY_EXPIRED};
use chorus_service::service_auth::TokenError;

use crate::store::StoreError;

/// An error answer of the writer API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `code` names the field, `message` says how to fix it.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// No valid service token: who is calling is not known.
    #[error("unauthorized: {0}")]
    Unauthorized(TokenError),
    /// The caller's token does not allow this room or sender name.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The store failed; the client should retry (with the same message id).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            ApiError::BadRequest { code, message } => {
                (StatusCode::BAD_REQUEST, *code, message.clone())
            }
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".to_owned(),
            ),
            ApiError::Unauthorized(reason) => {
                let body = ApiErrorBody {
                    error: ApiErrorDetail {
                        code: "unauthorized".to_owned(),
                        message: format!(
                            "{reason}: send Authorization: Bearer <service token> (gateways sign \
                             their own with --writer-key-file; backends get one from \
                             chorus-writer mint-token)"
                        ),
                    },
                };
                return (
                    StatusCode::UNAUTHORIZED,
                    [(
                        axum::http::header::WWW_AUTHENTICATE,
                        "Bearer realm=\"chorus-writer\"",
                    )],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Forbidden { code, message } => {
                (StatusCode::FORBIDDEN, *code, message.clone())
            }
            ApiError::Store(expired @ StoreError::HistoryExpired { .. }) => {
                (StatusCode::GONE, HISTORY_EXPIRED, expired.to_string())
            }
            ApiError::Store(StoreError::Contention { .. }) => {
                tracing::warn!(error.message = %self, "send gave up under contention");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "contention",
                    "the room is busy: retry with the same message id".to_owned(),
                )
            }
            ApiError::Store(StoreError::Unexpected(cause)) => {
                tracing::error!(error.message = %cause, error.cause_chain = ?cause, "store failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the message store is unavailable: retry with the same message id".to_owned(),
                )
            }
        };
        let body = ApiErrorBody {
            error: ApiErrorDetail {
                code: code.to_owned(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}
