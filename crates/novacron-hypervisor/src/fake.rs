//! An in-memory hypervisor for fast tests of the layers above. It follows the same state rules as
//! the QEMU driver (see `tests/conformance.rs`), and can simulate a crash.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::broadcast;

use novacron_types::{VmId, VmState};

use crate::{HvError, Hypervisor, HypervisorInfo, RuntimeSpec, StateChange};

struct FakeVm {
    state: VmState,
    snapshots: BTreeSet<String>,
}

impl Default for FakeVm {
    fn default() -> Self {
        Self {
            state: VmState::Stopped,
            snapshots: BTreeSet::new(),
        }
    }
}

pub struct FakeHypervisor {
    vms: Mutex<HashMap<VmId, FakeVm>>,
    bus: broadcast::Sender<StateChange>,
    console_dir: PathBuf,
}

impl FakeHypervisor {
    pub fn new(console_dir: PathBuf) -> Self {
        let (bus, _) = broadcast::channel(256);
        Self {
            vms: Mutex::new(HashMap::new()),
            bus,
            console_dir,
        }
    }

    /// Simulates QEMU dying on its own.
    pub fn crash(&self, id: VmId, reason: &str) {
        self.set(id, VmState::Crashed, Some(reason.to_string()));
    }

    fn set(&self, id: VmId, state: VmState, reason: Option<String>) {
        if let Some(vm) = self.lock().get_mut(&id) {
            vm.state = state;
        }
        let _ = self.bus.send(StateChange { id, state, reason });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, FakeVm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self, id: VmId) -> Option<VmState> {
        self.lock().get(&id).map(|v| v.state)
    }

    fn require_process(&self, id: VmId) -> Result<VmState, HvError> {
        match self.state(id) {
            Some(s) if s.has_process() => Ok(s),
            _ => Err(HvError::NotRunning(id)),
        }
    }
}

#[async_trait::async_trait]
impl Hypervisor for FakeHypervisor {
    fn info(&self) -> HypervisorInfo {
        HypervisorInfo {
            qemu_version: "fake".into(),
            accelerator: "fake".into(),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.bus.subscribe()
    }

    async fn define(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        self.lock().entry(spec.id).or_default();
        Ok(())
    }

    async fn undefine(&self, id: VmId) -> Result<(), HvError> {
        if self.state(id).is_some_and(|s| s.has_process()) {
            return Err(HvError::AlreadyRunning(id));
        }
        self.lock().remove(&id);
        Ok(())
    }

    async fn start(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        match self.state(spec.id) {
            None => Err(HvError::StartFailed("VM is not defined".into())),
            Some(s) if s.has_process() => Err(HvError::AlreadyRunning(spec.id)),
            Some(_) => {
                self.set(spec.id, VmState::Running, None);
                Ok(())
            }
        }
    }

    async fn shutdown(&self, id: VmId, _timeout: Duration) -> Result<(), HvError> {
        self.force_stop(id).await
    }

    async fn force_stop(&self, id: VmId) -> Result<(), HvError> {
        self.require_process(id)?;
        self.set(id, VmState::Stopped, None);
        Ok(())
    }

    async fn reboot(&self, id: VmId) -> Result<(), HvError> {
        self.require_process(id).map(drop)
    }

    async fn pause(&self, id: VmId) -> Result<(), HvError> {
        self.require_process(id)?;
        self.set(id, VmState::Paused, None);
        Ok(())
    }

    async fn resume(&self, id: VmId) -> Result<(), HvError> {
        self.require_process(id)?;
        self.set(id, VmState::Running, None);
        Ok(())
    }

    async fn observe(&self, id: VmId) -> VmState {
        self.state(id).unwrap_or(VmState::Stopped)
    }

    async fn adopt(&self, spec: &RuntimeSpec) -> Result<VmState, HvError> {
        Ok(self.observe(spec.id).await)
    }

    async fn snapshot_disks(&self, id: VmId, name: &str) -> Result<(), HvError> {
        if self.require_process(id).is_ok() {
            return Err(HvError::WrongState {
                op: "disk snapshots",
                state: "running",
            });
        }
        if let Some(vm) = self.lock().get_mut(&id) {
            vm.snapshots.insert(name.to_string());
        }
        Ok(())
    }

    async fn restore_disks(&self, id: VmId, name: &str) -> Result<(), HvError> {
        if self.require_process(id).is_ok() {
            return Err(HvError::WrongState {
                op: "disk snapshots",
                state: "running",
            });
        }
        match self.lock().get(&id) {
            Some(vm) if vm.snapshots.contains(name) => Ok(()),
            _ => Err(HvError::Disk {
                action: "snapshot restore",
                message: format!("no snapshot {name}"),
            }),
        }
    }

    async fn delete_disk_snapshot(&self, id: VmId, name: &str) -> Result<(), HvError> {
        if let Some(vm) = self.lock().get_mut(&id) {
            vm.snapshots.remove(name);
        }
        Ok(())
    }

    fn console_path(&self, id: VmId) -> PathBuf {
        self.console_dir.join(format!("{id}.log"))
    }

    async fn detach_all(&self) {}
}
