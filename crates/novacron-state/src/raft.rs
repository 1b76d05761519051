//! The running Raft node and the handle the server talks to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::raft::SnapshotResponse;
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{ChangeMembers, Config, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use novacron_types::{ApiError, NodeId};

use crate::command::{Command, CommandResponse, CommandV1};
use crate::machine::ClusterState;
use crate::network::{
    ForwardedWrite, ForwardedWriteReply, Network, RaftReply, RaftRequest, Transport, TransportError,
};
use crate::store::{LogStore, StateMachineStore, open_database};
pub use crate::types::{NodeAddr, StateEvent, TypeConfig};

pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

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
    /// How long a forwarded write or read-index request waits for the leader's answer.
    pub forward_timeout_ms: u64,
    /// How long a write keeps retrying while there is no leader (an election) before failing.
    pub leaderless_wait_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            // A LAN: heartbeats every 30 ms, elections after 100-150 ms without one. openraft's
            // followers refuse votes for a leader lease of `election_timeout_max` after the last
            // heartbeat, so the first candidate is usually refused and the second attempt wins:
            // a dead leader is replaced in 200-300 ms.
            heartbeat_ms: 30,
            election_timeout_min_ms: 100,
            election_timeout_max_ms: 150,
            snapshot_every: 1000,
            keep_after_snapshot: 200,
            purge_batch: 64,
            forward_timeout_ms: 5000,
            leaderless_wait_ms: 3000,
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
            // A leader that restarts must win an election again before it serves: state-machine
            // rows are written without fsync and the commit index is not stored (see
            // `store.rs`), so a leader restored at once could serve a linearizable read from a
            // state older than what it had acknowledged (found by a chaos sweep, seed 7: a
            // stale read right after the leader was killed and restarted).
            enable_leader_restore: Some(false),
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
    /// The vote this node holds, as openraft prints it (`<T3-N2:Q>`: term 3, for node 2,
    /// committed).
    pub vote: String,
}

/// How a node starts on an empty store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// Initialize a new one-voter cluster with this node.
    Bootstrap,
    /// Wait to be added by an existing cluster's leader (`serve --join`).
    Join,
}

/// Why this host refuses writes, when it does (set by the lease keeper when it is isolated).
#[derive(Default)]
struct WriteGate {
    refused: std::sync::RwLock<Option<ApiError>>,
}

/// A caller's commands waiting in the write queue.
struct Pending {
    cmds: Vec<Command>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<CommandResponse>, ApiError>>,
}

/// Writes in flight at once from one host; callers arriving meanwhile are batched together.
const WRITES_IN_FLIGHT: usize = 1;
/// At most this many commands in one batch.
const MAX_BATCH: usize = 512;

