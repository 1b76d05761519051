//! The replicated state of a NovaCron cluster.
//!
//! - [`command`]: the versioned Raft commands, the only way desired state changes.
//! - [`machine`]: [`ClusterState`] and its pure `apply` (no I/O, no clock), one file per entity.
//! - `volumes`: the rules `apply` keeps for volumes (attach, detach, move, delete).
//! - [`placement`]: which hosts a VM may go to and which is best (pure).
//! - [`store`]: openraft's log store (the log in [`wal`] segment files, the vote in redb) and
//!   state machine (rows in redb).
//! - [`wal`]: the log's append-only, checksummed segment files.
//! - [`types`]: the Raft type config and the types the store, network and node share.
//! - [`network`]: openraft's network over a [`network::Transport`] (HTTP lives in the server);
//!   [`inprocess`]: a transport inside one process for tests.
//! - [`raft`]: the running Raft node and the handle the server uses.
//!
//! Invariant: nothing here knows about QEMU, HTTP handlers or users' passwords; it stores what it
//! is given and applies commands deterministically.

pub mod command;
pub mod inprocess;
pub mod machine;
pub mod network;
pub mod placement;
pub mod raft;
pub mod store;
pub mod types;
mod volumes;
pub mod wal;

pub use command::{Command, CommandResponse, CommandV1, MovedVolume, Touched};
pub use machine::{ClusterMeta, ClusterState};
pub use raft::{RaftSettings, StateHandle, StateMetrics};
pub use types::{NodeAddr, StateEvent, TypeConfig};
