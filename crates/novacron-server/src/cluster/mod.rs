//! The cluster: how hosts find, trust, watch and fence each other.
//!
//! - [`transport`]: host-to-host HTTP (Raft messages, forwarded writes, heartbeats), each call
//!   carrying the shared cluster secret.
//! - [`plan`]: pure voter-set decisions; [`manager`] (leader only) applies them and keeps Raft
//!   membership in line with the host records.
//! - [`lease`]: every host renews a lease through the quorum; a host that cannot is `isolated`,
//!   refuses writes and fences its VMs before its lease could lapse (ARCHITECTURE.md has the
//!   timing argument). The leader remembers when it last heard from each host, which is when
//!   another host may safely take over that host's VMs.
//! - [`identity`]: the node ID, role and cluster secret a host keeps in its data dir.
//!
//! Invariants: nothing here decides about a VM's desired state; membership follows the host
//! records in the replicated state (a removed host never comes back under its old ID).

pub mod host;
pub mod identity;
pub mod lease;
pub mod manager;
pub mod plan;
pub mod status;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use novacron_state::StateHandle;
use novacron_types::{HostRole, NodeId};

pub use identity::Identity;
pub use transport::HttpTransport;

/// What an isolated host does to its VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FenceAction {
    /// Pause every VM (resumable once the host is back, if nobody took the VM over).
    #[default]
    Pause,
    /// Kill every VM's QEMU.
    Stop,
    /// Do nothing (only safe without HA).
    None,
}

impl std::str::FromStr for FenceAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(Self::Pause),
            "stop" => Ok(Self::Stop),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown fencing action '{other}' (expected pause, stop or none)"
            )),
        }
    }
}

/// Timings and targets of the cluster layer.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// How often each host renews its lease (and reports its inventory) with the leader.
    pub heartbeat: Duration,
    /// A host not heard from for this long is `offline`.
    pub offline_after: Duration,
    /// A host's lease: it fences itself before this much time has passed since its last renewal
    /// was sent; the cluster waits this plus `ha_margin` since it last heard from the host
    /// before its VMs may run elsewhere.
    pub lease: Duration,
    /// Part of the lease kept for fencing: a host declares itself isolated at
    /// `lease - fence_budget` after its last renewal.
    pub fence_budget: Duration,
    /// Extra wait, beyond a lease, for clock-rate differences between hosts.
    pub ha_margin: Duration,
    pub fencing: FenceAction,
    /// Voters the cluster aims for (3 or 5).
    pub target_voters: usize,
    /// A learner within this many entries of the leader counts as caught up.
    pub max_lag: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(1000),
            offline_after: Duration::from_secs(10),
            lease: Duration::from_secs(6),
            fence_budget: Duration::from_secs(2),
            ha_margin: Duration::from_secs(2),
            fencing: FenceAction::Pause,
            target_voters: 3,
            max_lag: 100,
        }
    }
}

impl ClusterSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat.is_zero() || self.heartbeat * 2 > self.lease {
            return Err("the lease must be at least two heartbeats long".into());
        }
        if self.fence_budget >= self.lease {
            return Err("the fencing budget must be shorter than the lease".into());
        }
        if !(1..=7).contains(&self.target_voters) {
            return Err("target voters must be between 1 and 7 (3 or 5 recommended)".into());
        }
        Ok(())
    }

    /// How long after its last renewal a host declares itself isolated.
    pub fn isolate_after(&self) -> Duration {
        self.lease - self.fence_budget
    }

    /// A host the leader has not heard from for this long (three heartbeats: 3 s by default)
    /// is not offered to new VMs, migrations or HA restarts, even before it is `offline`.
    pub fn placement_silence(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// A host's report to the leader, sent with every lease renewal.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub node: NodeId,
    pub inventory: Inventory,
    /// Peers this host reached with its last ping (`true`) or not.
    pub reach: BTreeMap<u64, bool>,
    pub applied_index: u64,
    pub isolated: bool,
    /// The lease this host fences by (a host configured with a longer lease than the leader's
    /// must be waited for by its own).
    #[serde(default)]
    pub lease_ms: u64,
}

/// What a host has, reported with each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Inventory {
    pub cpus: u32,
    pub memory_mib: u64,
    pub memory_available_mib: u64,
    /// Free bytes per storage pool this host can use (`data`: its data directory's file
    /// system).
    pub disk_free_bytes: BTreeMap<String, u64>,
    pub qemu_version: String,
    pub accelerator: String,
    /// The CPU's model name (guests under KVM use the host's CPU model).
    #[serde(default)]
    pub cpu_model: String,
    /// 1-minute load average.
    pub load1: f64,
    pub vms_running: u32,
}

/// The leader's answer to a heartbeat: the lease is renewed from the moment the heartbeat was
/// sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub leader: NodeId,
    pub term: u64,
    pub lease_ms: u64,
}

/// What the leader last heard from a host.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    beat: Heartbeat,
}

/// The leader's table of hosts: last heartbeat and inventory. Lives in memory only; a new
/// leader starts with an empty table and a grace period.
#[derive(Default)]
struct HostTable {
    /// The term this table belongs to; a new term starts a new table.
    term: u64,
    leader_since: Option<Instant>,
    seen: HashMap<u64, Seen>,
}

