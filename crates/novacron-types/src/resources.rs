//! Resources as stored in the replicated state and returned by the API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ApiError, ImageId, NodeId, OperationId, TokenId, UnixMillis, UserId, VmId, VolumeId};

// ---------------------------------------------------------------------------------------------
// VMs

/// What a client sends to create a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// Unique name: lowercase letters, digits and `-`, 1 to 63 characters, starting with a letter.
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Image name or ID the boot disk is created from (as a qcow2 overlay).
    #[schema(
        pattern = r"^([a-z]([a-z0-9-]{0,61}[a-z0-9])?|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
        min_length = 1,
        max_length = 63
    )]
    pub image: String,
    #[schema(minimum = 1, maximum = 128)]
    pub vcpus: u32,
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory_mib: u64,
    /// Extra blank disks.
    #[serde(default)]
    #[schema(max_items = 16)]
    pub disks: Vec<DiskRequest>,
    /// Direct kernel boot; overrides the image's kernel, initrd and command line.
    #[serde(default)]
    pub boot: Option<KernelBoot>,
    /// The host to create it on. Default: the best host by the placement rules and the
    /// cluster's strategy (`POST /api/v1/placement` shows the ranking). A named host is still
    /// checked against the same rules.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub node: Option<NodeId>,
    /// Where the VM may run.
    #[serde(default)]
    pub placement: PlacementRules,
    /// The storage pool its disks go to. Default: the host's own data directory.
    #[serde(default)]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub pool: Option<String>,
    /// Restart the VM on another host when its host is lost (its disks must be on a shared
    /// pool).
    #[serde(default)]
    pub ha: bool,
}

/// Where a VM may run. Kept with the VM, so every later placement (migration, evacuation, HA)
/// follows the same rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Labels the host must carry, all of them (`{"zone": "a"}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = crate::schema::labels)]
    pub host_labels: BTreeMap<String, String>,
    /// VMs of one affinity group run on the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub affinity: Option<String>,
    /// VMs of one anti-affinity group never share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub anti_affinity: Option<String>,
}

/// How to choose among the hosts that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementStrategy {
    /// The host with the most room left (and the least load): VMs spread out.
    #[default]
    Spread,
    /// The fullest host that still fits: keeps other hosts empty.
    Pack,
}

impl PlacementStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementStrategy::Spread => "spread",
            PlacementStrategy::Pack => "pack",
        }
    }
}

/// A dry run of placement: what a VM needs and where it may go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    #[schema(minimum = 1, maximum = 128)]
    pub vcpus: u32,
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory_mib: u64,
    /// Disk space it needs in the host's data pool, besides its image.
    #[serde(default)]
    #[schema(maximum = 1140850688)]
    pub disk_mib: u64,
    /// The image its boot disk would come from (name or ID): its full size counts as disk.
    #[serde(default)]
    #[schema(
        pattern = r"^([a-z]([a-z0-9-]{0,61}[a-z0-9])?|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
        min_length = 1,
        max_length = 63
    )]
    pub image: Option<String>,
    #[serde(default)]
    pub placement: PlacementRules,
    /// Check only this host (as `vm create --node` would).
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub node: Option<NodeId>,
    /// Default: the receiving host's `--placement` setting.
    #[serde(default)]
    pub strategy: Option<PlacementStrategy>,
    /// The storage pool the disks would go to (the host must see it). Default: the host's data
    /// directory.
    #[serde(default)]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub pool: Option<String>,
}

/// Why a host was not chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacementReason {
    /// Stable code: `witness`, `maintenance`, `offline`, `isolated`, `joining`, `no_inventory`,
    /// `missing_label`, `not_enough_cpus`, `not_enough_memory`, `not_enough_disk`, `affinity`,
    /// `anti_affinity`, `not_requested`, `not_heartbeating` (no heartbeat for a few intervals).
    pub code: String,
    pub message: String,
}

