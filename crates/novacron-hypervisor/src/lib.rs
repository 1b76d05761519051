//! The hypervisor driver.
//!
//! [`Hypervisor`] is what the server asks of a host's virtualization: prepare disks, start, stop,
//! pause a VM, and report what QEMU says the VM is. [`qemu::QemuHypervisor`] runs one
//! `qemu-system-x86_64` per VM and drives it over QMP (the `qapi` crate); [`fake::FakeHypervisor`]
//! keeps everything in memory for fast tests of the layers above.
//!
//! Invariants: only this crate speaks QMP or runs `qemu-*` binaries; it never touches the
//! replicated state. Observed state always comes from QEMU (QMP status and events, or the
//! process being gone), never from what was last requested.

pub mod accel;
pub mod disks;
pub mod durable;
pub mod fake;
pub mod none;
pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

use novacron_types::{ImageFormat, KernelBoot, VmId, VmState, VolumeFormat, VolumeId};
use tokio::sync::broadcast;

/// Everything needed to run a VM on this host, resolved by the server from the VM and its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeSpec {
    pub id: VmId,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The base image the boot disk overlays.
    pub base_image: PathBuf,
    pub base_format: ImageFormat,
    /// The boot disk's size in bytes once it was grown past its image's (`None`: the
    /// image's); a migration target makes its copy this large.
    pub root_size: Option<u64>,
    /// Sizes of the extra blank disks, in MiB.
    pub extra_disks_mib: Vec<u64>,
    pub boot: Option<KernelBoot>,
    /// Where each disk's file is (boot disk first) when it lives in a storage pool; the VM's
    /// directory then holds a link to it. `None`: in the VM's directory. Disks move between
    /// pools one by one, so they may be in different directories.
    pub disk_dirs: Vec<Option<PathBuf>>,
    /// The disks are on shared pools, the same directories on every host: a migration copies
    /// no disk, and another host may open them once this one has let go. (A VM's disks are
    /// all on shared pools or none is.)
    pub shared_disks: bool,
    /// Other volumes attached, in their slots' order (at most [`VOLUME_SLOTS`]).
    pub volumes: Vec<AttachedVolume>,
}

impl RuntimeSpec {
    /// The pool directory disk `i` (0: the boot disk) is in; `None`: the VM's directory.
    pub fn disk_dir(&self, i: usize) -> Option<&std::path::Path> {
        self.disk_dirs.get(i).and_then(|d| d.as_deref())
    }
    /// Some disk lives in a pool (and is linked from the VM's directory).
    pub fn in_pools(&self) -> bool {
        self.disk_dirs.iter().any(Option::is_some)
    }
}

/// The image a boot disk's copy must overlay (the copy takes only the disk's own layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// Hot-plug slots (PCIe root ports) every VM gets for volumes.
pub const VOLUME_SLOTS: usize = 8;

/// A volume file attached to a VM as a virtio disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedVolume {
    pub id: VolumeId,
    pub path: PathBuf,
    pub format: VolumeFormat,
}

impl AttachedVolume {
    /// The guest device's ID (`query-blockstats` reports the disk as `vol-<id>`).
    pub fn device_id(id: VolumeId) -> String {
        format!("vol-{id}-dev")
    }
    /// The block node QEMU opens the file as at start or hot-plug.
    pub fn node_name(id: VolumeId) -> String {
        format!("v{}", id.short())
    }
}

/// A running copy of a VM's disk to another file (`blockdev-mirror`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    pub len: u64,
    pub offset: u64,
    /// Caught up: writes now go to both files; `volume_mirror_finish` may switch.
    pub ready: bool,
    pub speed: u64,
}