/// This host's own view: its lease, isolation, and which peers answer.
#[derive(Default)]
struct LocalView {
    /// When the last renewal that was granted had been sent.
    renewed_at: Option<Instant>,
    isolated_since: Option<Instant>,
    /// Wall-clock time (ms) at which this host fenced its VMs, and what it did.
    fenced: Vec<FenceRecord>,
    /// VMs paused by the last fencing, to resume once the host is back (if still its own).
    paused_by_fence: Vec<novacron_types::VmId>,
    reach: BTreeMap<u64, PeerReach>,
}

/// One fencing of this host's VMs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FenceRecord {
    /// Unix milliseconds when fencing finished.
    pub at: i64,
    /// Unix milliseconds when this host's lease ran out (fencing must come first).
    pub lease_expiry: i64,
    pub action: FenceAction,
    /// Names of the VMs fenced.
    pub vms: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PeerReach {
    pub reachable: bool,
    /// Round trip of the last successful ping, in microseconds.
    pub rtt_us: Option<u64>,
    /// Milliseconds since the last successful ping.
    pub last_ok_ms_ago: Option<u64>,
    #[serde(skip)]
    last_ok: Option<Instant>,
}

/// The cluster layer of one host.
pub struct Cluster {
    pub node: NodeId,
    pub role: HostRole,
    pub settings: ClusterSettings,
    pub transport: HttpTransport,
    pub api_address: String,
    state: StateHandle,
    started: Instant,
    hosts: Mutex<HostTable>,
    local: Mutex<LocalView>,
}

impl Cluster {
    pub fn new(
        identity: &Identity,
        api_address: String,
        settings: ClusterSettings,
        transport: HttpTransport,
        state: StateHandle,
    ) -> Self {
        Self {
            node: NodeId(identity.node_id),
            role: identity.role,
            settings,
            transport,
            api_address,
            state,
            started: Instant::now(),
            hosts: Mutex::default(),
            local: Mutex::default(),
        }
    }

    pub fn secret(&self) -> &str {
        self.transport.secret()
    }

    /// Whether `given` is the cluster secret (constant-time).
    pub fn secret_matches(&self, given: &[u8]) -> bool {
        let want = self.secret().as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HostTable> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalView> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leader side: records a heartbeat received now.
    fn record_heartbeat(&self, beat: Heartbeat) {
        let term = self.state.metrics().term;
        let mut t = self.hosts();
        if t.term != term || t.leader_since.is_none() {
            *t = HostTable {
                term,
                leader_since: Some(Instant::now()),
                seen: HashMap::new(),
            };
        }
        t.seen.insert(
            beat.node.0,
            Seen {
                at: Instant::now(),
                beat,
            },
        );
    }

    /// Leader side: when this leader last heard from `node` (or, if never, when it became
    /// leader: a host may hold a lease granted by the previous leader until then). A table
    /// from an earlier term of this host's is dropped first: what it heard then says nothing of
    /// the leases other leaders granted since.
    pub fn last_heard(&self, node: u64) -> Option<Instant> {
        let term = self.state.metrics().term;
        let mut t = self.hosts();
        if t.term != term {
            *t = HostTable {
                term,
                leader_since: Some(Instant::now()),
                seen: HashMap::new(),
            };
        }
        let since = t.leader_since?;
        Some(t.seen.get(&node).map(|s| s.at.max(since)).unwrap_or(since))
    }

    /// Leader side: the earliest moment another host may run `node`'s VMs: its lease can
    /// have been renewed no later than when the leader last heard from it, and runs for the
    /// longer of this host's lease and the one it reported.
    pub fn lease_safe_after(&self, node: u64) -> Option<Instant> {
        let heard = self.last_heard(node)?;
        let reported = self
            .hosts()
            .seen
            .get(&node)
            .map(|s| Duration::from_millis(s.beat.lease_ms))
            .unwrap_or_default();
        let lease = self.settings.lease.max(reported);
        let margin = self.settings.ha_margin.max(reported / 3);
        Some(heard + lease + margin)
    }

    /// This host's own lease: how long it still holds (zero when isolated or never renewed).
    /// Starting a guest that another host might take over needs some of it left.
    pub fn lease_left(&self) -> Duration {
        let l = self.local();
        if l.isolated_since.is_some() {
            return Duration::ZERO;
        }
        l.renewed_at
            .map(|r| (r + self.settings.isolate_after()).saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Leader side: is `node` online (heard from recently, or still in the new leader's grace
    /// period)?
    pub fn is_online(&self, node: u64) -> bool {
        if node == self.node.0 {
            return true;
        }
        self.last_heard(node)
            .is_some_and(|t| t.elapsed() < self.settings.offline_after)
    }

    pub fn is_isolated(&self) -> bool {
        self.local().isolated_since.is_some()
    }

    /// The VMs the last fencing paused (taken: each is resumed at most once).
    pub fn take_paused_by_fence(&self) -> Vec<novacron_types::VmId> {
        std::mem::take(&mut self.local().paused_by_fence)
    }

    pub fn fence_records(&self) -> Vec<FenceRecord> {
        self.local().fenced.clone()
    }

    fn reach_snapshot(&self) -> BTreeMap<u64, PeerReach> {
        let mut r = self.local().reach.clone();
        for p in r.values_mut() {
            p.last_ok_ms_ago = p.last_ok.map(|t| t.elapsed().as_millis() as u64);
        }
        r
    }

    /// Wall-clock ms of "now + d" (for reports; decisions use monotonic time).
    fn wall_in(d: Duration) -> i64 {
        novacron_types::now_millis() + d.as_millis() as i64
    }
}