/// A host the VM fits on, with what would be left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementCandidate {
    #[schema(value_type = u64)]
    pub node: NodeId,
    pub name: String,
    /// Higher is better; only comparable within one report.
    pub score: f64,
    pub vcpus_free_after: u64,
    pub memory_free_mib_after: u64,
    pub vms: u32,
    pub load1: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacementRejection {
    #[schema(value_type = u64)]
    pub node: NodeId,
    pub name: String,
    pub reasons: Vec<PlacementReason>,
}

/// The ranking: candidates best first, every other host with its reasons.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementReport {
    pub strategy: PlacementStrategy,
    #[schema(value_type = Option<u64>)]
    pub chosen: Option<NodeId>,
    pub candidates: Vec<PlacementCandidate>,
    pub rejected: Vec<PlacementRejection>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    #[schema(minimum = 1, maximum = 67108864)]
    pub size_mib: u64,
}

/// Direct kernel boot: paths on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    /// An absolute path on the host, without `,`.
    #[schema(pattern = r"^/[^,\u0000]*$", max_length = 4096)]
    pub kernel: String,
    #[serde(default)]
    #[schema(pattern = r"^/[^,\u0000]*$", max_length = 4096)]
    pub initrd: Option<String>,
    /// One line.
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000\n\r]*$", max_length = 2048)]
    pub cmdline: Option<String>,
}

/// The validated, resolved specification of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub name: String,
    pub image: ImageId,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    pub boot: Option<KernelBoot>,
    #[serde(default)]
    pub placement: PlacementRules,
    /// The storage pool holding the VM's disks; `None`: the host's own data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Restarted on another host when its host is lost (only with disks on a shared pool).
    #[serde(default)]
    pub ha: bool,
}

/// One disk of a VM. Disk 0 is the boot disk (an overlay on the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskSpec {
    /// Stable device name inside NovaCron (`root`, `disk1`, ...).
    pub name: String,
    pub size_mib: u64,
}

/// What the owner of a VM wants it to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Stopped,
    Running,
    Paused,
}

/// What a VM is, as observed from QEMU (QMP status and events), never what was last asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    Crashed,
    /// The host that runs it cannot tell (not re-adopted yet, or unreachable).
    Unknown,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Crashed,
        VmState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Unknown => "unknown",
        }
    }

    /// True when a QEMU process exists for the VM.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

/// A stopped VM's disk snapshot (internal qcow2 snapshots of every disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSnapshot {
    pub name: String,
    pub created_at: UnixMillis,
}

/// A VM as stored and as returned by `GET /api/v1/vms/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: VmId,
    pub name: String,
    /// Observed state.
    pub state: VmState,
    /// Why the VM is in this state, when it is not obvious (for example why it crashed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// Desired power state.
    pub desired: PowerState,
    /// The host the VM is on.
    pub node: NodeId,
    pub spec: VmSpec,
    #[serde(default)]
    pub snapshots: Vec<VmSnapshot>,
    /// Free-form `key: value` metadata (selectors, ownership, anything).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// While a migration runs: the target, where the VM's resources are reserved too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub migrating_to: Option<NodeId>,
    /// HA moved the VM here after host N was lost; cleared once it runs here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub recovered_from: Option<NodeId>,
}

/// `PATCH /api/v1/vms/{vm}`: a merge patch of the VM's labels (`null` removes a label).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVmRequest {
    #[serde(default)]
    #[schema(schema_with = crate::schema::label_changes)]
    pub labels: BTreeMap<String, Option<String>>,
    /// Turn HA on or off (on needs disks on a shared pool).
    #[serde(default)]
    pub ha: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// I/O statistics

/// I/O in one bucket of time (requests and bytes, read and write).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IoBucket {
    /// Start of the bucket, Unix seconds.
    pub start: u64,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskIoSeries {
    /// `root`, `disk1`, ...
    pub disk: String,
    /// Seconds per bucket (the resolution kept for the span asked).
    pub step_s: u64,
    /// Oldest first.
    pub buckets: Vec<IoBucket>,
}

/// `GET /api/v1/vms/{vm}/disks/stats`: what the VM's host collected from QEMU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskIoReport {
    #[schema(value_type = u64)]
    pub node: NodeId,
    /// How often the host samples.
    pub sample_interval_s: u64,
    pub disks: Vec<DiskIoSeries>,
}

