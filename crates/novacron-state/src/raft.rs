//! The running Raft node and the handle the server talks to.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, RaftError};
use openraft::{Config, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use novacron_types::{ApiError, NodeId};

use crate::command::{Command, CommandResponse, CommandV1, Touched};
use crate::machine::ClusterState;
use crate::network::UnreachableNetwork;
use crate::store::{LogStore, StateMachineStore, open_database};

/// How a member is reached. Stored in Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// `http://host:port` of the member's API (host-to-host calls use the same listener).
    pub api_addr: String,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Log lines name the command, not its (possibly secret-bearing) payload.
        match self {
            Command::V1(c) => {
                let name = serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                write!(f, "v1/{name}")
            }
        }
    }
}

openraft::declare_raft_types!(
    /// NovaCron's Raft types: commands in, [`CommandResponse`] out, `u64` member IDs.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeAddr,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

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

/// Raft tuning. Defaults suit a LAN; tests shrink the snapshot interval.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so slightly lagging followers need no snapshot.
    pub keep_after_snapshot: u64,
    /// Purge only when at least this many entries can go (fewer, larger deletions).
    pub purge_batch: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every: 1000,
            keep_after_snapshot: 200,
            purge_batch: 64,
        }
    }
}

impl RaftSettings {
    fn to_config(&self) -> Result<Config, StateError> {
        Config {
            cluster_name: "novacron".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            purge_batch_size: self.purge_batch,
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StateError::Config(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("opening the state store at {path}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid Raft settings: {0}")]
    Config(String),
    #[error("starting Raft: {0}")]
    Raft(String),
}

/// Raft figures for metrics and `GET /api/v1/nodes`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateMetrics {
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub leader: Option<u64>,
    pub role: String,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
}

/// The server's handle on the replicated state. Cheap to clone.
#[derive(Clone)]
pub struct StateHandle {
    raft: Raft,
    sm: StateMachineStore,
    events: broadcast::Sender<StateEvent>,
    node_id: NodeId,
}

impl StateHandle {
    /// Opens the store in `dir` and starts Raft. On an empty store, initializes a one-voter
    /// cluster with this node; otherwise recovers what is there.
    pub async fn open(
        dir: &Path,
        node_id: NodeId,
        api_addr: String,
        settings: &RaftSettings,
    ) -> Result<Self, StateError> {
        let path = dir.join("state.redb");
        let db = open_database(&path).map_err(|source| StateError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let (events, _) = broadcast::channel(1024);
        let sm = StateMachineStore::open(db.clone(), events.clone()).map_err(|source| {
            StateError::Open {
                path: path.display().to_string(),
                source,
            }
        })?;
        let config = Arc::new(settings.to_config()?);
        let raft = Raft::new(
            node_id.0,
            config,
            UnreachableNetwork,
            LogStore::new(db),
            sm.clone(),
        )
        .await
        .map_err(|e| StateError::Raft(e.to_string()))?;
        let members = BTreeMap::from([(node_id.0, NodeAddr { api_addr })]);
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(node = %node_id, "initialized a new one-voter cluster"),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                tracing::info!(node = %node_id, "recovered existing Raft state")
            }
            Err(e) => return Err(StateError::Raft(e.to_string())),
        }
        Ok(Self {
            raft,
            sm,
            events,
            node_id,
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Waits until this node knows a leader and has applied everything committed before it.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ApiError> {
        let waiter = self.raft.wait(Some(timeout));
        waiter
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|e| ApiError::unavailable(format!("Raft has no leader: {e}")))?;
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| ApiError::unavailable(format!("Raft is not ready: {e}")))?;
        Ok(())
    }

    /// Replicates a command and waits until it is applied here. A command that `apply`
    /// rejected comes back as its error, and changed nothing.
    pub async fn propose(&self, cmd: CommandV1) -> Result<(), ApiError> {
        match self.raft.client_write(Command::V1(cmd)).await {
            Ok(resp) => resp.data.into_result(),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ApiError::unavailable(format!(
                    "this node is not the leader (leader: {:?}); forwarding arrives with clustering",
                    f.leader_id
                )))
            }
            Err(e) => Err(ApiError::unavailable(format!(
                "replicating the change failed: {e}"
            ))),
        }
    }

    /// Replicates several commands as one batch (one log append, one fsync) and returns each
    /// one's result, in order. Each command applies or is rejected on its own.
    pub async fn propose_many(
        &self,
        cmds: Vec<CommandV1>,
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        use futures::StreamExt;
        let n = cmds.len();
        let mut results = self
            .raft
            .client_write_many(cmds.into_iter().map(Command::V1))
            .await
            .map_err(|e| ApiError::unavailable(format!("replicating the change failed: {e}")))?;
        let mut out = Vec::with_capacity(n);
        while let Some(r) = results.next().await {
            out.push(match r {
                Ok(Ok(w)) => w.response.into_result(),
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(ApiError::unavailable(
                    format!("this node is not the leader (leader: {:?})", f.leader_id),
                )),
                Ok(Err(e)) => Err(ApiError::unavailable(format!(
                    "replicating the change failed: {e}"
                ))),
                Err(fatal) => Err(ApiError::unavailable(format!("Raft stopped: {fatal}"))),
            });
        }
        if out.len() != n {
            return Err(ApiError::unavailable(
                "Raft stopped before answering every command",
            ));
        }
        Ok(out)
    }

    /// Reads the locally applied state (may be stale on a follower).
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        self.sm.read(|a| f(&a.state))
    }

    /// Reads after confirming with a quorum that this node has applied every committed write.
    pub async fn read_linearizable<T>(
        &self,
        f: impl FnOnce(&ClusterState) -> T,
    ) -> Result<T, ApiError> {
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| ApiError::unavailable(format!("linearizable read failed: {e}")))?;
        Ok(self.read(f))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    pub fn metrics(&self) -> StateMetrics {
        let m = self.raft.metrics().borrow_watched().clone();
        StateMetrics {
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            leader: m.current_leader,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
        }
    }

    /// Builds a snapshot now and waits for it.
    pub async fn snapshot_now(&self) -> Result<u64, ApiError> {
        let before = self.metrics().snapshot_index;
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ApiError::internal(format!("snapshot: {e}")))?;
        let applied = self.metrics().applied_index;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| {
                    m.snapshot.map(|l| l.index) >= Some(applied)
                        && m.snapshot.map(|l| l.index) != before.filter(|b| *b < applied)
                },
                "snapshot built",
            )
            .await
            .map_err(|e| ApiError::internal(format!("snapshot: {e}")))?;
        Ok(applied)
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("Raft shutdown: {e}");
        }
    }
}
