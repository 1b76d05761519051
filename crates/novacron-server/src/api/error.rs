//! The one place where an [`ApiError`] becomes an HTTP status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use novacron_types::{ApiError, ErrorBody, ErrorCode};

pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unavailable | ErrorCode::NotLeader | ErrorCode::Isolated => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An [`ApiError`] on its way out as `{"error": {...}}`.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = status_of(self.0.code);
        // 503s (no leader, not the leader, isolated, busy) are states the host reports once
        // when it enters them, and every client retries through them: one error line per
        // refused request flooded the log while a host was cut off (8,864 lines in five
        // minutes of chaos). Failures and unknown outcomes stay errors.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::debug!(code = self.0.code.as_str(), "{}", self.0.message);
        } else if status.is_server_error() {
            tracing::error!(code = self.0.code.as_str(), "{}", self.0.message);
        }
        let unauthenticated = self.0.code == ErrorCode::Unauthenticated;
        let mut resp = (status, Json(ErrorBody { error: self.0 })).into_response();
        if unauthenticated {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, HttpError>;
