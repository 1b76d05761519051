//! The service layer: every API (REST today; GraphQL and the CLI's future transports later) calls
//! these functions and nothing else. Handlers parse and format; the rules live here.
//!
//! Invariants: every change to desired state goes through [`StateHandle::propose`]; every VM
//! action on this host goes through the [`Hypervisor`] trait; a VM has at most one action in
//! flight (its lock), and an action that cannot apply in the VM's current state is a 409 before
//! anything starts.

mod cluster;
pub mod ha;
mod images;
mod migration;
mod ops;
mod pools;
pub mod stats;
pub mod tiering;
mod users;
mod vms;
pub mod volumes;

pub use cluster::{JoinReply, JoinRequest, JoinTokenCreated, JoinTokenRequest};
pub use migration::{ColdCopied, ColdRequest, IncomingRequest, MigrationSettings};
pub use ops::{OpCtx, OperationFilter};
pub use vms::{ConsoleChunk, VmAction, VmFilter, read_console};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novacron_hypervisor::{HvError, Hypervisor};
use novacron_state::StateHandle;
use novacron_types::{ApiError, ErrorCode, NodeId, VmId};

use crate::cluster::Cluster;
use crate::metrics::Metrics;

/// Tunables of the service layer.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// How long a graceful stop waits for the guest before forcing QEMU to quit.
    pub shutdown_timeout: Duration,
    /// Lifetime of a login session.
    pub session_ttl: Duration,
    /// How this host chooses among hosts that fit, when a request does not say.
    pub placement: novacron_types::PlacementStrategy,
    pub migration: MigrationSettings,
    /// How often the collector samples every running VM's disk counters.
    pub stats_interval: Duration,
    /// Finished operations are kept this long ...
    pub operations_retention: Duration,
    /// ... and at most this many of them (the oldest go first).
    pub operations_max: u64,
    /// A VM's console log is rotated (to `console.log.1`) once it grows past this size.
    pub console_max_bytes: u64,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            placement: Default::default(),
            migration: MigrationSettings::default(),
            stats_interval: Duration::from_secs(10),
            operations_retention: Duration::from_secs(7 * 24 * 3600),
            operations_max: 10_000,
            console_max_bytes: 4 << 20,
        }
    }
}

pub(crate) struct Inner {
    pub state: StateHandle,
    pub cluster: Arc<Cluster>,
    pub data_dir: PathBuf,
    pub hv: Arc<dyn Hypervisor>,
    pub node: NodeId,
    pub images_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub settings: ServiceSettings,
    vm_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    /// Password checks in flight.
    login_permits: Arc<tokio::sync::Semaphore>,
    /// How long a password check takes here (a moving average, microseconds): a login for a
    /// name that does not exist waits as long, without hashing.
    pub(crate) hash_micros: std::sync::atomic::AtomicU64,
    migrations: migration::Migrations,
    ha_retries: Mutex<ha::HaRetries>,
    pool_probe: Mutex<pools::PoolProbe>,
    io_stats: Mutex<novacron_tiering::series::Store>,
    moves: volumes::Moves,
    tiering: Mutex<tiering::Tiering>,
}

/// The application. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub(crate) inner: Arc<Inner>,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: StateHandle,
        cluster: Arc<Cluster>,
        hv: Arc<dyn Hypervisor>,
        data_dir: PathBuf,
        images_dir: PathBuf,
        metrics: Arc<Metrics>,
        settings: ServiceSettings,
    ) -> Self {
        let node = state.node_id();
        Self {
            inner: Arc::new(Inner {
                state,
                cluster,
                data_dir,
                hv,
                node,
                images_dir,
                metrics,
                vm_locks: Mutex::new(HashMap::new()),
                login_permits: Arc::new(tokio::sync::Semaphore::new(4)),
                hash_micros: std::sync::atomic::AtomicU64::new(50_000),
                migrations: migration::Migrations::new(&settings.migration),
                ha_retries: Mutex::default(),
                pool_probe: Mutex::default(),
                io_stats: Mutex::new(novacron_tiering::series::Store::new(
                    settings.stats_interval.as_secs().max(1),
                )),
                moves: Default::default(),
                tiering: Mutex::default(),
                settings,
            }),
        }
    }

    pub fn state(&self) -> &StateHandle {
        &self.inner.state
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.data_dir
    }

    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.inner.hv
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// The VM's action lock (one per VM, made on first use).
    fn vm_lock(&self, id: VmId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .vm_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        locks.entry(id).or_default().clone()
    }

    /// The VM's action lock, waiting for it (for clean-ups that must happen, after whatever
    /// holds it).
    async fn lock_vm_waiting(&self, id: VmId) -> tokio::sync::OwnedMutexGuard<()> {
        self.vm_lock(id).lock_owned().await
    }

    /// Takes the VM's action lock, or explains that another action is running.
    fn lock_vm(&self, id: VmId, name: &str) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        let lock = self.vm_lock(id);
        lock.try_lock_owned().map_err(|_| {
            // A volume move holds the lock for as long as it copies: say which.
            let moving = self.inner.state.read(|s| {
                s.volumes_of(id)
                    .into_iter()
                    .find_map(|v| Some((v.name.clone(), v.moving_to.clone()?)))
            });
            match moving {
                Some((vol, to)) => ApiError::conflict(format!(
                    "VM '{name}' has volume '{vol}' moving to pool '{to}'; wait for the move, or \
                     cancel its volume.move operation (DELETE /api/v1/operations/{{id}})"
                ))
                .with_reason("volume_moving"),
                None => ApiError::conflict(format!(
                    "VM '{name}' already has an action in progress; wait for it"
                )),
            }
        })
    }
}

