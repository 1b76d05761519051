//! Raft transport: openraft's network traits on top of a [`Transport`] that carries whole
//! messages between hosts.
//!
//! The real transport is HTTP (in the server crate, so this crate knows nothing about HTTP);
//! [`InProcess`] connects nodes inside one process for fast tests and can cut links. Host-to-host
//! calls that are not Raft's own (forwarded writes, read-index requests) go through the same
//! trait, so forwarding works the same over both.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::OptionalSend;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
use crate::raft::{NodeAddr, StateHandle, TypeConfig};

type C = TypeConfig;

/// One Raft message, as sent between hosts.
#[derive(Debug, Serialize, Deserialize)]
// Externally tagged: an internally tagged enum buffers its content, and buffered maps lose
// their integer keys (membership is keyed by node ID).
#[serde(rename_all = "snake_case")]
pub enum RaftRequest {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    PreVote(VoteRequest<C>),
    TransferLeader(TransferLeaderRequest<C>),
}

#[derive(Debug, Serialize, Deserialize)]
// Externally tagged: an internally tagged enum buffers its content, and buffered maps lose
// their integer keys (membership is keyed by node ID).
#[serde(rename_all = "snake_case")]
pub enum RaftReply {
    Append(AppendEntriesResponse<C>),
    Vote(VoteResponse<C>),
    PreVote(VoteResponse<C>),
    TransferLeader(TransferLeaderResponse<C>),
    /// The receiving node could not handle the message (shutting down, not started yet).
    Refused {
        reason: String,
    },
}

/// Writes a follower forwards to the leader, and what the leader answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedWrite {
    pub commands: Vec<Command>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedWriteReply {
    /// One response per command, in order.
    pub responses: Vec<CommandResponse>,
    /// Log index of the last command: the forwarder waits until it has applied this far, so a
    /// client sees its own write on the host it wrote through.
    pub index: u64,
}

/// Why a host-to-host call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Nothing was delivered (connection refused, link cut): safe to retry elsewhere.
    #[error("host {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The request may have been delivered; its outcome is unknown.
    #[error("no answer from {addr} within {timeout_ms} ms (the request may have been applied)")]
    Timeout { addr: String, timeout_ms: u64 },
    /// The peer answered with an error.
    #[error("{addr} answered: {message}")]
    Remote {
        addr: String,
        status: u16,
        message: String,
    },
}

/// Carries messages to other hosts. Implementations: HTTP (server crate), [`InProcess`].
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn raft(
        &self,
        target: &NodeAddr,
        req: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftReply, TransportError>;

    /// Sends a full snapshot. Implementations stream `data` rather than sending one buffer.
    async fn snapshot(
        &self,
        target: &NodeAddr,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<C>, TransportError>;

    async fn forward_write(
        &self,
        leader: &NodeAddr,
        req: ForwardedWrite,
        timeout: Duration,
    ) -> Result<ForwardedWriteReply, TransportError>;

    /// Asks the leader for a read index (it confirms its leadership with a quorum first).
    async fn read_index(&self, leader: &NodeAddr, timeout: Duration)
    -> Result<u64, TransportError>;
}

/// openraft's network factory over a [`Transport`].
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
}

impl Network {
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }
}

pub struct Client {
    transport: Arc<dyn Transport>,
    target: u64,
    addr: NodeAddr,
}

impl RaftNetworkFactory<C> for Network {
    type Network = Client;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Client {
        Client {
            transport: self.transport.clone(),
            target,
            addr: node.clone(),
        }
    }
}

