//! The leader's membership manager: keeps Raft membership in line with the host records and
//! the voter plan. Runs on every host; acts only while its host leads.

use std::collections::BTreeSet;

use novacron_state::raft::NodeAddr;
use novacron_types::{ApiError, HostRole};

use super::Cluster;
use super::plan::{MemberFacts, plan_voters};

impl Cluster {
    /// One pass: removed hosts out, new hosts in as learners, then the voter set. Each pass
    /// makes at most one membership change (each waits for the previous to commit).
    pub async fn reconcile_membership(&self) -> Result<(), ApiError> {
        let me = self.node.0;
        if self.state.leader().map(|l| l.0) != Some(me) {
            return Ok(());
        }
        let mem = self.state.membership();
        if mem.joint || !mem.committed {
            return Ok(());
        }
        let (nodes, removed) = self
            .state
            .read(|s| (s.nodes.clone(), s.meta.removed_nodes.clone()));

        let gone: BTreeSet<u64> = mem
            .nodes
            .keys()
            .filter(|id| removed.contains(id))
            .copied()
            .collect();
        if gone.contains(&me) {
            // A leader cannot vote itself out safely; hand over first.
            if let Some(next) = mem.voters.iter().find(|v| **v != me && self.is_online(**v)) {
                tracing::info!(to = next, "this host was removed; transferring leadership");
                self.state.transfer_leader(*next).await?;
            }
            return Ok(());
        }
        if !gone.is_empty() {
            tracing::info!(?gone, "taking removed hosts out of Raft membership");
            return self.state.remove_members(gone).await;
        }

        for (id, n) in &nodes {
            if !mem.nodes.contains_key(id) {
                tracing::info!(node = id, addr = %n.api_address, "adding host as a learner");
                self.state
                    .add_learner(
                        *id,
                        NodeAddr {
                            api_addr: n.api_address.clone(),
                        },
                    )
                    .await?;
                return Ok(());
            }
        }

        let repl = self.state.replication().unwrap_or_default();
        let last = self.state.metrics().last_log_index;
        let facts: Vec<MemberFacts> = mem
            .nodes
            .keys()
            .map(|id| MemberFacts {
                id: *id,
                role: nodes.get(id).map(|n| n.role).unwrap_or(HostRole::Full),
                voter: mem.voters.contains(id),
                online: self.is_online(*id),
                caught_up: *id == me
                    || repl
                        .get(id)
                        .and_then(|r| r.matched)
                        .is_some_and(|m| m + self.settings.max_lag >= last),
            })
            .collect();
        if let Some(voters) = plan_voters(&facts, me, self.settings.target_voters) {
            tracing::info!(from = ?mem.voters, to = ?voters, "changing the voter set");
            self.state.set_voters(voters).await?;
        }
        Ok(())
    }
}

/// Runs for the life of the host.
pub async fn run(cluster: std::sync::Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = cluster.reconcile_membership().await {
            tracing::warn!("membership: {}", e.message);
        }
    }
}
