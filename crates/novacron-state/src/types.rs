//! The Raft types every part of this crate shares: openraft's type config, how a member is
//! reached, and what the state machine publishes. Imports nothing else of the crate but the
//! command types, so the log store, the network and the node do not import each other for them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse, Touched};

/// How a member is reached. Stored in Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// `http://host:port` of the member's API (host-to-host calls use the same listener).
    pub api_addr: String,
}

openraft::declare_raft_types!(
    /// NovaCron's Raft types: commands in, [`CommandResponse`] out, `u64` member IDs.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeAddr,
);

/// Published after every applied batch; the server's event bus starts here.
#[derive(Clone, Debug)]
pub enum StateEvent {
    Applied {
        index: u64,
        touched: Arc<Vec<Touched>>,
    },
    SnapshotInstalled {
        index: u64,
    },
}