/// Group commit: drains the queue into batches, so concurrent writers share log appends, fsyncs
/// and (on followers) forwarding round trips. Ends when the queue is closed (shutdown).
async fn batch_writes(h: StateHandle, mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Everything that queued up while we waited for a permit goes in this batch.
        let mut batch = vec![first];
        let mut n = batch[0].cmds.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.cmds.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let h = h.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let cmds: Vec<Command> = batch.iter().flat_map(|p| p.cmds.iter().cloned()).collect();
            match h.replicate(cmds).await {
                Ok(mut results) => {
                    for p in batch {
                        let rest = results.split_off(p.cmds.len().min(results.len()));
                        let _ = p.reply.send(Ok(results));
                        results = rest;
                    }
                }
                Err(e) => {
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// The server's handle on the replicated state. Cheap to clone.
#[derive(Clone)]
pub struct StateHandle {
    raft: Raft,
    sm: StateMachineStore,
    events: broadcast::Sender<StateEvent>,
    node_id: NodeId,
    transport: Arc<dyn Transport>,
    settings: Arc<RaftSettings>,
    gate: Arc<WriteGate>,
    /// The group-commit queue; `None` once shut down.
    queue: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Pending>>>>,
}

impl StateHandle {
    /// Opens the store in `dir` and starts Raft. On an empty store, `mode` says whether to
    /// initialize a new one-voter cluster or wait to be added to one; otherwise recovers.
    pub async fn open(
        dir: &Path,
        node_id: NodeId,
        api_addr: String,
        settings: &RaftSettings,
        transport: Arc<dyn Transport>,
        mode: StartMode,
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
        let log_dir = dir.join("raft-log");
        let log = LogStore::open(db.clone(), &log_dir).map_err(|source| StateError::Open {
            path: log_dir.display().to_string(),
            source,
        })?;
        let config = Arc::new(settings.to_config()?);
        let raft = Raft::new(
            node_id.0,
            config,
            Network::new(transport.clone()),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| StateError::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StateError::Raft(e.to_string()))?;
        if initialized {
            tracing::info!(node = %node_id, "recovered existing Raft state");
        } else if mode == StartMode::Bootstrap {
            let members = BTreeMap::from([(node_id.0, NodeAddr { api_addr })]);
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = %node_id, "initialized a new one-voter cluster"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(StateError::Raft(e.to_string())),
            }
        } else {
            tracing::info!(node = %node_id, "waiting to be added to the cluster");
        }
        Ok(Self {
            raft,
            sm,
            events,
            node_id,
            transport,
            settings: Arc::new(settings.clone()),
            gate: Arc::default(),
            queue: Arc::default(),
        }
        .with_batcher())
    }

    fn with_batcher(self) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        tokio::spawn(batch_writes(self.clone(), rx));
        self
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Waits until this node knows a leader and has applied everything committed before it.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiter = self.raft.wait(Some(timeout));
            waiter
                .metrics(|m| m.current_leader.is_some(), "a leader is known")
                .await
                .map_err(|e| ApiError::unavailable(format!("Raft has no leader: {e}")))?;
            match self.linearize().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Refuses every write and linearizable read with `why` until called with `None` (an
    /// isolated host).
    pub fn refuse_writes(&self, why: Option<ApiError>) {
        *self.gate.refused.write().unwrap_or_else(|p| p.into_inner()) = why;
    }

    fn write_refused(&self) -> Result<(), ApiError> {
        match &*self.gate.refused.read().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Replicates a command and waits until it is applied here. A command that `apply`
    /// rejected comes back as its error, and changed nothing. On a follower the command is
    /// forwarded to the leader.
    pub async fn propose(&self, cmd: CommandV1) -> Result<(), ApiError> {
        let mut results = self.propose_many(vec![cmd]).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(ApiError::internal("no result for the command")))
    }

    /// Replicates several commands as one batch (one log append, one fsync) and returns each
    /// one's result, in order. Each command applies or is rejected on its own.
    pub async fn propose_many(
        &self,
        cmds: Vec<CommandV1>,
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        self.write_refused()?;
        let cmds: Vec<Command> = cmds.into_iter().map(Command::V1).collect();
        let n = cmds.len();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| ApiError::unavailable("this host is shutting down"))?;
        queue
            .send(Pending { cmds, reply })
            .map_err(|_| ApiError::unavailable("this host is shutting down"))?;
        let results = answer
            .await
            .map_err(|_| ApiError::outcome_unknown("the write batcher stopped"))??;
        if results.len() != n {
            return Err(ApiError::internal(
                "a batch answered the wrong number of commands",
            ));
        }
        Ok(results.into_iter().map(|r| r.into_result()).collect())
    }

    /// Replicates one batch (commands of many callers), retrying while nothing can have been
    /// appended.
    async fn replicate(&self, cmds: Vec<Command>) -> Result<Vec<CommandResponse>, ApiError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.leaderless_wait_ms);
        loop {
            let outcome = match self.leader() {
                Some((id, _)) if id == self.node_id.0 => {
                    self.write_local(cmds.clone()).await.map(|(r, _)| r)
                }
                Some((_, addr)) => self.write_forwarded(&addr, cmds.clone()).await,
                None => Err(Retry::NoLeader),
            };
            match outcome {
                Ok(results) => return Ok(results),
                Err(Retry::Fail(e)) => return Err(e),
                // Nothing was appended: wait for the election to settle and try again.
                Err(retry) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(?retry, "write not accepted yet; retrying");
                    self.wait_leader_change(Duration::from_millis(50)).await;
                }
                Err(retry) => return Err(retry.into_error()),
            }
        }
    }

    /// Writes on this node as the leader.
    /// Returns each command's response and the log index of the last one.
    async fn write_local(&self, cmds: Vec<Command>) -> Result<(Vec<CommandResponse>, u64), Retry> {
        use futures::StreamExt;
        let n = cmds.len();
        let mut stream =
            self.raft.client_write_many(cmds).await.map_err(|e| {
                Retry::Fail(ApiError::outcome_unknown(format!("Raft stopped: {e}")))
            })?;
        let mut out = Vec::with_capacity(n);
        let mut last = 0;
        // A leader cut off from its quorum never commits; do not wait for ever.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.forward_timeout_ms);
        loop {
            let r = match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => {
                    return Err(Retry::Fail(ApiError::new(
                        novacron_types::ErrorCode::Timeout,
                        "the change was not committed in time (this leader may have lost its \
                         quorum); it may still be applied later",
                    )));
                }
            };
            out.push(match r {
                Ok(Ok(w)) => {
                    last = last.max(w.log_id.index);
                    w.response.clone()
                }
                // Not appended by this leader: safe to send again to the new one, but only when
                // it is the first command (later ones may follow appended ones).
                Ok(Err(ClientWriteError::ForwardToLeader(_))) if out.is_empty() => {
                    return Err(Retry::NotLeader);
                }
                Ok(Err(ClientWriteError::ForwardToLeader(_))) => CommandResponse::rejected(
                    ApiError::unavailable("leadership changed; the change was not made"),
                ),
                Ok(Err(e)) => CommandResponse::rejected(ApiError::outcome_unknown(format!(
                    "replicating the change failed: {e}"
                ))),
                Err(fatal) => CommandResponse::rejected(ApiError::outcome_unknown(format!(
                    "Raft stopped: {fatal}"
                ))),
            });
        }
        if out.len() != n {
            return Err(Retry::Fail(ApiError::outcome_unknown(
                "Raft stopped before answering every command",
            )));
        }
        Ok((out, last))
    }

    /// Sends the writes to the leader and waits until they are applied here too.
    async fn write_forwarded(
        &self,
        leader: &NodeAddr,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResponse>, Retry> {
        let timeout = Duration::from_millis(self.settings.forward_timeout_ms);
        let reply = self
            .transport
            .forward_write(leader, ForwardedWrite { commands }, timeout)
            .await;
        let ForwardedWriteReply { responses, index } = match reply {
            Ok(r) => r,
            Err(TransportError::Unreachable { .. }) => return Err(Retry::LeaderUnreachable),
            Err(TransportError::Remote { message, .. }) if message.starts_with(NOT_LEADER) => {
                return Err(Retry::NotLeader);
            }
            // Delivered, or maybe delivered: the leader may have applied it.
            Err(e) => {
                return Err(Retry::Fail(ApiError::outcome_unknown(format!(
                    "forwarding the change to the leader failed: {e}"
                ))));
            }
        };
        // Committed by the leader; only this host has not caught up yet.
        self.wait_applied(index, timeout).await.map_err(|e| {
            Retry::Fail(ApiError::outcome_unknown(format!(
                "the change was made, but {}",
                e.message
            )))
        })?;
        Ok(responses)
    }

    /// Leader side of [`Transport::forward_write`].
    pub async fn serve_forwarded_write(
        &self,
        req: ForwardedWrite,
    ) -> Result<ForwardedWriteReply, ApiError> {
        match self.write_local(req.commands).await {
            Ok((responses, index)) => Ok(ForwardedWriteReply { responses, index }),
            Err(Retry::Fail(e)) => Err(e),
            Err(_) => Err(ApiError::new(
                novacron_types::ErrorCode::NotLeader,
                format!("{NOT_LEADER}; leader is {:?}", self.leader().map(|l| l.0)),
            )),
        }
    }

    /// Leader side of [`Transport::read_index`]: confirms leadership with a quorum.
    pub async fn serve_read_index(&self) -> Result<u64, ApiError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(read) => Ok(read.index()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => Err(
                ApiError::new(novacron_types::ErrorCode::NotLeader, NOT_LEADER.to_string()),
            ),
            Err(e) => Err(ApiError::unavailable(format!(
                "cannot confirm leadership with a quorum: {e}"
            ))),
        }
    }

    /// Makes the next local read linearizable: the leader confirms it still leads; a follower
    /// asks the leader for its commit index and waits until it has applied that far.
    pub async fn linearize(&self) -> Result<(), ApiError> {
        // A host that knows it is cut off says so instead of timing out.
        self.write_refused()?;
        let timeout = Duration::from_millis(self.settings.forward_timeout_ms);
        // Like writes, ride out a leader change (a transfer, an election) for a while.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.leaderless_wait_ms);
        let index = loop {
            let attempt = match self.leader() {
                Some((id, _)) if id == self.node_id.0 => match self.serve_read_index().await {
                    Ok(i) => Ok(i),
                    Err(e) if e.code == novacron_types::ErrorCode::NotLeader => Err(e),
                    Err(e) => return Err(e),
                },
                Some((_, addr)) => match self.transport.read_index(&addr, timeout).await {
                    Ok(i) => Ok(i),
                    Err(e @ TransportError::Unreachable { .. }) => Err(ApiError::unavailable(
                        format!("linearizable read failed: {e}"),
                    )),
                    Err(TransportError::Remote { message, .. })
                        if message.starts_with(NOT_LEADER) =>
                    {
                        Err(ApiError::unavailable(format!(
                            "linearizable read failed: {message}"
                        )))
                    }
                    Err(e) => {
                        return Err(ApiError::unavailable(format!(
                            "linearizable read failed: {e}"
                        )));
                    }
                },
                None => Err(ApiError::unavailable(
                    "no Raft leader is known (election in progress or no quorum); \
                     retry, or ask for a stale read",
                )),
            };
            match attempt {
                Ok(i) => break i,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => self.wait_leader_change(Duration::from_millis(50)).await,
            }
        };
        self.wait_applied(index, timeout).await
    }

    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ApiError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "catching up with the leader")
            .await
            .map(|_| ())
            .map_err(|e| ApiError::unavailable(format!("this host is behind the leader: {e}")))
    }

    async fn wait_leader_change(&self, at_most: Duration) {
        let mut rx = self.raft.server_metrics();
        let _ = tokio::time::timeout(at_most, rx.changed()).await;
    }

    /// The current leader's ID and address, as this node knows it.
    pub fn leader(&self) -> Option<(u64, NodeAddr)> {
        // On every write and read: borrow the server metrics, do not clone the whole set.
        let rx = self.raft.server_metrics();
        let m = rx.borrow_watched();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, addr))
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
        self.linearize().await?;
        Ok(self.read(f))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    /// The current term and the leader this node knows for it, from one snapshot of Raft's
    /// metrics (read apart, the two can belong to different terms around an election).
    pub fn term_and_leader(&self) -> (u64, Option<(u64, NodeAddr)>) {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader.and_then(|id| {
            m.membership_config
                .membership()
                .get_node(&id)
                .cloned()
                .map(|addr| (id, addr))
        });
        (m.current_term, leader)
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
            vote: m.vote.to_string(),
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

    /// Raft membership as this node knows it.
    pub fn membership(&self) -> MembershipView {
        let m = self.raft.metrics().borrow_watched().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let nodes: BTreeMap<u64, NodeAddr> = mem.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let learners = nodes
            .keys()
            .filter(|id| !voters.contains(id))
            .copied()
            .collect();
        MembershipView {
            voters,
            learners,
            nodes,
            joint: mem.get_joint_config().len() > 1,
            log_index: m.membership_config.log_id().map(|l| l.index).unwrap_or(0),
            committed: m.committed_membership_config.log_id() == m.membership_config.log_id(),
        }
    }

    /// On the leader: each member's last replicated log index, and how long ago each answered.
    pub fn replication(&self) -> Option<BTreeMap<u64, Replication>> {
        let m = self.raft.metrics().borrow_watched().clone();
        let repl = m.replication.as_ref()?;
        let hb = m.heartbeat.as_ref();
        Some(
            repl.iter()
                .map(|(id, matched)| {
                    let acked_ms_ago = hb.and_then(|h| h.get(id).cloned().flatten()).map(|t| {
                        use openraft::async_runtime::instant::Instant as _;
                        t.elapsed().as_millis() as u64
                    });
                    (
                        *id,
                        Replication {
                            matched: matched.map(|l| l.index),
                            acked_ms_ago,
                        },
                    )
                })
                .collect(),
        )
    }

    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub fn millis_since_quorum_ack(&self) -> Option<u64> {
        use openraft::async_runtime::instant::Instant as _;
        let acked = self.raft.metrics().borrow_watched().last_quorum_acked;
        acked.map(|t| t.elapsed().as_millis() as u64)
    }

    /// Adds a host as a non-voting member; replication to it starts at once.
    pub async fn add_learner(&self, id: u64, addr: NodeAddr) -> Result<(), ApiError> {
        self.raft
            .add_learner(id, addr, false)
            .await
            .map(|_| ())
            .map_err(membership_error)
    }

    /// Replaces the set of voters (every new voter must already be a learner). Removed voters stay
    /// as learners.
    pub async fn set_voters(&self, voters: BTreeSet<u64>) -> Result<(), ApiError> {
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
            .await
            .map(|_| ())
            .map_err(membership_error)
    }

    /// Takes hosts out of Raft membership entirely (voters are demoted first).
    pub async fn remove_members(&self, ids: BTreeSet<u64>) -> Result<(), ApiError> {
        let current = self.membership();
        let voters_left: BTreeSet<u64> = current.voters.difference(&ids).copied().collect();
        if voters_left.is_empty() {
            return Err(ApiError::conflict("cannot remove the last voter"));
        }
        if voters_left != current.voters {
            self.set_voters(voters_left).await?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map(|_| ())
            .map_err(membership_error)
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ApiError> {
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ApiError::unavailable(format!("leader transfer: {e}")))
    }

    pub async fn shutdown(&self) {
        // Closing the queue ends the batcher (and its handle on the store).
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("Raft shutdown: {e}");
        }
    }
}

