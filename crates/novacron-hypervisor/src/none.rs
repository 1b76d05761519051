//! The driver of a witness host: it runs no VMs, and says so if asked to.

use std::path::PathBuf;
use std::time::Duration;

use novacron_types::{VmId, VmState};
use tokio::sync::broadcast;

use crate::{HvError, Hypervisor, HypervisorInfo, RuntimeSpec, StateChange};

pub struct NoHypervisor {
    events: broadcast::Sender<StateChange>,
}

impl Default for NoHypervisor {
    fn default() -> Self {
        Self {
            events: broadcast::channel(1).0,
        }
    }
}

fn refused() -> HvError {
    HvError::StartFailed("this host is a witness: it runs no VMs".into())
}

#[async_trait::async_trait]
impl Hypervisor for NoHypervisor {
    fn info(&self) -> HypervisorInfo {
        HypervisorInfo {
            qemu_version: String::new(),
            accelerator: "none".into(),
        }
    }
    fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.events.subscribe()
    }
    async fn define(&self, _spec: &RuntimeSpec) -> Result<(), HvError> {
        Err(refused())
    }
    async fn undefine(&self, _id: VmId) -> Result<(), HvError> {
        Ok(())
    }
    async fn start(&self, _spec: &RuntimeSpec) -> Result<(), HvError> {
        Err(refused())
    }
    async fn shutdown(&self, id: VmId, _timeout: Duration) -> Result<(), HvError> {
        Err(HvError::NotRunning(id))
    }
    async fn force_stop(&self, id: VmId) -> Result<(), HvError> {
        Err(HvError::NotRunning(id))
    }
    async fn reboot(&self, id: VmId) -> Result<(), HvError> {
        Err(HvError::NotRunning(id))
    }
    async fn pause(&self, id: VmId) -> Result<(), HvError> {
        Err(HvError::NotRunning(id))
    }
    async fn resume(&self, id: VmId) -> Result<(), HvError> {
        Err(HvError::NotRunning(id))
    }
    async fn observe(&self, _id: VmId) -> VmState {
        VmState::Stopped
    }
    async fn adopt(&self, _spec: &RuntimeSpec) -> Result<VmState, HvError> {
        Ok(VmState::Stopped)
    }
    async fn snapshot_disks(&self, _id: VmId, _name: &str) -> Result<(), HvError> {
        Err(refused())
    }
    async fn restore_disks(&self, _id: VmId, _name: &str) -> Result<(), HvError> {
        Err(refused())
    }
    async fn delete_disk_snapshot(&self, _id: VmId, _name: &str) -> Result<(), HvError> {
        Err(refused())
    }
    fn console_path(&self, _id: VmId) -> PathBuf {
        PathBuf::from("/dev/null")
    }
    async fn detach_all(&self) {}
}
