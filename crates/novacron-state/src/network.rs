//! Raft transport: openraft's network traits on top of a [`Transport`] that carries whole
//! messages between hosts.
//!
//! The real transport is HTTP (in the server crate, so this crate knows nothing about HTTP);
//! [`crate::inprocess::InProcess`] connects nodes inside one process for fast tests and can cut links. Host-to-host
//! calls that are not Raft's own (forwarded writes, read-index requests) go through the same
//! trait, so forwarding works the same over both.

use std::future::Future;
use std::sync::Arc;
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
use crate::types::{NodeAddr, TypeConfig};

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
