//! VMs: create, read, delete, power actions, disk snapshots, console, and keeping the recorded
//! observed state in line with what the hypervisor reports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use novacron_hypervisor::{RuntimeSpec, StateChange};
use novacron_state::{CommandV1, placement};
use novacron_types::{
    ApiError, CreateVmRequest, DiskSpec, ErrorCode, Image, KernelBoot, NodeId, Operation, Page,
    PageRequest, PlacementReport, PlacementRequest, PowerState, UpdateVmRequest, Vm, VmId,
    VmSnapshot, VmSpec, VmState, now_millis, validate,
};

use super::{OpCtx, Service, hv_error};
use crate::auth::Principal;

/// The power actions of `POST /api/v1/vms/{id}/actions/{action}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    Start,
    Stop,
    ForceStop,
    Reboot,
    Pause,
    Resume,
}

impl VmAction {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "start" => Self::Start,
            "stop" => Self::Stop,
            "force-stop" => Self::ForceStop,
            "reboot" => Self::Reboot,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            other => {
                return Err(ApiError::not_found(
                    "action",
                    format!("{other}' (known: start, stop, force-stop, reboot, pause, resume)"),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::ForceStop => "force-stop",
            Self::Reboot => "reboot",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }

    /// Whether the action makes sense in `state`; the 409 message otherwise.
    fn allowed(self, state: VmState) -> Result<(), String> {
        use VmState::*;
        let ok = match self {
            Self::Start => matches!(state, Stopped | Crashed),
            Self::Stop | Self::ForceStop => {
                matches!(state, Starting | Running | Paused | Stopping | Unknown)
            }
            // A guest QEMU halted on its own (panic, I/O error) shows as paused: reset helps.
            Self::Reboot => matches!(state, Running | Paused),
            Self::Pause => state == Running,
            Self::Resume => state == Paused,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "cannot {} a VM that is {}",
                self.as_str(),
                state.as_str()
            ))
        }
    }
}

/// Filters of `GET /api/v1/vms`.
#[derive(Clone, Debug, Default)]
pub struct VmFilter {
    pub node: Option<NodeId>,
    pub state: Option<VmState>,
}

/// A piece of the serial console log.
pub struct ConsoleChunk {
    pub data: Vec<u8>,
    /// Offset of the first byte of `data` in the log.
    pub offset: u64,
    /// Offset just past `data`: pass it back to continue.
    pub next_offset: u64,
}

pub(crate) fn vm_path(id: VmId) -> String {
    format!("/api/v1/vms/{id}")
}

impl Service {
    /// Finds a VM by ID or name.
    pub fn find_vm(&self, key: &str) -> Result<Vm, ApiError> {
        let found = self.inner.state.read(|s| match key.parse::<VmId>() {
            Ok(id) => s.vms.get(&id).cloned(),
            Err(_) => s.vm_by_name(key).cloned(),
        });
        found.ok_or_else(|| ApiError::not_found("VM", key))
    }

    /// Looks the VM up, takes its action lock, and reads it again under the lock, so checks
    /// made on the result cannot be overtaken by the action that held the lock before.
    pub(crate) async fn lock_current_vm(
        &self,
        key: &str,
    ) -> Result<(Vm, tokio::sync::OwnedMutexGuard<()>), ApiError> {
        let vm = self.get_vm(key).await?;
        let guard = self.lock_vm(vm.id, &vm.name)?;
        Ok((self.find_vm(&vm.id.to_string())?, guard))
    }

    /// [`Service::lock_current_vm`] for a VM of this host (actions run on the VM's host; the
    /// API forwards them there).
    pub(crate) async fn lock_own_vm(
        &self,
        key: &str,
    ) -> Result<(Vm, tokio::sync::OwnedMutexGuard<()>), ApiError> {
        let vm = self.get_vm(key).await?;
        if vm.node != self.inner.node {
            return Err(ApiError::unavailable(format!(
                "VM '{}' is on node {}; send the request there",
                vm.name, vm.node
            )));
        }
        self.lock_current_vm(&vm.id.to_string()).await
    }