/// A change of a VM's observed state, published by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub id: VmId,
    pub state: VmState,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("VM {0} has no running QEMU process")]
    NotRunning(VmId),
    #[error("VM {0} already has a running QEMU process")]
    AlreadyRunning(VmId),
    #[error("{op} is not possible while the VM is {state}")]
    WrongState {
        op: &'static str,
        state: &'static str,
    },
    #[error("QEMU failed to start: {0}")]
    StartFailed(String),
    #[error("QMP command {command} failed: {message}")]
    Qmp {
        command: &'static str,
        message: String,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("qemu-img {action} failed: {message}")]
    Disk {
        action: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unsupported(String),
    /// A file the VM needs is not there (a disk missing from its pool).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a host's hypervisor can tell about itself.
/// Where the incoming side of a live migration listens: RAM on `migration_port`, disks (each
/// exported under its node name, `root`, `disk1`, ...) over NBD on `nbd_port`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IncomingPlan {
    pub host: String,
    pub migration_port: u16,
    pub nbd_port: u16,
    /// Both sides must enable post-copy before the migration starts.
    pub postcopy: bool,
}

/// How a live migration may use the network and the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationTuning {
    /// RAM bandwidth cap in bytes per second.
    pub max_bandwidth: Option<u64>,
    /// The longest pause QEMU may plan for the final switch-over, in milliseconds.
    pub downtime_limit_ms: Option<u64>,
    /// Throttle the guest's vCPUs when it dirties memory faster than it can be sent.
    pub auto_converge: bool,
    /// Enable post-copy (started later with [`Hypervisor::outgoing_postcopy`]).
    pub postcopy: bool,
    /// Disk mirroring bandwidth cap in bytes per second.
    pub disk_bandwidth: Option<u64>,
}

/// Progress of an outgoing migration, as QEMU reports it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MigrationStats {
    /// QEMU's migration status (`none` until RAM migration starts, then `setup`, `active`,
    /// `postcopy-active`, `device`, `completed`, `failed`, `cancelling`, `cancelled`).
    pub status: String,
    pub ram_total_bytes: u64,
    pub ram_transferred_bytes: u64,
    pub ram_remaining_bytes: u64,
    pub mbps: f64,
    /// Bytes per second the guest dirties.
    pub dirty_bytes_rate: u64,
    pub expected_downtime_ms: Option<u64>,
    /// Once completed: the real pause.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    pub disk_total_bytes: u64,
    pub disk_remaining_bytes: u64,
    /// Every disk mirror still running has caught up (writes are now mirrored synchronously).
    pub disks_ready: bool,
    /// Disk mirrors still running (one per disk while all is well).
    pub disk_jobs: usize,
    pub error: Option<String>,
}

/// QEMU's cumulative I/O counters of one disk since its QEMU started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskCounters {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HypervisorInfo {
    pub qemu_version: String,
    pub accelerator: String,
}

