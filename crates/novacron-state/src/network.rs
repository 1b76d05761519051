//! Raft transport. A single-node cluster never sends an RPC; [`UnreachableNetwork`] is the
//! transport until hosts talk to each other (the cluster issue adds the HTTP transport), and it
//! answers every call with `Unreachable` so openraft backs off instead of failing.

use std::future::Future;

use openraft::OptionalSend;
use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};

use crate::raft::{NodeAddr, TypeConfig};

type C = TypeConfig;

#[derive(Clone, Default)]
pub struct UnreachableNetwork;

#[derive(Debug, thiserror::Error)]
#[error("node {0} is unreachable: this build has no host-to-host transport yet")]
struct NoTransport(u64);

pub struct UnreachableClient {
    target: u64,
}

impl RaftNetworkFactory<C> for UnreachableNetwork {
    type Network = UnreachableClient;

    async fn new_client(&mut self, target: u64, _node: &NodeAddr) -> UnreachableClient {
        UnreachableClient { target }
    }
}

impl RaftNetworkV2<C> for UnreachableClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<C>,
        _snapshot: SnapshotOf<C, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        Err(StreamingError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }
}