    pub async fn get_vm(&self, key: &str) -> Result<Vm, ApiError> {
        self.inner.state.read_linearizable(|_| ()).await?;
        self.find_vm(key)
    }

    /// VMs by name, filtered, a page at a time. `stale`: this host's copy, without asking the
    /// leader whether it is current.
    pub async fn list_vms(
        &self,
        filter: &VmFilter,
        page: &PageRequest,
        stale: bool,
    ) -> Result<Page<Vm>, ApiError> {
        let pick = |s: &novacron_state::ClusterState| {
            let mut vms: Vec<&Vm> = s
                .vms
                .values()
                .filter(|v| filter.node.is_none_or(|n| v.node == n))
                .filter(|v| filter.state.is_none_or(|st| v.state == st))
                .collect();
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            page.page(vms, |v| v.name.clone())
                .map(|p| p.map(|v| v.clone()))
        };
        if stale {
            self.inner.state.read(pick)
        } else {
            self.inner.state.read_linearizable(pick).await?
        }
    }

    fn find_image(&self, key: &str) -> Option<Image> {
        self.inner.state.read(|s| match key.parse() {
            Ok(id) => s.images.get(&id).cloned(),
            Err(_) => s.image_by_name(key).cloned(),
        })
    }

    pub(crate) fn runtime_spec(&self, vm: &Vm) -> Result<RuntimeSpec, ApiError> {
        let image = self
            .inner
            .state
            .read(|s| s.images.get(&vm.spec.image).cloned())
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "image {} of VM '{}' is gone",
                    vm.spec.image, vm.name
                ))
            })?;
        let pool = self.pool_place(vm, &image)?;
        // Each disk where its volume is (disks move between pools one by one); a VM recorded
        // before its disks were volumes has them all in its pool.
        let disk_dirs = vm
            .spec
            .disks
            .iter()
            .map(|d| {
                let id = novacron_types::VolumeId::of_vm_disk(vm.id, &d.name);
                let pool = self
                    .inner
                    .state
                    .read(|s| s.volumes.get(&id).map(|v| v.pool.clone()))
                    .or_else(|| vm.spec.pool.clone())
                    .filter(|p| p != "data");
                pool.map(|p| self.vm_disk_dir(vm.id, &p).map(|(dir, ..)| dir))
                    .transpose()
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(RuntimeSpec {
            id: vm.id,
            name: vm.name.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            base_image: pool
                .as_ref()
                .and_then(|p| p.base_image.clone())
                .unwrap_or_else(|| PathBuf::from(&image.path)),
            base_format: image.format,
            extra_disks_mib: vm.spec.disks.iter().skip(1).map(|d| d.size_mib).collect(),
            boot: vm.spec.boot.clone().or(image.boot.clone()),
            shared_disks: pool.as_ref().is_some_and(|p| p.shared),
            disk_dirs,
            root_size: vm
                .spec
                .disks
                .first()
                .filter(|d| d.size_mib > image.virtual_size.div_ceil(1 << 20))
                .map(|d| d.size_mib << 20),
            volumes: self.attached_volumes(vm.id)?,
        })
    }

    /// A VM whose own disk is still recorded as moving (a move cut short, not yet recovered)
    /// must not start: recovery may switch the disk to its new file, and whatever the guest
    /// wrote to the old one would be lost.
    pub(crate) fn require_disks_settled(&self, vm: &Vm) -> Result<(), ApiError> {
        let moving = self.inner.state.read(|s| {
            s.volumes_of(vm.id)
                .into_iter()
                .find(|v| v.is_vm_disk() && v.moving_to.is_some())
                .map(|v| v.name.clone())
        });
        match moving {
            Some(disk) => Err(ApiError::conflict(format!(
                "disk '{disk}' of VM '{}' is still moving between pools; the VM starts once \
                 the move is finished or undone",
                vm.name
            ))
            .with_reason("volume_moving")),
            None => Ok(()),
        }
    }

    /// Ranks the hosts for a VM: the replicated state's rules (capacity, role, maintenance,
    /// labels, affinity) and the leader's live view (health, free disk, load). See
    /// `novacron_state::placement`.
    pub async fn place(&self, req: &PlacementRequest) -> Result<PlacementReport, ApiError> {
        validate::placement(req)?;
        if let Some(pool) = &req.pool
            && !self
                .inner
                .state
                .read_linearizable(|s| s.pools.contains_key(pool))
                .await?
        {
            return Err(ApiError::invalid(
                "pool",
                format!("pool '{pool}' not found"),
            ));
        }
        if let Some(n) = req.node
            && self.inner.state.read(|s| !s.nodes.contains_key(&n.0))
        {
            return Err(ApiError::invalid(
                "node",
                format!("host {n} is not a cluster member"),
            ));
        }
        let image_mib = match &req.image {
            Some(key) => self
                .find_image(key)
                .ok_or_else(|| ApiError::invalid("image", format!("image '{key}' not found")))?
                .virtual_size
                .div_ceil(1 << 20),
            None => 0,
        };
        let live = self.live_view().await?;
        let demand = placement::Demand {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_mib: req.disk_mib + image_mib,
            rules: &req.placement,
            pool: req.pool.as_deref(),
            vm: None,
        };
        let strategy = req.strategy.unwrap_or(self.inner.settings.placement);
        // Current VM records, not this host's possibly older copy: a VM just deleted through
        // another host has freed its room.
        self.inner
            .state
            .read_linearizable(|s| placement::rank(s, &live, &demand, strategy, req.node))
            .await
    }

    /// The leader's view of every host's health, free disk and load, for placement. A host
    /// whose last heartbeat is older than [`ClusterSettings::placement_silence`] is marked
    /// silent: it may be dead, and a VM placed there would wait for it in vain.
    ///
    /// [`ClusterSettings::placement_silence`]: crate::cluster::ClusterSettings::placement_silence
    pub(crate) async fn live_view(&self) -> Result<BTreeMap<u64, placement::Live>, ApiError> {
        let status = self.cluster_status(false).await?;
        let silence = self.cluster().settings.placement_silence().as_millis() as u64;
        Ok(status
            .members
            .iter()
            .map(|m| {
                let inv = m.inventory.as_ref();
                (
                    m.id.0,
                    placement::Live {
                        health: m.health.clone(),
                        disk_free_bytes: inv.map(|i| i.disk_free_bytes.clone()).unwrap_or_default(),
                        load1: inv.map(|i| i.load1),
                        silent_ms: m
                            .last_heard_ms_ago
                            .filter(|ms| *ms > silence && m.id != status.reported_by),
                    },
                )
            })
            .collect())
    }

    /// The placement question a create request asks: its vCPUs, memory, disks (the boot disk
    /// counted at the image's full size) and rules.
    pub fn placement_request(req: &CreateVmRequest) -> PlacementRequest {
        PlacementRequest {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_mib: req.disks.iter().map(|d| d.size_mib).sum::<u64>(),
            image: Some(req.image.clone()),
            placement: req.placement.clone(),
            node: req.node,
            strategy: None,
            pool: req.pool.clone(),
        }
    }

    /// Which host a new VM goes to: the best by [`Service::place`] that is not in `except`
    /// (hosts a first attempt could not reach), or the one asked for if it passes the same
    /// checks. The error lists every host's reasons.
    pub async fn choose_host(
        &self,
        req: &CreateVmRequest,
        except: &[NodeId],
    ) -> Result<NodeId, ApiError> {
        validate::create_vm(req)?;
        let report = self.place(&Self::placement_request(req)).await?;
        if let Some(n) = report
            .candidates
            .iter()
            .map(|c| c.node)
            .find(|n| !except.contains(n))
        {
            return Ok(n);
        }
        if !except.is_empty() && !report.candidates.is_empty() {
            let tried: Vec<String> = except.iter().map(|n| n.to_string()).collect();
            return Err(ApiError::unavailable(format!(
                "no host could take VM '{}': host(s) {} fit but did not answer",
                req.name,
                tried.join(", ")
            )));
        }
        let (first, reasons) = placement::explain(&report, None);
        let what = match req.node {
            Some(n) => format!("VM '{}' cannot go to host {n}", req.name),
            None => format!("no host can take VM '{}'", req.name),
        };
        Err(ApiError::conflict(format!("{what}: {reasons}")).with_reason(first))
    }

    pub async fn create_vm(&self, req: CreateVmRequest, who: &Principal) -> Result<Vm, ApiError> {
        validate::create_vm(&req)?;
        if let Some(n) = req.node
            && n != self.inner.node
        {
            return Err(ApiError::invalid(
                "node",
                format!("this is host {}, not host {n}", self.inner.node),
            ));
        }
        if req.boot.is_some() {
            // Kernel and initrd are host paths QEMU loads into guest memory: choosing them is
            // reading host files, so only admins may (everyone else boots what the image says).
            who.require(novacron_types::Role::Admin).map_err(|e| {
                ApiError::new(
                    e.code,
                    format!("{} (a per-VM boot override reads host files)", e.message),
                )
            })?;
        }
        let image = self.find_image(&req.image).ok_or_else(|| {
            ApiError::invalid("image", format!("image '{}' not found", req.image))
        })?;
        if self.inner.state.read(|s| s.vm_by_name(&req.name).is_some()) {
            return Err(ApiError::conflict(format!(
                "a VM named '{}' already exists",
                req.name
            )));
        }
        let mut disks = vec![DiskSpec {
            name: "root".into(),
            size_mib: image.virtual_size.div_ceil(1 << 20),
        }];
        disks.extend(req.disks.iter().enumerate().map(|(i, d)| DiskSpec {
            name: format!("disk{}", i + 1),
            size_mib: d.size_mib,
        }));
        let now = now_millis();
        let vm = Vm {
            id: VmId::new_random(),
            name: req.name.clone(),
            state: VmState::Stopped,
            state_reason: None,
            desired: PowerState::Stopped,
            node: self.inner.node,
            spec: VmSpec {
                name: req.name,
                image: image.id,
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                disks,
                boot: req.boot,
                placement: req.placement,
                pool: req.pool,
                ha: req.ha,
            },
            snapshots: Vec::new(),
            labels: Default::default(),
            created_at: now,
            updated_at: now,
            migrating_to: None,
            recovered_from: None,
        };
        // The pool's rules (it exists; HA needs it shared) before any file is made; `apply`
        // checks them again.
        self.inner.state.read(|s| s.check_vm_pool(&vm))?;
        self.require_pool_here(&vm)?;
        let spec = self.runtime_spec(&vm)?;
        if spec.shared_disks {
            self.ensure_pool_image(&image, &spec.base_image).await?;
        }
        self.inner.hv.define(&spec).await.map_err(hv_error)?;
        if let Err(e) = self
            .inner
            .state
            .propose(CommandV1::CreateVm { vm: vm.clone() })
            .await
        {
            // Lost a race for the name (or Raft failed): leave no disks behind, unless the
            // create may still have happened (a timeout: its fate is unknown).
            if e.code != ErrorCode::Timeout {
                let _ = self.inner.hv.undefine(vm.id).await;
                let _ = self.inner.hv.remove_pool_disks(&spec).await;
            }
            return Err(e);
        }
        Ok(vm)
    }

    /// Changes a VM's labels. Metadata only: any host does it, without the VM's lock.
    pub async fn update_vm(&self, key: &str, req: UpdateVmRequest) -> Result<Vm, ApiError> {
        validate::labels(req.labels.iter().map(|(k, v)| (k, v.as_ref())))?;
        if let Some(ha) = req.ha {
            let vm = self.get_vm(key).await?;
            self.inner
                .state
                .propose(CommandV1::SetVmHa {
                    id: vm.id,
                    ha,
                    at: now_millis(),
                })
                .await?;
        }
        // Only the ID is needed, and `apply` checks the VM still exists: a local lookup does,
        // unless this host has not seen the VM yet.
        let mut vm = match self.find_vm(key) {
            Ok(vm) => vm,
            Err(_) => self.get_vm(key).await?,
        };
        if !req.labels.is_empty() {
            let set = |id| CommandV1::SetVmLabels {
                id,
                changes: req.labels.clone(),
                at: now_millis(),
            };
            match self.inner.state.propose(set(vm.id)).await {
                // The local copy named a VM that is gone (deleted and its name reused): look
                // again, current this time.
                Err(e) if e.code == ErrorCode::NotFound => {
                    vm = self.get_vm(key).await?;
                    self.inner.state.propose(set(vm.id)).await?;
                }
                r => r?,
            }
        }
        self.inner
            .state
            .read(|s| s.vms.get(&vm.id).cloned())
            .ok_or_else(|| ApiError::not_found("VM", key))
    }

    pub async fn delete_vm(&self, key: &str, _who: &Principal) -> Result<(), ApiError> {
        let (vm, _guard) = self.lock_current_vm(key).await?;
        let observed = self.inner.hv.observe(vm.id).await;
        if observed.has_process() || observed == VmState::Unknown || vm.state.has_process() {
            return Err(ApiError::conflict(format!(
                "VM '{}' is {}; stop it before deleting it",
                vm.name,
                observed.as_str()
            )));
        }
        // Files first: the driver refuses while any QEMU of this VM lives, so a delete can never
        // orphan a process. In its own task, so a client that goes away cannot split it.
        let svc = self.clone();
        let spec = self.runtime_spec(&vm)?;
        tokio::spawn(async move {
            let _guard = _guard;
            svc.inner.hv.undefine(vm.id).await.map_err(hv_error)?;
            svc.inner
                .state
                .propose(CommandV1::DeleteVm { id: vm.id })
                .await?;
            // A shared pool's disks outlive the host's links; they go once the VM is gone (if
            // the pool is mounted here: otherwise they stay for the operator to remove).
            if let Err(e) = svc.require_pool_here(&vm) {
                tracing::warn!(vm = %vm.id, "leaving the VM's disks in its pool: {}", e.message);
            } else if let Err(e) = svc.inner.hv.remove_pool_disks(&spec).await {
                tracing::warn!(vm = %vm.id, "removing the VM's disks from its pool: {e}");
            }
            Ok(())
        })
        .await
        .map_err(|e| ApiError::internal(format!("deleting the VM: {e}")))?
    }

    /// Starts a power action as an operation.
    pub async fn vm_action(
        &self,
        key: &str,
        action: VmAction,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        // Checked under the lock: the action before this one may have changed the state.
        let (vm, guard) = self.lock_own_vm(key).await?;
        action.allowed(vm.state).map_err(ApiError::conflict)?;
        let svc = self.clone();
        let kind = format!("vm.{}", action.as_str());
        let now = now_millis();
        let desired = match action {
            VmAction::Start | VmAction::Resume | VmAction::Reboot => PowerState::Running,
            VmAction::Stop | VmAction::ForceStop => PowerState::Stopped,
            VmAction::Pause => PowerState::Paused,
        };
        // The new desired state and the transitional state go in the operation's own batch.
        let mut first = vec![CommandV1::SetVmDesired {
            id: vm.id,
            desired,
            at: now,
        }];
        let transitional = match action {
            VmAction::Start => Some(VmState::Starting),
            VmAction::Stop => Some(VmState::Stopping),
            _ => None,
        };
        if let Some(state) = transitional {
            // Refused if the VM is no longer this host's by the time it applies (HA moved it),
            // so the action never starts here.
            first.push(CommandV1::RecordVmObservedOn {
                node: self.inner.node,
                id: vm.id,
                state,
                reason: None,
                at: now,
            });
        }
        self.spawn_operation(
            &kind,
            vec![vm_path(vm.id)],
            who,
            first,
            move |ctx| async move {
                let _guard = guard;
                svc.run_action(&vm, action, &ctx).await
            },
        )
        .await
    }

    async fn run_action(&self, vm: &Vm, action: VmAction, ctx: &OpCtx) -> Result<(), ApiError> {
        let hv = &self.inner.hv;
        let result = match action {
            VmAction::Start => {
                let spec = self.runtime_spec(vm)?;
                let started = Instant::now();
                // Disks in a pool: (re)link them here (a VM moved cold on a shared pool has
                // no directory on its new host yet).
                self.require_pool_here(vm)?;
                self.require_lease(vm)?;
                self.require_disks_settled(vm)?;
                let linked = match spec.in_pools() {
                    true => hv.link_disks(&spec).await,
                    false => Ok(()),
                };
                let r = match linked {
                    Ok(()) => hv.start(&spec).await,
                    Err(e) => Err(e),
                };
                if r.is_ok() {
                    self.inner
                        .metrics
                        .qemu_start_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                r
            }
            VmAction::Stop => {
                let timeout = self.inner.settings.shutdown_timeout;
                let msg = format!(
                    "ACPI power-down sent; forced off after {}s",
                    timeout.as_secs()
                );
                ctx.progress(10, msg).await;
                hv.shutdown(vm.id, timeout).await
            }
            VmAction::ForceStop => hv.force_stop(vm.id).await,
            VmAction::Reboot => hv.reboot(vm.id).await,
            VmAction::Pause => hv.pause(vm.id).await,
            VmAction::Resume => hv.resume(vm.id).await,
        };
        // Whatever happened, record what QEMU says now.
        self.sync_observed(vm.id, None).await;
        result.map_err(hv_error)
    }

    /// Records an observed state if it differs from the stored one.
    async fn record_observed(&self, id: VmId, state: VmState, reason: Option<String>) {
        let stored = self
            .inner
            .state
            .read(|s| s.vms.get(&id).map(|v| (v.state, v.state_reason.clone())));
        match stored {
            None => {}
            Some((s, r)) if s == state && r == reason => {}
            Some(_) => {
                let cmd = CommandV1::RecordVmObservedOn {
                    node: self.inner.node,
                    id,
                    state,
                    reason,
                    at: now_millis(),
                };
                if let Err(e) = self.inner.state.propose(cmd).await {
                    tracing::warn!(vm = %id, "recording observed state: {e}");
                }
            }
        }
    }

    /// Records what the hypervisor reports now about a VM of this host.
    pub(crate) async fn sync_vm_observed(&self, id: VmId) {
        let ours = self
            .inner
            .state
            .read(|s| s.vms.get(&id).map(|v| v.node == self.inner.node));
        if ours == Some(true) {
            self.sync_observed(id, None).await;
        }
    }

    /// Records what the hypervisor reports now.
    async fn sync_observed(&self, id: VmId, reason: Option<String>) {
        let state = self.inner.hv.observe(id).await;
        let stored = self
            .inner
            .state
            .read(|s| s.vms.get(&id).map(|v| (v.state, v.state_reason.clone())));
        // A process that ended leaves no trace in the driver: keep a recorded crash (and its
        // reason) rather than overwrite it with a plain "stopped".
        if let Some((VmState::Crashed, _)) = stored
            && state == VmState::Stopped
        {
            return;
        }
        self.record_observed(id, state, reason).await;
    }

    /// Applies one change reported by the hypervisor (run by the observer task).
    pub async fn on_state_change(&self, change: StateChange) {
        let ours = self
            .inner
            .state
            .read(|s| s.vms.get(&change.id).map(|v| v.node == self.inner.node));
        if ours != Some(true) {
            return;
        }
        match change.state {
            // Terminal states come from the process ending: the driver has no process to ask.
            VmState::Stopped | VmState::Crashed => {
                self.record_observed(change.id, change.state, change.reason)
                    .await
            }
            _ => self.sync_observed(change.id, change.reason).await,
        }
    }

    /// After a restart: re-adopt every VM of this host whose QEMU still runs, and record the
    /// ones whose QEMU disappeared while `novacron` was down.
    pub async fn readopt_vms(&self) {
        let vms: Vec<Vm> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|v| v.node == self.inner.node)
                .cloned()
                .collect()
        });
        for vm in vms {
            let spec = match self.runtime_spec(&vm) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(vm = %vm.id, "cannot re-adopt: {e}");
                    continue;
                }
            };
            match self.inner.hv.adopt(&spec).await {
                Ok(VmState::Stopped) if vm.state.has_process() => {
                    self.record_observed(
                        vm.id,
                        VmState::Crashed,
                        Some("QEMU exited while novacron was not running".into()),
                    )
                    .await
                }
                Ok(VmState::Stopped) => {}
                Ok(state) => self.record_observed(vm.id, state, None).await,
                Err(e) => {
                    self.record_observed(
                        vm.id,
                        VmState::Unknown,
                        Some(format!("re-adoption failed: {e}")),
                    )
                    .await
                }
            }
        }
    }

    pub async fn snapshot_vm(
        &self,
        key: &str,
        name: &str,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        validate::name("name", name)?;
        let (vm, guard) = self.lock_current_vm(key).await?;
        if vm.snapshots.iter().any(|s| s.name == name) {
            return Err(ApiError::conflict(format!(
                "VM '{}' already has a snapshot named '{name}'",
                vm.name
            )));
        }
        self.require_stopped(&vm, "snapshot")?;
        let svc = self.clone();
        let name = name.to_string();
        self.spawn_operation(
            "vm.snapshot",
            vec![vm_path(vm.id)],
            who,
            vec![],
            move |_ctx| async move {
                let _guard = guard;
                svc.inner
                    .hv
                    .snapshot_disks(vm.id, &name)
                    .await
                    .map_err(hv_error)?;
                let snapshot = VmSnapshot {
                    name: name.clone(),
                    created_at: now_millis(),
                };
                if let Err(e) = svc
                    .inner
                    .state
                    .propose(CommandV1::AddVmSnapshot {
                        id: vm.id,
                        snapshot,
                    })
                    .await
                {
                    let _ = svc.inner.hv.delete_disk_snapshot(vm.id, &name).await;
                    return Err(e);
                }
                Ok(())
            },
        )
        .await
    }

    pub async fn restore_vm(
        &self,
        key: &str,
        name: &str,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        let (vm, guard) = self.lock_current_vm(key).await?;
        if !vm.snapshots.iter().any(|s| s.name == name) {
            return Err(ApiError::not_found("snapshot", name));
        }
        self.require_stopped(&vm, "restore")?;

        let svc = self.clone();
        let name = name.to_string();
        self.spawn_operation(
            "vm.restore",
            vec![vm_path(vm.id)],
            who,
            vec![],
            move |_ctx| async move {
                let _guard = guard;
                svc.inner
                    .hv
                    .restore_disks(vm.id, &name)
                    .await
                    .map_err(hv_error)
            },
        )
        .await
    }

    pub async fn delete_snapshot(
        &self,
        key: &str,
        name: &str,
        _who: &Principal,
    ) -> Result<(), ApiError> {
        let (vm, guard) = self.lock_current_vm(key).await?;
        if !vm.snapshots.iter().any(|s| s.name == name) {
            return Err(ApiError::not_found("snapshot", name));
        }
        self.require_stopped(&vm, "delete a snapshot of")?;
        // In its own task: a client that goes away must not leave the disks half done.
        let svc = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let _guard = guard;
            svc.inner
                .hv
                .delete_disk_snapshot(vm.id, &name)
                .await
                .map_err(hv_error)?;
            let cmd = CommandV1::RemoveVmSnapshot {
                id: vm.id,
                name,
                at: now_millis(),
            };
            svc.inner.state.propose(cmd).await
        })
        .await
        .map_err(|e| ApiError::internal(format!("deleting the snapshot: {e}")))?
    }

    fn require_stopped(&self, vm: &Vm, what: &str) -> Result<(), ApiError> {
        if vm.state.has_process() {
            return Err(ApiError::conflict(format!(
                "cannot {what} VM '{}' while it is {}; stop it first",
                vm.name,
                vm.state.as_str()
            )));
        }
        Ok(())
    }

    /// Reads the console log from `offset` (or the last `tail` bytes), at most `limit` bytes.
    pub async fn console(
        &self,
        key: &str,
        offset: Option<u64>,
        tail: Option<u64>,
        limit: u64,
    ) -> Result<ConsoleChunk, ApiError> {
        let vm = self.get_vm(key).await?;
        let path = self.inner.hv.console_path(vm.id);
        read_console(&path, offset, tail, limit).await
    }

    pub fn console_path(&self, vm: &Vm) -> PathBuf {
        self.inner.hv.console_path(vm.id)
    }

    /// The image a VM would boot with (for tests and `vm show`).
    pub fn effective_boot(&self, vm: &Vm) -> Option<KernelBoot> {
        self.runtime_spec(vm).ok().and_then(|s| s.boot)
    }
}

