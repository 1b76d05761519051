//! Prometheus metrics. Counters and histograms are updated where things happen; gauges that
//! mirror state (VMs by state, Raft indexes) are filled in at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route template (`/api/v1/vms/{id}`), never the raw path, to bound cardinality.
    pub route: String,
    pub status: u16,
}

/// Which API a connection was opened for: `internal` (host-to-host, `/internal/v1`) or
/// `public`, as its first request says.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_connections: Family<ConnLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub vms: Family<StateLabels, Gauge>,
    pub qemu_start_seconds: Histogram,
    pub operations: Family<KindLabels, Counter>,
    pub raft_term: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_is_leader: Gauge,
    pub ha_recoveries: Counter,
    pub pool_capacity: Family<PoolLabels, Gauge>,
    pub pool_provisioned: Family<PoolLabels, Gauge>,
    pub pool_free: Family<PoolLabels, Gauge>,
    pub volume_moves: Family<ResultLabels, Counter>,
    pub volume_move_bytes: Counter,
    pub volume_move_rate: Gauge,
    pub volume_move_throttle: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub tiering_predictions: Family<ClassLabels, Gauge>,
    pub tiering_accuracy: Family<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub tier_used: Family<ClassLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("novacron");
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by route and status",
            http_requests.clone(),
        );
        let http_connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "http_connections",
            "Connections accepted, by the API their first request was for (internal: from \
             other hosts)",
            http_connections.clone(),
        );
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "http_request_duration_seconds",
            "API request latency",
            http_duration.clone(),
        );
        let vms = Family::<StateLabels, Gauge>::default();
        registry.register("vms", "VMs by observed state (cluster-wide)", vms.clone());
        let qemu_start_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "qemu_start_seconds",
            "Time from spawning QEMU to QMP reporting the VM running",
            qemu_start_seconds.clone(),
        );
        let operations = Family::<KindLabels, Counter>::default();
        registry.register(
            "operations_finished",
            "Finished operations by kind and status",
            operations.clone(),
        );
        let raft_term = Gauge::default();
        registry.register("raft_term", "Current Raft term", raft_term.clone());
        let raft_last_log_index = Gauge::default();
        registry.register(
            "raft_last_log_index",
            "Last Raft log index",
            raft_last_log_index.clone(),
        );
        let raft_applied_index = Gauge::default();
        registry.register(
            "raft_applied_index",
            "Last applied Raft log index",
            raft_applied_index.clone(),
        );
        let raft_is_leader = Gauge::default();
        registry.register(
            "raft_is_leader",
            "1 when this node is the Raft leader",
            raft_is_leader.clone(),
        );
        let ha_recoveries = Counter::default();
        registry.register(
            "ha_recoveries",
            "HA VMs this host (as leader) moved off a lost host",
            ha_recoveries.clone(),
        );
        let pool_capacity = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_capacity_bytes",
            "Configured capacity of each storage pool",
            pool_capacity.clone(),
        );
        let pool_provisioned = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_provisioned_bytes",
            "Virtual size of the volumes (VM disks included) recorded on each pool",
            pool_provisioned.clone(),
        );
        let pool_free = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_free_bytes",
            "Free bytes of each pool this host sees (its file system)",
            pool_free.clone(),
        );
        let volume_moves = Family::<ResultLabels, Counter>::default();
        registry.register(
            "volume_moves",
            "Volume moves between pools by result (started, finished, failed)",
            volume_moves.clone(),
        );
        let volume_move_bytes = Counter::default();
        registry.register(
            "volume_move_bytes",
            "Bytes copied by finished volume moves",
            volume_move_bytes.clone(),
        );
        let volume_move_rate = Gauge::default();
        registry.register(
            "volume_move_rate_bytes",
            "Rate given to the latest volume move, bytes per second",
            volume_move_rate.clone(),
        );
        let volume_move_throttle = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        volume_move_throttle.set(1.0);
        registry.register(
            "volume_move_throttle",
            "Adaptive throttle factor applied to every move's limits (1 = none)",
            volume_move_throttle.clone(),
        );
        let tiering_predictions = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "tiering_predictions",
            "Volumes of this host by predicted class for the next window",
            tiering_predictions.clone(),
        );
        let tiering_accuracy =
            Family::<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "tiering_accuracy",
            "Share of this host's past predictions that were right, by model",
            tiering_accuracy.clone(),
        );
        let tier_used = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "tier_provisioned_bytes",
            "Virtual size of all volumes on each tier's pools (cluster-wide; label class = tier)",
            tier_used.clone(),
        );
        Self {
            registry,
            volume_moves,
            volume_move_bytes,
            volume_move_rate,
            volume_move_throttle,
            tiering_predictions,
            tiering_accuracy,
            tier_used,
            ha_recoveries,
            pool_capacity,
            pool_provisioned,
            pool_free,
            http_requests,
            http_connections,
            http_duration,
            vms,
            qemu_start_seconds,
            operations,
            raft_term,
            raft_last_log_index,
            raft_applied_index,
            raft_is_leader,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
