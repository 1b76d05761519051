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
pub mod fake;
pub mod none;
pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

use novacron_types::{ImageFormat, KernelBoot, VmId, VmState};
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
    /// Sizes of the extra blank disks, in MiB.
    pub extra_disks_mib: Vec<u64>,
    pub boot: Option<KernelBoot>,
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
    Io(#[from] std::io::Error),
}

/// What a host's hypervisor can tell about itself.
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

    /// Removes the VM's disks and files. The VM must not be running.
    async fn undefine(&self, id: VmId) -> Result<(), HvError>;

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

    /// Path of the VM's serial console log.
    fn console_path(&self, id: VmId) -> PathBuf;

    /// Stops watching every VM without touching the QEMU processes (they outlive `novacron`).
    async fn detach_all(&self);
}