/// Raft membership: who votes, who only replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipView {
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    pub nodes: BTreeMap<u64, NodeAddr>,
    /// A membership change is half done (joint consensus).
    pub joint: bool,
    pub log_index: u64,
    /// The latest membership is committed.
    pub committed: bool,
}

/// The leader's view of replication to one member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    pub matched: Option<u64>,
    pub acked_ms_ago: Option<u64>,
}

fn membership_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ApiError::new(
            novacron_types::ErrorCode::NotLeader,
            format!("{NOT_LEADER}; membership changes run on the leader"),
        ),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::conflict(format!("membership change refused: {e}"))
        }
        e => ApiError::unavailable(format!("membership change failed: {e}")),
    }
}

/// Marks an answer from a host that is not the leader, so the forwarder retries elsewhere.
const NOT_LEADER: &str = "this host is not the Raft leader";

/// Why a write did not go through, and whether it is safe to send it again.
#[derive(Debug)]
enum Retry {
    /// No leader known (election): nothing was sent.
    NoLeader,
    /// The host we sent to is no longer the leader and appended nothing.
    NotLeader,
    /// The leader could not be reached at all: nothing was delivered.
    LeaderUnreachable,
    /// Not retryable (rejected, or the outcome is unknown).
    Fail(ApiError),
}

