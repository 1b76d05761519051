//! Nodes in one process, for tests: [`InProcess`] hands each message to the target's
//! [`StateHandle`] directly, and can cut links one way to simulate partitions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::raft::SnapshotResponse;
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};

use crate::network::{
    ForwardedWrite, ForwardedWriteReply, RaftReply, RaftRequest, Transport, TransportError,
};
use crate::raft::StateHandle;
use crate::types::{NodeAddr, TypeConfig as C};

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