// ---------------------------------------------------------------------------------------------
// Storage pools

/// How fast (and dear) a pool's storage is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolTier {
    Hot,
    Warm,
    /// Volumes are stored compressed.
    Cold,
}

impl PoolTier {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolTier::Hot => "hot",
            PoolTier::Warm => "warm",
            PoolTier::Cold => "cold",
        }
    }
}

/// A directory VM disks live in. A `shared` pool is the same files on every host (NFS,
/// CephFS, a cluster file system): VMs on it migrate without copying disks and can be
/// restarted elsewhere by HA. A local pool is a directory of that path on each host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoragePool {
    pub name: String,
    /// Absolute path of the directory on the hosts.
    pub path: String,
    pub tier: PoolTier,
    pub shared: bool,
    pub capacity_bytes: u64,
    pub cost_per_gib_month: f64,
    /// Free-form class (`nvme`, `ssd`, `hdd`, `archive`, ...).
    pub performance_class: String,
    pub created_at: UnixMillis,
}

/// `POST /api/v1/pools`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolRequest {
    /// A name (not `data`, which names each host's own data directory).
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Absolute directory path (not `/`, no `..`). For a shared pool it must already be mounted
    /// on the host that receives the request; NovaCron marks it so other hosts can tell it is
    /// the same pool.
    #[schema(pattern = r"^/[^\u0000]+$", min_length = 2, max_length = 200)]
    pub path: String,
    pub tier: PoolTier,
    #[serde(default)]
    pub shared: bool,
    #[schema(minimum = 1, maximum = 1152921504606846976u64)]
    pub capacity_bytes: u64,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub cost_per_gib_month: f64,
    #[serde(default)]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub performance_class: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Volumes

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeFormat {
    #[default]
    Qcow2,
    Raw,
}

impl VolumeFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeFormat::Qcow2 => "qcow2",
            VolumeFormat::Raw => "raw",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    pub name: String,
    pub created_at: UnixMillis,
}

/// A block device's storage: a file in a pool (`data` is each host's own data directory).
/// A VM's own disks (`vm_disk`: `root` is the boot disk, then `disk1`, ...) are volumes that
/// come and go with their VM; other volumes are made, attached, detached and deleted on their
/// own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub pool: String,
    /// The host holding the file; `None` on a shared pool (every host sees it).
    pub node: Option<NodeId>,
    pub size_mib: u64,
    pub format: VolumeFormat,
    /// Stored compressed (volumes copied into a cold pool).
    #[serde(default)]
    pub compressed: bool,
    pub attached_to: Option<VmId>,
    /// Set for a VM's own disks.
    pub vm_disk: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<VolumeSnapshot>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pool a move in progress copies it to.
    #[serde(default)]
    pub moving_to: Option<String>,
    /// When it last changed pool (hysteresis counts from here).
    #[serde(default)]
    pub moved_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

impl Volume {
    pub fn is_vm_disk(&self) -> bool {
        self.vm_disk.is_some()
    }
}

/// `POST /api/v1/volumes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    #[schema(minimum = 1, maximum = 67108864)]
    pub size_mib: u64,
    #[serde(default)]
    pub format: VolumeFormat,
    /// Default `data` (the host's own data directory).
    #[serde(default)]
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub pool: Option<String>,
    /// For a local pool: the host to create it on (default: the VM's host when `attach_to` is
    /// given, else the host receiving the request).
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub node: Option<NodeId>,
    /// Attach it to this VM (name or ID) once made.
    #[serde(default)]
    #[schema(
        pattern = r"^([a-z]([a-z0-9-]{0,61}[a-z0-9])?|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
        min_length = 1,
        max_length = 63
    )]
    pub attach_to: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::labels)]
    pub labels: BTreeMap<String, String>,
}

/// `POST /api/v1/volumes/{volume}/actions/attach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    /// VM name or ID.
    #[schema(
        pattern = r"^([a-z]([a-z0-9-]{0,61}[a-z0-9])?|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
        min_length = 1,
        max_length = 63
    )]
    pub vm: String,
}