impl Retry {
    fn into_error(self) -> ApiError {
        match self {
            Retry::Fail(e) => e,
            Retry::NoLeader | Retry::NotLeader => ApiError::unavailable(
                "no Raft leader could take the change (election in progress or no quorum); retry",
            ),
            Retry::LeaderUnreachable => ApiError::unavailable(
                "the Raft leader is unreachable from this host; the change was not made",
            ),
        }
    }
}

/// Server side: what a host does with a message that arrived for its Raft node.
impl StateHandle {
    pub async fn handle_raft(&self, req: RaftRequest) -> RaftReply {
        let raft = self.raft();
        let refused = |e: String| RaftReply::Refused { reason: e };
        match req {
            RaftRequest::Append(r) => match raft.append_entries(r).await {
                Ok(r) => RaftReply::Append(r),
                Err(e) => refused(e.to_string()),
            },
            RaftRequest::Vote(r) => match raft.vote(r).await {
                Ok(r) => RaftReply::Vote(r),
                Err(e) => refused(e.to_string()),
            },
            RaftRequest::PreVote(r) => match raft.pre_vote(r).await {
                Ok(r) => RaftReply::PreVote(r),
                Err(e) => refused(e.to_string()),
            },
            RaftRequest::TransferLeader(r) => match raft.handle_transfer_leader(r).await {
                Ok(r) => RaftReply::TransferLeader(r),
                Err(e) => refused(e.to_string()),
            },
        }
    }

    pub async fn handle_snapshot(
        &self,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMetaOf<TypeConfig>,
        data: Vec<u8>,
    ) -> Result<SnapshotResponse<TypeConfig>, String> {
        self.raft()
            .install_full_snapshot(
                vote,
                SnapshotOf::<TypeConfig, Vec<u8>> {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(|e| e.to_string())
    }
}