pub async fn read_console(
    path: &std::path::Path,
    offset: Option<u64>,
    tail: Option<u64>,
    limit: u64,
) -> Result<ConsoleChunk, ApiError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ConsoleChunk {
                data: Vec::new(),
                offset: 0,
                next_offset: 0,
            });
        }
        Err(e) => return Err(ApiError::internal(format!("reading console: {e}"))),
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let start = match (offset, tail) {
        (Some(o), _) => o.min(len),
        (None, Some(t)) => len.saturating_sub(t),
        (None, None) => 0,
    };
    let want = (len - start).min(limit);
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Up to end of file: the log may be cut (rotated) between the size and the read.
    let mut data = Vec::with_capacity(want as usize);
    (&mut file)
        .take(want)
        .read_to_end(&mut data)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let next_offset = start + data.len() as u64;
    Ok(ConsoleChunk {
        data,
        offset: start,
        next_offset,
    })
}

/// The lease keeper's view of this host (see [`crate::cluster::lease`]).
#[async_trait::async_trait]
impl crate::cluster::lease::LocalHost for Service {
    fn visible_pools(&self) -> BTreeMap<String, u64> {
        Service::visible_pools(self)
    }

    async fn rejoined(&self) {
        // Record what the VMs really are now (fenced ones stay paused or stopped until
        // someone acts on them).
        self.readopt_vms().await;
        // VMs HA restarted elsewhere meanwhile: this host's copies go.
        self.remove_stray_copies().await;
        self.resume_fenced().await;
    }
}

impl Service {
    /// Back in the cluster: the VMs fencing paused run again if they are still this host's and
    /// still meant to run (nobody can have started them elsewhere: only HA VMs move on host loss,
    /// and those were stopped, not paused).
    async fn resume_fenced(&self) {
        let me = self.node_id();
        for id in self.cluster().take_paused_by_fence() {
            let still_ours = self
                .state()
                .read_linearizable(|s| {
                    s.vms.get(&id).is_some_and(|v| {
                        v.node == me
                            && !v.spec.ha
                            && v.desired == novacron_types::PowerState::Running
                            && v.migrating_to.is_none()
                    })
                })
                .await;
            if !matches!(still_ours, Ok(true))
                || self.hypervisor().observe(id).await != VmState::Paused
            {
                continue;
            }
            match self.hypervisor().resume(id).await {
                Ok(()) => tracing::warn!(vm = %id, "resumed a VM paused by fencing"),
                Err(e) => tracing::error!(vm = %id, "resuming a VM paused by fencing: {e}"),
            }
            self.sync_vm_observed(id).await;
        }
    }
}