fn rpc_error(e: TransportError) -> RPCError<C> {
    match e {
        TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(target: u64, reply: RaftReply) -> RPCError<C> {
    let reason = match reply {
        RaftReply::Refused { reason } => reason,
        other => format!("mismatched reply {other:?}"),
    };
    // A node that refuses (starting, stopping) is treated as unreachable so openraft backs off.
    RPCError::Unreachable(Unreachable::new(&TransportError::Unreachable {
        addr: format!("node {target}"),
        reason,
    }))
}

impl Client {
    /// Sends one Raft message and takes the matching reply apart.
    async fn call<T>(
        &self,
        req: RaftRequest,
        option: RPCOption,
        take: fn(RaftReply) -> Result<T, RaftReply>,
    ) -> Result<T, RPCError<C>> {
        let reply = self
            .transport
            .raft(&self.addr, req, option.hard_ttl())
            .await
            .map_err(rpc_error)?;
        take(reply).map_err(|other| unexpected(self.target, other))
    }
}

impl RaftNetworkV2<C> for Client {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.call(RaftRequest::Append(rpc), option, |r| match r {
            RaftReply::Append(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(RaftRequest::Vote(rpc), option, |r| match r {
            RaftReply::Vote(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(RaftRequest::PreVote(rpc), option, |r| match r {
            RaftReply::PreVote(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.call(RaftRequest::TransferLeader(req), option, |r| match r {
            RaftReply::TransferLeader(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        // Snapshots may be large: give them far longer than a heartbeat.
        let timeout = option.hard_ttl().max(Duration::from_secs(60));
        let send =
            self.transport
                .snapshot(&self.addr, vote, snapshot.meta, snapshot.snapshot, timeout);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(|e| StreamingError::from(rpc_error(e))),
        }
    }

    fn backoff(&self) -> Option<Backoff> {
        // A dead host is retried every 200 ms at first, then every second: it comes back
        // promptly after a restart without flooding the log while it is down.
        Some(Backoff::new((0..).map(|i: u32| {
            Duration::from_millis(200u64.saturating_mul(1 << i.min(3)).min(1000))
        })))
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
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: Vec<u8>,
    ) -> Result<SnapshotResponse<C>, String> {
        self.raft()
            .install_full_snapshot(
                vote,
                SnapshotOf::<C, Vec<u8>> {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(|e| e.to_string())
    }
}

/// Nodes in one process, for tests: messages are handed to the target's [`StateHandle`]
/// directly. Links can be cut one way (`from` cannot reach `to`) to simulate partitions.
#[derive(Clone, Default)]
pub struct InProcess {
    inner: Arc<Mutex<InProcessInner>>,
}

#[derive(Default)]
struct InProcessInner {
    nodes: HashMap<String, StateHandle>,
    /// (from address, to address) pairs that drop messages.
    cut: HashSet<(String, String)>,
}

/// One node's view of an [`InProcess`] network (it knows its own address, so cuts apply).
#[derive(Clone)]
pub struct InProcessPort {
    net: InProcess,
    me: String,
}

impl InProcess {
    pub fn port(&self, me: &str) -> InProcessPort {
        InProcessPort {
            net: self.clone(),
            me: me.to_string(),
        }
    }

    pub fn register(&self, addr: &str, node: StateHandle) {
        self.lock().nodes.insert(addr.to_string(), node);
    }

    pub fn unregister(&self, addr: &str) {
        self.lock().nodes.remove(addr);
    }

    /// Cuts both directions between `a` and every address in `others`.
    pub fn isolate(&self, a: &str, others: &[&str]) {
        let mut g = self.lock();
        for o in others {
            g.cut.insert((a.to_string(), o.to_string()));
            g.cut.insert((o.to_string(), a.to_string()));
        }
    }

    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InProcessInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl InProcessPort {
    fn target(&self, to: &NodeAddr) -> Result<StateHandle, TransportError> {
        let g = self.net.lock();
        let unreachable = |reason: &str| TransportError::Unreachable {
            addr: to.api_addr.clone(),
            reason: reason.into(),
        };
        if g.cut.contains(&(self.me.clone(), to.api_addr.clone())) {
            return Err(unreachable("link cut"));
        }
        g.nodes
            .get(&to.api_addr)
            .cloned()
            .ok_or_else(|| unreachable("not running"))
    }

    /// A reply that cannot travel back is lost: the caller sees a timeout, not an error.
    fn reply_lost(&self, to: &NodeAddr) -> bool {
        self.net
            .lock()
            .cut
            .contains(&(to.api_addr.clone(), self.me.clone()))
    }
}

#[async_trait::async_trait]
impl Transport for InProcessPort {
    async fn raft(
        &self,
        target: &NodeAddr,
        req: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftReply, TransportError> {
        let node = self.target(target)?;
        let reply = tokio::time::timeout(timeout, node.handle_raft(req))
            .await
            .map_err(|_| TransportError::Timeout {
                addr: target.api_addr.clone(),
                timeout_ms: timeout.as_millis() as u64,
            })?;
        if self.reply_lost(target) {
            return Err(TransportError::Timeout {
                addr: target.api_addr.clone(),
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        Ok(reply)
    }

    async fn snapshot(
        &self,
        target: &NodeAddr,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: Vec<u8>,
        _timeout: Duration,
    ) -> Result<SnapshotResponse<C>, TransportError> {
        let node = self.target(target)?;
        node.handle_snapshot(vote, meta, data)
            .await
            .map_err(|message| TransportError::Remote {
                addr: target.api_addr.clone(),
                status: 500,
                message,
            })
    }

    async fn forward_write(
        &self,
        leader: &NodeAddr,
        req: ForwardedWrite,
        _timeout: Duration,
    ) -> Result<ForwardedWriteReply, TransportError> {
        let node = self.target(leader)?;
        node.serve_forwarded_write(req)
            .await
            .map_err(|e| TransportError::Remote {
                addr: leader.api_addr.clone(),
                status: 503,
                message: e.message,
            })
    }

    async fn read_index(
        &self,
        leader: &NodeAddr,
        _timeout: Duration,
    ) -> Result<u64, TransportError> {
        let node = self.target(leader)?;
        node.serve_read_index()
            .await
            .map_err(|e| TransportError::Remote {
                addr: leader.api_addr.clone(),
                status: 503,
                message: e.message,
            })
    }
}
