//! Domain types shared by every NovaCron crate.
//!
//! This crate knows nothing about Raft, QEMU, HTTP or storage: it only defines what a VM, an image,
//! a user, a token and an operation *are*, how their IDs are typed, how input is validated, and the
//! one error shape every API speaks.

pub mod error;
pub mod ids;
pub mod page;
pub mod resources;
pub mod schema;
pub mod validate;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use ids::{ImageId, NodeId, OperationId, TokenId, UserId, VmId, VolumeId};
pub use page::{Page, PageRequest};
pub use resources::*;

/// Seconds since the Unix epoch, as carried in Raft commands (apply must be deterministic, so the
/// proposer reads the clock, never `apply`).
pub type UnixMillis = i64;

/// Reads the wall clock in milliseconds. Only proposers and executors call this.
pub fn now_millis() -> UnixMillis {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}