/// `POST /api/v1/volumes/{volume}/actions/resize`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeRequest {
    /// The new size; volumes only grow.
    #[schema(minimum = 1, maximum = 67108864)]
    pub size_mib: u64,
}

/// `POST /api/v1/volumes/{volume}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeSnapshotRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
}

/// `POST /api/v1/volumes/{volume}/actions/move`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveVolumeRequest {
    /// The pool to move it to.
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub pool: String,
    /// This move's own limit in MB/s (1 to 200); the policy's limits apply too.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 200)]
    pub rate_mb: Option<u64>,
}

/// A page of volumes (see [`crate::page`]).
pub type VolumePage = crate::Page<Volume>;

/// Filters of `GET /api/v1/volumes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeQuery {
    pub pool: Option<String>,
    pub tier: Option<PoolTier>,
    /// VM name or ID the volumes are attached to.
    pub vm: Option<String>,
    pub attached: Option<bool>,
    pub node: Option<NodeId>,
    /// `key=value`.
    pub label: Option<String>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<usize>,
    /// The previous page's `next`.
    pub after: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Tiering policy

/// How NovaCron moves volumes between tiers on its own, and how fast moves may copy.
/// `PUT /api/v1/tiering/policy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TieringPolicy {
    /// Plan and move on its own (moves asked for through the API happen either way).
    pub enabled: bool,
    /// Length of a planning window, in seconds (10 to 86400).
    #[schema(minimum = 10, maximum = 86400)]
    pub window_s: u64,
    /// A pool should stay under this share of its capacity (0.1 to 1).
    #[schema(minimum = 0.1, maximum = 1.0)]
    pub high_water: f64,
    /// Windows a volume stays put after a move.
    #[schema(maximum = 100000)]
    pub min_dwell_windows: u64,
    /// Windows without I/O after which a volume goes one tier colder.
    #[schema(minimum = 1, maximum = 100000)]
    pub demote_after_idle_windows: u64,
    /// Score margin (in log1p operations) for a predicted-hot volume to displace a hot one.
    #[schema(minimum = 0.0, maximum = 10.0)]
    pub hysteresis: f64,
    /// Operations per window from which a volume counts as hot (any I/O makes it warm, none
    /// cold).
    #[schema(minimum = 2)]
    pub hot_ops_per_window: u64,
    /// Pools being drained (the maintenance policy empties them).
    #[serde(default)]
    pub draining_pools: Vec<String>,
    /// Move rate limits in MB/s (1 to 200): all moves of a host together, per pool, per volume.
    #[schema(minimum = 1, maximum = 200)]
    pub global_mb: u64,
    #[schema(minimum = 1, maximum = 200)]
    pub pool_mb: u64,
    #[schema(minimum = 1, maximum = 200)]
    pub volume_mb: u64,
    /// Adaptive throttling: back off while the guests' mean I/O latency is above this
    /// (milliseconds; 0: whenever the guests do any I/O) or the host's load per CPU is above
    /// `max_load_per_cpu`.
    #[schema(maximum = 60000)]
    pub max_guest_latency_ms: u64,
    #[schema(minimum = 0.1, maximum = 100.0)]
    pub max_load_per_cpu: f64,
}

impl Default for TieringPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            window_s: 300,
            high_water: 0.85,
            min_dwell_windows: 4,
            demote_after_idle_windows: 12,
            hysteresis: 0.3,
            hot_ops_per_window: 1000,
            draining_pools: Vec::new(),
            global_mb: 200,
            pool_mb: 100,
            volume_mb: 50,
            max_guest_latency_ms: 50,
            max_load_per_cpu: 1.5,
        }
    }
}

/// One volume's forecast in a tiering pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeForecast {
    pub volume: VolumeId,
    pub name: String,
    pub pool: String,
    /// I/O operations in the window that just closed.
    pub ops: u64,
    /// `cold`, `warm` or `hot` for the next window.
    pub predicted: String,
    /// Expected `log1p(operations)` next window.
    pub score: f64,
    pub idle_windows: u64,
}

