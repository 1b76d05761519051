//! `GET /api/v1/cluster`: every member with its role, health, Raft progress, inventory and
//! which peers it reaches, as the leader sees it (or as one host sees it when there is no
//! leader to ask).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use novacron_types::{HostRole, NodeId};

use super::{Cluster, FenceRecord, Inventory, PeerReach};

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaderRef {
    pub id: NodeId,
    pub api_address: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberStatus {
    pub id: NodeId,
    pub name: String,
    /// `voter`, `learner` or `witness` (a witness host, voting or not: see `voting`).
    pub role: String,
    pub voting: bool,
    pub host_role: HostRole,
    pub api_address: String,
    /// `online`, `offline`, `isolated` (reports it lost its lease) or `joining` (not yet a
    /// Raft member).
    pub health: String,
    /// Last log index the leader knows this member has.
    pub matched_index: Option<u64>,
    /// How far behind the leader's log it is.
    pub lag: Option<u64>,
    /// What it reported it has applied.
    pub applied_index: Option<u64>,
    pub last_heartbeat_ms_ago: Option<u64>,
    /// On the leader: milliseconds since it last heard from the host, counting from when it
    /// became leader for a host it has not heard from since. Placement offers only hosts heard
    /// from within a few heartbeats.
    #[serde(default)]
    pub last_heard_ms_ago: Option<u64>,
    /// Milliseconds until another host may take over its VMs (0: already may).
    pub takeover_safe_in_ms: Option<u64>,
    pub inventory: Option<Inventory>,
    /// Which peers it reached with its last ping.
    pub reaches: BTreeMap<u64, bool>,
}

/// The reporting host's own view.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LocalStatus {
    pub node: NodeId,
    pub isolated: bool,
    pub raft_role: String,
    pub term: u64,
    /// The vote this host holds (`<T3-N2:Q>`: term 3, for host 2, committed).
    #[serde(default)]
    pub vote: String,
    /// The last index in this host's log (applied or not).
    #[serde(default)]
    pub last_log_index: u64,
    pub applied_index: u64,
    /// How much of its lease this host still holds, in milliseconds.
    #[serde(default)]
    pub lease_left_ms: u64,
    /// Last log index covered by this host's snapshot (built here or installed from the leader).
    pub snapshot_index: Option<u64>,
    pub reaches: BTreeMap<u64, PeerReach>,
    pub fenced: Vec<FenceRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    pub leader: Option<LeaderRef>,
    pub term: u64,
    /// The leader hears from a majority of voters.
    pub quorum: bool,
    pub voters: usize,
    pub target_voters: usize,
    /// Which host assembled this view (the leader, unless it could not be reached).
    pub reported_by: NodeId,
    pub members: Vec<MemberStatus>,
    pub local: LocalStatus,
}

impl Cluster {
    pub fn local_status(&self) -> LocalStatus {
        let m = self.state.metrics();
        LocalStatus {
            node: self.node,
            isolated: self.is_isolated(),
            raft_role: m.role,
            term: m.term,
            vote: m.vote,
            last_log_index: m.last_log_index,
            applied_index: m.applied_index,
            lease_left_ms: self.lease_left().as_millis() as u64,
            snapshot_index: m.snapshot_index,
            reaches: self.reach_snapshot(),
            fenced: self.fence_records(),
        }
    }

    /// The status as this host knows it. Complete on the leader; elsewhere the per-member
    /// health and progress fields are left empty.
    pub fn status(&self) -> ClusterStatus {
        let me = self.node.0;
        let metrics = self.state.metrics();
        let is_leader = metrics.role == "leader";
        let mem = self.state.membership();
        let nodes = self.state.read(|s| s.nodes.clone());
        let repl = self.state.replication().unwrap_or_default();
        let seen: BTreeMap<u64, (u64, super::Heartbeat)> = {
            let t = self.hosts();
            t.seen
                .iter()
                .map(|(id, s)| (*id, (s.at.elapsed().as_millis() as u64, s.beat.clone())))
                .collect()
        };
        let ids: BTreeSet<u64> = mem.nodes.keys().chain(nodes.keys()).copied().collect();
        let members = ids
            .into_iter()
            .map(|id| {
                let info = nodes.get(&id);
                let host_role = info.map(|n| n.role).unwrap_or_default();
                let voting = mem.voters.contains(&id);
                let role = if host_role == HostRole::Witness {
                    "witness"
                } else if voting {
                    "voter"
                } else {
                    "learner"
                };
                let beat = seen.get(&id);
                let health = if !mem.nodes.contains_key(&id) {
                    "joining"
                } else if (id == me && self.is_isolated()) || beat.is_some_and(|(_, b)| b.isolated)
                {
                    "isolated"
                } else if !is_leader && id != me {
                    "unknown"
                } else if self.is_online(id) {
                    "online"
                } else {
                    "offline"
                };
                let matched = if id == me && is_leader {
                    Some(metrics.last_log_index)
                } else {
                    repl.get(&id).and_then(|r| r.matched)
                };
                MemberStatus {
                    id: NodeId(id),
                    name: info.map(|n| n.name.clone()).unwrap_or_default(),
                    role: role.to_string(),
                    voting,
                    host_role,
                    api_address: info
                        .map(|n| n.api_address.clone())
                        .or_else(|| mem.nodes.get(&id).map(|a| a.api_addr.clone()))
                        .unwrap_or_default(),
                    health: health.to_string(),
                    matched_index: matched,
                    lag: matched
                        .filter(|_| is_leader)
                        .map(|m| metrics.last_log_index.saturating_sub(m)),
                    applied_index: if id == me {
                        Some(metrics.applied_index)
                    } else {
                        beat.map(|(_, b)| b.applied_index)
                    },
                    last_heartbeat_ms_ago: beat.map(|(ago, _)| *ago),
                    last_heard_ms_ago: is_leader
                        .then(|| self.last_heard(id))
                        .flatten()
                        .map(|t| t.elapsed().as_millis() as u64),
                    takeover_safe_in_ms: is_leader
                        .then(|| self.lease_safe_after(id))
                        .flatten()
                        .map(|t| {
                            t.saturating_duration_since(std::time::Instant::now())
                                .as_millis() as u64
                        }),
                    inventory: beat.map(|(_, b)| b.inventory.clone()),
                    reaches: if id == me {
                        self.reach_snapshot()
                            .into_iter()
                            .map(|(p, r)| (p, r.reachable))
                            .collect()
                    } else {
                        beat.map(|(_, b)| b.reach.clone()).unwrap_or_default()
                    },
                }
            })
            .collect();
        // A leader that is the only voter is its own quorum: openraft records no
        // acknowledgement from anyone else, and needs none to commit.
        let sole_voter = mem.voters.len() == 1 && mem.voters.contains(&me);
        let quorum = is_leader
            && (sole_voter
                || self
                    .state
                    .millis_since_quorum_ack()
                    .is_some_and(|ms| ms < self.settings.heartbeat.as_millis() as u64 * 2));
        // The term and its leader from one snapshot: read apart, a host in mid-election could
        // report the new term with the old leader (one term, two leaders, to a reader).
        let (term, leader) = self.state.term_and_leader();
        ClusterStatus {
            leader: leader.map(|(id, addr)| LeaderRef {
                id: NodeId(id),
                api_address: nodes
                    .get(&id)
                    .map(|n| n.api_address.clone())
                    .unwrap_or(addr.api_addr),
            }),
            term,
            quorum,
            voters: mem.voters.len(),
            target_voters: self.settings.target_voters,
            reported_by: self.node,
            members,
            local: self.local_status(),
        }
    }
}