/// Maps a driver error to what a client sees.
pub(crate) fn hv_error(e: HvError) -> ApiError {
    match e {
        HvError::NotRunning(_)
        | HvError::AlreadyRunning(_)
        | HvError::WrongState { .. }
        | HvError::Unsupported(_)
        | HvError::Missing(_) => ApiError::conflict(e.to_string()),
        HvError::Timeout { .. } => ApiError::new(ErrorCode::Timeout, e.to_string()),
        HvError::StartFailed(_) | HvError::Qmp { .. } | HvError::Disk { .. } | HvError::Io(_) => {
            ApiError::internal(e.to_string())
        }
    }
}

impl Service {
    /// Hosts by ID, a page at a time.
    pub async fn list_nodes(
        &self,
        page: &novacron_types::PageRequest,
    ) -> Result<novacron_types::Page<novacron_types::NodeInfo>, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| {
                page.page(s.nodes.values(), |n| n.id.0)
                    .map(|p| p.map(|n| n.clone()))
            })
            .await?
    }

    /// Fills the gauges that mirror state, right before a scrape.
    pub fn refresh_gauges(&self) {
        let m = &self.inner.metrics;
        let counts = self.inner.state.read(|s| {
            let mut counts = std::collections::HashMap::new();
            for vm in s.vms.values() {
                *counts.entry(vm.state).or_insert(0i64) += 1;
            }
            counts
        });
        for state in novacron_types::VmState::ALL {
            m.vms
                .get_or_create(&crate::metrics::StateLabels {
                    state: state.as_str().to_string(),
                })
                .set(counts.get(&state).copied().unwrap_or(0));
        }
        let r = self.inner.state.metrics();
        m.raft_term.set(r.term as i64);
        m.raft_last_log_index.set(r.last_log_index as i64);
        m.raft_applied_index.set(r.applied_index as i64);
        m.raft_is_leader.set(i64::from(r.role == "leader"));
        // Provisioned = the virtual size of every volume on the pool (a VM's own disks are
        // volumes too); a volume being moved counts on both pools.
        let (pools, tiers) = self.inner.state.read(|s| {
            let mut per_pool = std::collections::HashMap::<&str, u64>::new();
            for v in s.volumes.values() {
                for p in std::iter::once(&v.pool).chain(v.moving_to.as_ref()) {
                    *per_pool.entry(p.as_str()).or_default() += v.size_mib << 20;
                }
            }
            let mut tiers = std::collections::BTreeMap::<&'static str, u64>::new();
            let pools = s
                .pools
                .values()
                .map(|p| {
                    let provisioned = per_pool.get(p.name.as_str()).copied().unwrap_or(0);
                    *tiers.entry(p.tier.as_str()).or_default() += provisioned;
                    (
                        p.name.clone(),
                        p.tier.as_str(),
                        p.capacity_bytes,
                        provisioned,
                    )
                })
                .collect::<Vec<_>>();
            (pools, tiers)
        });
        for tier in ["hot", "warm", "cold"] {
            m.tier_used
                .get_or_create(&crate::metrics::ClassLabels {
                    class: tier.to_string(),
                })
                .set(tiers.get(tier).copied().unwrap_or(0) as i64);
        }
        let free = self.visible_pools();
        for (pool, tier, capacity, provisioned) in pools {
            let labels = crate::metrics::PoolLabels {
                pool: pool.clone(),
                tier: tier.to_string(),
            };
            m.pool_capacity.get_or_create(&labels).set(capacity as i64);
            m.pool_provisioned
                .get_or_create(&labels)
                .set(provisioned as i64);
            if let Some(f) = free.get(&pool) {
                m.pool_free.get_or_create(&labels).set(*f as i64);
            }
        }
    }
}