/// A move a tiering pass planned, with the policy that asked for it and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlannedVolumeMove {
    pub volume: VolumeId,
    pub name: String,
    pub from: String,
    pub to: String,
    /// `maintenance`, `capacity`, `performance`, `time` or `cost`.
    pub policy: String,
    pub reason: String,
    /// The move's operation, when it started.
    pub operation: Option<OperationId>,
    /// Why it did not start.
    pub error: Option<String>,
}

/// The last tiering pass of a host (`GET /api/v1/tiering/plan`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TieringReport {
    pub node: NodeId,
    pub at: UnixMillis,
    pub window_s: u64,
    /// Windows the models have learnt from.
    pub windows: u64,
    pub volumes: Vec<VolumeForecast>,
    pub moves: Vec<PlannedVolumeMove>,
    /// Share of past class forecasts that came true, by model.
    pub accuracy: BTreeMap<String, f64>,
}

// ---------------------------------------------------------------------------------------------
// Images

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// A registered base image. VM boot disks are qcow2 overlays on `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: ImageId,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub format: ImageFormat,
    /// Path of the base disk on the host that stores it.
    pub path: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Default direct-kernel boot for VMs created from this image.
    #[serde(default)]
    pub boot: Option<KernelBoot>,
    pub node: NodeId,
    pub created_at: UnixMillis,
}

/// `POST /api/v1/images`: import a local file as a named image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImageRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Path of a qcow2 or raw file on the host that serves the request. It is copied.
    #[schema(pattern = r"^/[^\u0000]*$", max_length = 4096)]
    pub source_path: String,
    /// `qcow2` or `raw`; detected from the file when omitted.
    #[serde(default)]
    pub format: Option<ImageFormat>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub boot: Option<KernelBoot>,
}

// ---------------------------------------------------------------------------------------------
// Users and tokens

/// Roles, from most to least powerful.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Manage VMs and images.
    Operator,
    /// Everything, including users and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub username: String,
    /// Argon2id PHC string. Never leaves the server.
    pub password_hash: String,
    pub role: Role,
    pub created_at: UnixMillis,
}

/// A user as returned by the API (no hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: UserId,
    pub username: String,
    pub role: Role,
    pub created_at: UnixMillis,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            id: u.id,
            username: u.username.clone(),
            role: u.role,
            created_at: u.created_at,
        }
    }
}

/// A long-lived API token. The secret is shown once; only its SHA-256 is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: TokenId,
    pub name: String,
    pub user: UserId,
    pub role: Role,
    pub secret_sha256: String,
    pub created_at: UnixMillis,
    #[serde(default)]
    pub expires_at: Option<UnixMillis>,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: TokenId,
    pub name: String,
    pub user: UserId,
    pub role: Role,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub revoked: bool,
}

impl From<&ApiToken> for TokenView {
    fn from(t: &ApiToken) -> Self {
        Self {
            id: t.id,
            name: t.name.clone(),
            user: t.user,
            role: t.role,
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked: t.revoked,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Running,
    Success,
    Failure,
    Cancelled,
}

impl OperationStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, OperationStatus::Running)
    }
}

/// A long-running action, persisted in the replicated state so it survives restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: OperationId,
    /// What it does, for example `vm.start`.
    pub kind: String,
    pub status: OperationStatus,
    /// 0 to 100.
    pub progress: u8,
    /// The current step in words.
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub error: Option<ApiError>,
    /// API paths of the resources it acts on.
    pub resources: Vec<String>,
    /// The host that carries it out.
    pub node: NodeId,
    /// Who asked for it.
    pub requestor: String,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// A live migration's figures, updated while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}

/// `POST /api/v1/vms/{vm}/actions/migrate`. Unset fields take the source host's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVmRequest {
    /// The host to move to (default: the best by placement).
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub target: Option<NodeId>,
    /// RAM bandwidth cap, MiB/s.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100000)]
    pub max_bandwidth_mib: Option<u64>,
    /// Disk mirroring bandwidth cap, MiB/s.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100000)]
    pub disk_bandwidth_mib: Option<u64>,
    /// The longest pause QEMU may plan for the switch-over, ms.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 60000)]
    pub downtime_limit_ms: Option<u64>,
    /// Throttle a guest that dirties memory faster than it can be sent.
    #[serde(default)]
    pub auto_converge: Option<bool>,
    /// Give up (or switch to post-copy) when not done after this many seconds.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub on_timeout: Option<MigrationTimeoutAction>,
}