#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    fn info(&self) -> HypervisorInfo;

    /// Receives every observed state change (crashes included) of every VM on this host.
    fn subscribe(&self) -> broadcast::Receiver<StateChange>;

    /// Creates the VM's disks: a qcow2 overlay on the base image and the extra blank disks.
    async fn define(&self, spec: &RuntimeSpec) -> Result<(), HvError>;

    /// Removes the VM's files on this host (for disks in a pool: the links, not the disks).
    /// The VM must not be running.
    async fn undefine(&self, id: VmId) -> Result<(), HvError>;

    /// For a VM whose disks already exist in pools (`spec.disk_dirs`): makes them usable on
    /// this host (the VM's directory with links to them). Fails when a disk is missing.
    async fn link_disks(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        let _ = spec;
        Err(unsupported("storage pools"))
    }

    /// Deletes the VM's disks in pool directories (after `undefine`, when the VM is deleted
    /// for good). Nothing to do for disks kept in the VM's directory.
    async fn remove_pool_disks(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        let _ = spec;
        Ok(())
    }

    /// Starts QEMU and returns once QEMU reports the VM running.
    async fn start(&self, spec: &RuntimeSpec) -> Result<(), HvError>;

    /// Asks the guest to power off (ACPI); forces QEMU to quit after `timeout`.
    async fn shutdown(&self, id: VmId, timeout: Duration) -> Result<(), HvError>;

    /// Ends QEMU now.
    async fn force_stop(&self, id: VmId) -> Result<(), HvError>;

    async fn reboot(&self, id: VmId) -> Result<(), HvError>;
    async fn pause(&self, id: VmId) -> Result<(), HvError>;
    async fn resume(&self, id: VmId) -> Result<(), HvError>;

    /// The state QEMU reports now (`Stopped` when no process exists).
    async fn observe(&self, id: VmId) -> VmState;

    /// After a restart of `novacron`: takes over a QEMU that is still running for this VM.
    /// Returns the observed state (`Stopped` when there was nothing to adopt).
    async fn adopt(&self, spec: &RuntimeSpec) -> Result<VmState, HvError>;

    /// Internal snapshots of every disk of a stopped VM.
    async fn snapshot_disks(&self, id: VmId, name: &str) -> Result<(), HvError>;
    async fn restore_disks(&self, id: VmId, name: &str) -> Result<(), HvError>;
    async fn delete_disk_snapshot(&self, id: VmId, name: &str) -> Result<(), HvError>;

    /// Every disk's cumulative I/O counters (`query-blockstats`), by disk name (`root`,
    /// `disk1`, ...), while the VM has a QEMU.
    async fn block_stats(&self, id: VmId) -> Result<Vec<(String, DiskCounters)>, HvError> {
        let _ = id;
        Err(unsupported("I/O statistics"))
    }

    /// Hot-plugs a volume into a running VM (the first free slot).
    async fn attach_volume(&self, id: VmId, vol: &AttachedVolume) -> Result<(), HvError> {
        let _ = (id, vol);
        Err(unsupported("volumes"))
    }
    /// Unplugs a volume from a running VM (the guest must release it) and closes its file.
    async fn detach_volume(&self, id: VmId, vol: VolumeId) -> Result<(), HvError> {
        let _ = (id, vol);
        Err(unsupported("volumes"))
    }
    /// Grows a disk of a running VM (`device`: `root`, `disk1`, `vol-<id>`).
    async fn resize_disk(&self, id: VmId, device: &str, size_bytes: u64) -> Result<(), HvError> {
        let _ = (id, device, size_bytes);
        Err(unsupported("volumes"))
    }
    /// An internal snapshot of one disk of a running VM.
    async fn snapshot_disk(&self, id: VmId, device: &str, name: &str) -> Result<(), HvError> {
        let _ = (id, device, name);
        Err(unsupported("volumes"))
    }
    /// Starts copying a running VM's disk into `target` (made here, `format`), at most `speed`
    /// bytes a second; the guest keeps writing (its writes are copied too). With `backing`
    /// (a boot disk), `target` overlays that image and only the disk's own layer is copied.
    async fn volume_mirror_start(
        &self,
        id: VmId,
        device: &str,
        target: &std::path::Path,
        format: VolumeFormat,
        backing: Option<&Backing>,
        speed: u64,
    ) -> Result<(), HvError> {
        let _ = (id, device, target, format, backing, speed);
        Err(unsupported("volume moves"))
    }
    /// The running copy of `device`, if any.
    async fn volume_mirror_status(
        &self,
        id: VmId,
        device: &str,
    ) -> Result<Option<MirrorStatus>, HvError> {
        let _ = (id, device);
        Err(unsupported("volume moves"))
    }
    async fn volume_mirror_speed(&self, id: VmId, device: &str, speed: u64) -> Result<(), HvError> {
        let _ = (id, device, speed);
        Err(unsupported("volume moves"))
    }
    /// Once ready: switches the disk to the copy and closes the old file.
    async fn volume_mirror_finish(&self, id: VmId, device: &str) -> Result<(), HvError> {
        let _ = (id, device);
        Err(unsupported("volume moves"))
    }
    /// Stops the copy; the disk stays on its old file.
    async fn volume_mirror_abort(&self, id: VmId, device: &str) -> Result<(), HvError> {
        let _ = (id, device);
        Err(unsupported("volume moves"))
    }
    /// The file a running VM's disk reads and writes now (`None`: no such disk).
    async fn disk_file(&self, id: VmId, device: &str) -> Result<Option<PathBuf>, HvError> {
        let _ = (id, device);
        Err(unsupported("volumes"))
    }
    /// The guests' mean I/O latency over `device`'s operations so far (`query-blockstats`
    /// total time / operations), in nanoseconds and operations.
    async fn io_latency(&self, id: VmId) -> Result<(u64, u64), HvError> {
        let _ = id;
        Err(unsupported("I/O statistics"))
    }

    /// Path of the VM's serial console log.
    fn console_path(&self, id: VmId) -> PathBuf;

    /// The VM's disk files, boot disk first (for copying a stopped VM to another host). Empty
    /// for a driver that keeps no files.
    fn disk_files(&self, id: VmId, extra_disks: usize) -> Vec<PathBuf> {
        let _ = (id, extra_disks);
        Vec::new()
    }

    /// Stops watching every VM without touching the QEMU processes (they outlive `novacron`),
    /// and starts nothing from then on: a start in flight finishes first, later ones fail. So
    /// once it returns, every QEMU this driver will ever have started is running and visible
    /// (what the fencing watchdog checks on a clean stop).
    async fn detach_all(&self);

    // Live migration, incoming side (the target host): start QEMU waiting for the RAM, with the
    // VM's disks created empty and exported over NBD for the source to mirror into.
    async fn incoming_start(&self, spec: &RuntimeSpec, plan: &IncomingPlan) -> Result<(), HvError> {
        let _ = (spec, plan);
        Err(unsupported("live migration"))
    }
    /// Once ownership moved here: stops exporting the disks and runs the guest (kept paused
    /// since it loaded).
    async fn incoming_finish(&self, id: VmId) -> Result<(), HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }
    /// Ends the waiting QEMU and deletes what `incoming_start` created.
    async fn incoming_abort(&self, id: VmId) -> Result<(), HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }

    // Outgoing side (the source host).
    /// Starts mirroring every disk to the target's NBD exports.
    async fn outgoing_mirror(
        &self,
        spec: &RuntimeSpec,
        plan: &IncomingPlan,
        tuning: &MigrationTuning,
    ) -> Result<(), HvError> {
        let _ = (spec, plan, tuning);
        Err(unsupported("live migration"))
    }
    /// Starts sending RAM (after the mirrors are ready).
    async fn outgoing_migrate(
        &self,
        id: VmId,
        plan: &IncomingPlan,
        tuning: &MigrationTuning,
    ) -> Result<(), HvError> {
        let _ = (id, plan, tuning);
        Err(unsupported("live migration"))
    }
    async fn outgoing_status(&self, id: VmId) -> Result<MigrationStats, HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }
    /// Waits until the VM's count of migration and block-job events differs from `seen` (an
    /// event happened since), or `at_most` passed; returns the count.
    async fn outgoing_wait(&self, id: VmId, seen: u64, at_most: Duration) -> u64 {
        let _ = id;
        tokio::time::sleep(at_most).await;
        seen
    }
    /// At `pre-switchover` (the guest here is paused, its disks quiet): ends the disk mirrors,
    /// leaving the target's disks complete, and lets QEMU send the device state.
    async fn outgoing_switchover(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        let _ = spec;
        Err(unsupported("live migration"))
    }
    /// Switches a running migration to post-copy.
    async fn outgoing_postcopy(&self, id: VmId) -> Result<(), HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }
    /// Stops the migration and the mirrors; the guest keeps running here (or, after completion,
    /// stays paused for the caller to resume or stop).
    async fn outgoing_cancel(&self, id: VmId) -> Result<(), HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }
    /// After completion: removes the mirror targets. The guest here stays paused for good; the
    /// caller switches ownership and then stops this QEMU.
    async fn outgoing_complete(&self, id: VmId) -> Result<(), HvError> {
        let _ = id;
        Err(unsupported("live migration"))
    }
}

fn unsupported(what: &str) -> HvError {
    HvError::Unsupported(format!("this host's driver does not support {what}"))
}
