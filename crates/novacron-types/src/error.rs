//! The one error shape every NovaCron API speaks: `{"error": {"code", "message", "field"?}}`.
//!
//! The mapping from [`ErrorCode`] to an HTTP status lives in the server, in one place.

use serde::{Deserialize, Serialize};

/// What kind of failure happened, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range (400).
    InvalidArgument,
    /// No or bad credentials (401).
    Unauthenticated,
    /// Authenticated, but the role does not allow this (403).
    PermissionDenied,
    /// The named resource does not exist (404).
    NotFound,
    /// The resource exists but is in a state that forbids this (409), or a name is taken.
    Conflict,
    /// The request body is too large (413).
    PayloadTooLarge,
    /// The node cannot serve this right now (no leader, shutting down) (503).
    Unavailable,
    /// Host-to-host: this host is not the Raft leader; the write was not appended (503).
    NotLeader,
    /// This host lost contact with the cluster's quorum and fenced itself (503).
    Isolated,
    /// Waiting for something took too long (504). For a change, its outcome is unknown: it may
    /// still be applied. (A 503 `unavailable` change was not made.)
    Timeout,
    /// A bug or an unexpected failure of a dependency (500).
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::Isolated => "isolated",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error as a client sees it.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, thiserror::Error,
)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    /// A sentence a person can act on.
    pub message: String,
    /// The request field at fault, for `invalid_argument` (for example `memory_mib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A finer, stable cause under `code`, when a client may act on it (for example
    /// `not_enough_memory` for a placement refused with `conflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The JSON envelope: `{"error": {...}}`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ApiError,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            reason: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
            field: Some(field.into()),
            reason: None,
        }
    }

    pub fn not_found(kind: &str, key: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} '{key}' not found"))
    }

    /// The same error with a finer cause (see [`ApiError::reason`]).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// A change whose fate is not known (it may have been applied, or may still be).
    pub fn outcome_unknown(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Timeout, message)
    }
}