/// What a migration that is not done in time does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationTimeoutAction {
    /// Cancel: the VM stays where it was.
    #[default]
    Abort,
    /// Switch to post-copy: the guest runs on the target at once and pulls the rest of its
    /// memory (finishes for sure; a network failure then loses the guest).
    Postcopy,
}

/// Live figures of a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    #[schema(value_type = u64)]
    pub source: NodeId,
    #[schema(value_type = u64)]
    pub target: NodeId,
    /// `preparing`, `mirroring disks`, `copying memory`, `switching over`, `post-copy`,
    /// `finishing`, `completed`, `cancelled`, `failed`.
    pub phase: String,
    pub ram_total_bytes: u64,
    pub ram_remaining_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_remaining_bytes: u64,
    /// Bytes per second going over the network now.
    pub transfer_rate_bytes: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate_bytes: u64,
    pub expected_downtime_ms: Option<u64>,
    /// Once done: the guest's real pause.
    pub downtime_ms: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub elapsed_ms: u64,
    /// RAM bytes sent so far, and for how long RAM has been moving: their ratio is the
    /// achieved bandwidth.
    #[serde(default)]
    pub ram_transferred_bytes: u64,
    #[serde(default)]
    pub ram_copy_ms: u64,
    /// The same, up to the switch-over: the phase the bandwidth cap governs (QEMU sends what
    /// is left at the switch-over unthrottled, within the downtime limit).
    #[serde(default)]
    pub precopy_bytes: u64,
    #[serde(default)]
    pub precopy_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Nodes

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    /// `http://host:port` where this node serves the API.
    pub api_address: String,
    pub qemu_version: String,
    /// `kvm` or `tcg`, as resolved at start-up.
    pub accelerator: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub registered_at: UnixMillis,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `full` hosts run VMs; a `witness` only votes and keeps the Raft log.
    #[serde(default)]
    pub role: HostRole,
    /// vCPUs this host accepts, in percent of its CPUs (`--cpu-overcommit 4` = 400).
    #[serde(default = "default_cpu_overcommit")]
    pub cpu_overcommit_pct: u32,
    /// Guest memory this host accepts, in percent of its memory after the reserve.
    #[serde(default = "default_memory_overcommit")]
    pub memory_overcommit_pct: u32,
    /// Memory kept for the host itself (not given to guests).
    #[serde(default)]
    pub reserved_memory_mib: u64,
    /// In maintenance: no new VMs are placed here (`node evacuate` / `node restore`).
    #[serde(default)]
    pub maintenance: bool,
}

fn default_cpu_overcommit() -> u32 {
    400
}

fn default_memory_overcommit() -> u32 {
    100
}

impl NodeInfo {
    /// vCPUs VMs on this host may have in total.
    pub fn vcpu_capacity(&self) -> u64 {
        u64::from(self.cpus) * u64::from(self.cpu_overcommit_pct) / 100
    }

    /// Guest memory VMs on this host may have in total.
    pub fn memory_capacity_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.reserved_memory_mib)
            * u64::from(self.memory_overcommit_pct)
            / 100
    }
}

/// What a host is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostRole {
    /// Runs VMs, may vote.
    #[default]
    Full,
    /// Votes and keeps the Raft log so two full hosts plus a witness survive losing one; runs
    /// no VMs and no tiering.
    Witness,
}

impl HostRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HostRole::Full => "full",
            HostRole::Witness => "witness",
        }
    }
}

impl std::str::FromStr for HostRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(HostRole::Full),
            "witness" => Ok(HostRole::Witness),
            other => Err(format!(
                "unknown host role '{other}' (expected full or witness)"
            )),
        }
    }
}

/// A one-time token that lets a new host join. Only its SHA-256 is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256: String,
    pub role: HostRole,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// Set when a host used it; a used token never works again.
    #[serde(default)]
    pub used_by: Option<NodeId>,
}

/// Convenience for callers that build an `ApiError` from validation.
pub type ValidationResult<T> = Result<T, ApiError>;
