//! Live migration. The VM's host (the source) drives it as an operation; the target answers
//! `/internal/v1/migrations/*`. The QEMU steps are the driver's (`novacron_hypervisor`'s
//! `incoming_*`/`outgoing_*`); this module decides, reports and cleans up.
//!
//! Invariants:
//! - Ownership moves once, by one Raft command (`MoveVm`, checked against the source and the
//!   target's capacity), after QEMU reported completion and the target's guest runs.
//! - Until then any failure (source, target, network, cancel, timeout) ends with the guest
//!   running on the source only: the source cancels, the target kills its waiting QEMU and
//!   deletes its copies. If the target may have started the guest and cannot confirm it has
//!   not, the source stays paused and says so, rather than risk two running copies.
//! - A target never deletes files of a VM it owns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use novacron_hypervisor::{HvError, IncomingPlan, MigrationStats, MigrationTuning};
use novacron_state::{CommandV1, placement};
use novacron_types::{
    ApiError, ErrorCode, HostRole, MigrateVmRequest, MigrationProgress, MigrationTimeoutAction,
    NodeId, Operation, OperationId, PlacementStrategy, Vm, VmId, VmState, now_millis,
};

use super::vms::vm_path;
use super::{OpCtx, Service, hv_error};
use crate::auth::Principal;

/// Host defaults for migrations (`serve --migration-*`).
#[derive(Clone, Debug)]
pub struct MigrationSettings {
    pub max_bandwidth_mib: u64,
    pub disk_bandwidth_mib: Option<u64>,
    pub downtime_limit_ms: u64,
    pub auto_converge: bool,
    pub timeout: Duration,
    pub on_timeout: MigrationTimeoutAction,
    /// Migrations this host sends at once.
    pub max_outgoing: usize,
    /// Migrations this host receives at once.
    pub max_incoming: usize,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        Self {
            max_bandwidth_mib: 1024,
            disk_bandwidth_mib: None,
            downtime_limit_ms: 300,
            auto_converge: true,
            timeout: Duration::from_secs(600),
            on_timeout: MigrationTimeoutAction::Abort,
            max_outgoing: 2,
            max_incoming: 2,
        }
    }
}

/// Per-host bookkeeping: concurrency permits and cancel switches.
pub(crate) struct Migrations {
    outgoing: Arc<tokio::sync::Semaphore>,
    incoming: Arc<tokio::sync::Semaphore>,
    /// Incoming migrations waiting here (by attempt), each holding a permit until finished or
    /// aborted.
    waiting: std::sync::Mutex<HashMap<VmId, (u64, tokio::sync::OwnedSemaphorePermit)>>,
    /// Running outgoing migrations by operation: set to true to cancel.
    pub(crate) cancel: std::sync::Mutex<HashMap<OperationId, tokio::sync::watch::Sender<bool>>>,
}

impl Migrations {
    pub(crate) fn new(s: &MigrationSettings) -> Self {
        Self {
            outgoing: Arc::new(tokio::sync::Semaphore::new(s.max_outgoing.max(1))),
            incoming: Arc::new(tokio::sync::Semaphore::new(s.max_incoming.max(1))),
            waiting: Default::default(),
            cancel: Default::default(),
        }
    }
}

/// Source → target: get ready to receive `vm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IncomingRequest {
    pub vm: VmId,
    pub source: NodeId,
    pub postcopy: bool,
}

/// Source → target: copy the stopped `vm`'s disks from the source, at most `bandwidth` bytes/s.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColdRequest {
    pub vm: VmId,
    pub source: NodeId,
    pub bandwidth: u64,
}

/// What a cold copy moved.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ColdCopied {
    pub bytes: u64,
}

fn refused(reason: &str, message: impl Into<String>) -> ApiError {
    ApiError::conflict(message).with_reason(reason)
}

/// A target only receives a VM its source recorded as moving there (`BeginMigration`).
fn check_announced(vm: &Vm, source: NodeId, me: NodeId) -> Result<(), ApiError> {
    if vm.node != source {
        return Err(refused(
            "not_on_source",
            format!("VM '{}' is on host {}, not host {source}", vm.name, vm.node),
        ));
    }
    if vm.migrating_to != Some(me) {
        return Err(refused(
            "not_announced",
            format!("no migration of VM '{}' to host {me} is recorded", vm.name),
        ));
    }
    Ok(())
}

/// The host part of `http://HOST:PORT`.
fn host_of(api_address: &str) -> String {
    let rest = api_address
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(api_address);
    let hostport = rest.split('/').next().unwrap_or(rest);
    match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_matches(['[', ']']).to_string(),
        None => hostport.to_string(),
    }
}

/// Two distinct free ports (both held open while they are picked).
fn two_free_ports(host: &str) -> Result<(u16, u16), ApiError> {
    let bind = || {
        std::net::TcpListener::bind((host, 0))
            .map_err(|e| ApiError::internal(format!("no free port on {host}: {e}")))
    };
    let (a, b) = (bind()?, bind()?);
    let port = |l: &std::net::TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    Ok((port(&a)?, port(&b)?))
}

impl Service {
    pub(crate) fn migrations(&self) -> &Migrations {
        &self.inner.migrations
    }

    // -----------------------------------------------------------------------------------------
    // Target side

    /// One of this host's incoming-migration slots, or 409 `too_many_incoming`.
    fn incoming_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.migrations()
            .incoming
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                refused(
                    "too_many_incoming",
                    format!(
                        "host {} already receives {} migrations (--max-incoming-migrations)",
                        self.inner.node, self.inner.settings.migration.max_incoming
                    ),
                )
            })
    }

    /// The VM's runtime spec, if its image is on this host (at the same path as everywhere).
    fn spec_with_image_here(&self, vm: &Vm) -> Result<novacron_hypervisor::RuntimeSpec, ApiError> {
        self.require_pool_here(vm)?;
        let spec = self.runtime_spec(vm)?;
        if !spec.base_image.exists() {
            return Err(refused(
                "image_missing",
                format!(
                    "the image of VM '{}' is not at {} on host {}; import it there first",
                    vm.name,
                    spec.base_image.display(),
                    self.inner.node
                ),
            ));
        }
        Ok(spec)
    }

    /// Starts a QEMU waiting for `req.vm`'s RAM, with empty disks exported for the mirror.
    pub async fn incoming_prepare(&self, req: IncomingRequest) -> Result<IncomingPlan, ApiError> {
        let me = self.inner.node;
        let permit = self.incoming_slot()?;
        let (vm, info) = self
            .inner
            .state
            .read_linearizable(|s| (s.vms.get(&req.vm).cloned(), s.nodes.get(&me.0).cloned()))
            .await?;
        let vm = vm.ok_or_else(|| ApiError::not_found("VM", req.vm))?;
        check_announced(&vm, req.source, me)?;
        let _lock = self.lock_vm(vm.id, &vm.name)?;
        let info = info.ok_or_else(|| ApiError::not_found("host", me))?;
        if info.role == HostRole::Witness {
            return Err(refused(
                "witness",
                format!("host {me} is a witness and runs no VMs"),
            ));
        }
        let spec = self.spec_with_image_here(&vm)?;
        let host = host_of(&info.api_address);
        let (migration_port, nbd_port) = two_free_ports(&host)?;
        let plan = IncomingPlan {
            host: host.clone(),
            migration_port,
            nbd_port,
            postcopy: req.postcopy,
        };
        self.inner
            .hv
            .incoming_start(&spec, &plan)
            .await
            .map_err(|e| match e {
                HvError::WrongState { .. } | HvError::AlreadyRunning(_) => refused(
                    "target_busy",
                    format!("host {me} cannot receive VM '{}': {e}", vm.name),
                ),
                other => hv_error(other),
            })?;
        let attempt: u64 = rand::random();
        self.migrations()
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.id, (attempt, permit));
        // If the source never finishes or aborts (it died), this copy goes by itself.
        let svc = self.clone();
        let give_up = self.inner.settings.migration.timeout * 2 + Duration::from_secs(60);
        let id = vm.id;
        tokio::spawn(async move {
            tokio::time::sleep(give_up).await;
            let stale = svc
                .migrations()
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .is_some_and(|(a, _)| *a == attempt);
            if stale {
                tracing::warn!(vm = %id, "an incoming migration was never finished; removing it");
                let _ = svc.incoming_abort(id).await;
            }
        });
        tracing::info!(vm = %vm.id, source = %req.source, ?plan, "waiting for an incoming migration");
        Ok(plan)
    }

    /// The source saw completion: run the guest here.
    pub async fn incoming_finish(&self, vm: VmId) -> Result<(), ApiError> {
        let r = self.inner.hv.incoming_finish(vm).await.map_err(hv_error);
        self.migrations()
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm);
        r
    }

    /// The migration failed or was cancelled: end the waiting QEMU and delete its copies.
    pub async fn incoming_abort(&self, vm: VmId) -> Result<(), ApiError> {
        // After whatever else touches this VM here (a prepare, a copy), and on current records:
        // a copy that became this host's own must never be deleted.
        let _lock = self.lock_vm_waiting(vm).await;
        let owned = self
            .inner
            .state
            .read_linearizable(|s| s.vms.get(&vm).map(|v| v.node) == Some(self.inner.node))
            .await?;
        if owned {
            return Err(refused(
                "owned_here",
                format!("VM {vm} belongs to this host; its files stay"),
            ));
        }
        let r = self.inner.hv.incoming_abort(vm).await.map_err(hv_error);
        self.migrations()
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm);
        r
    }

    /// Copies a stopped VM's disk files from its host, rate-limited, into this host's VM
    /// directory (each file complete and synced before it gets its name).
    pub async fn cold_receive(&self, req: ColdRequest) -> Result<ColdCopied, ApiError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let me = self.inner.node;
        let _permit = self.incoming_slot()?;
        let (vm, source_addr) = self
            .inner
            .state
            .read_linearizable(|s| {
                (
                    s.vms.get(&req.vm).cloned(),
                    s.nodes.get(&req.source.0).map(|n| n.api_address.clone()),
                )
            })
            .await?;
        let vm = vm.ok_or_else(|| ApiError::not_found("VM", req.vm))?;
        let source_addr = source_addr.ok_or_else(|| ApiError::not_found("host", req.source))?;
        check_announced(&vm, req.source, me)?;
        let _lock = self.lock_vm(vm.id, &vm.name)?;
        let spec = self.spec_with_image_here(&vm)?;
        let files = self.inner.hv.disk_files(vm.id, spec.extra_disks_mib.len());
        let Some(dir) = files
            .first()
            .and_then(|f| f.parent())
            .map(|d| d.to_path_buf())
        else {
            return Err(refused("witness", format!("host {me} keeps no VM files")));
        };
        if dir.exists() {
            return Err(refused(
                "target_busy",
                format!(
                    "host {me} already has files of VM '{}' at {}",
                    vm.name,
                    dir.display()
                ),
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        // Disks in a (local) pool go to this host's directory of the pool, linked from the VM's.
        let files: Vec<std::path::PathBuf> = files
            .iter()
            .enumerate()
            .map(|(i, f)| match (spec.disk_dir(i), f.file_name()) {
                (Some(pool_dir), Some(name)) => {
                    std::fs::create_dir_all(pool_dir)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    Ok(pool_dir.join(name))
                }
                _ => Ok(f.clone()),
            })
            .collect::<Result<_, ApiError>>()?;
        let limiter = crate::limiter::ByteRate::new(req.bandwidth);
        let copy = async {
            let mut bytes = 0u64;
            for (n, file) in files.iter().enumerate() {
                let url = format!("/internal/v1/vms/{}/disks/{n}", vm.id);
                let resp = self
                    .cluster()
                    .transport
                    .get_stream(&source_addr, &url)
                    .await
                    .map_err(|e| ApiError::unavailable(format!("copying {url}: {e}")))?;
                let part = file.with_extension("qcow2.part");
                let mut out = tokio::fs::File::create(&part)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| {
                        ApiError::unavailable(format!("copying {url}: the stream broke: {e}"))
                    })?;
                    for piece in chunk.chunks(limiter.burst_bytes()) {
                        limiter.take(piece.len()).await;
                        out.write_all(piece)
                            .await
                            .map_err(|e| ApiError::internal(e.to_string()))?;
                        bytes += piece.len() as u64;
                    }
                }
                out.sync_all()
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                tokio::fs::rename(&part, file)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
            }
            if spec.in_pools() {
                self.inner.hv.link_disks(&spec).await.map_err(hv_error)?;
            }
            Ok::<_, ApiError>(bytes)
        };
        let result = match copy.await {
            // The source may have given up meanwhile: keep the copy only if still expected.
            Ok(bytes) => match self
                .inner
                .state
                .read_linearizable(|s| s.vms.get(&vm.id).and_then(|v| v.migrating_to))
                .await
            {
                Ok(Some(to)) if to == me => Ok(ColdCopied { bytes }),
                Ok(_) => Err(refused(
                    "not_announced",
                    "the source gave up this migration while the disks were copied",
                )),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            for pool_dir in spec.disk_dirs.iter().flatten() {
                let _ = std::fs::remove_dir_all(pool_dir);
            }
        }
        result
    }

    /// Source side of a cold copy: the `n`th disk file of a stopped VM of this host.
    pub async fn serve_disk(&self, vm: VmId, n: usize) -> Result<tokio::fs::File, ApiError> {
        let v = self.find_vm(&vm.to_string())?;
        if v.node != self.inner.node {
            return Err(ApiError::not_found("VM on this host", vm));
        }
        if self.inner.hv.observe(vm).await.has_process() {
            return Err(ApiError::conflict(format!("VM '{}' is running", v.name)));
        }
        let files = self
            .inner
            .hv
            .disk_files(vm, v.spec.disks.len().saturating_sub(1));
        let file = files.get(n).ok_or_else(|| ApiError::not_found("disk", n))?;
        tokio::fs::File::open(file)
            .await
            .map_err(|e| ApiError::internal(format!("opening {}: {e}", file.display())))
    }

    // -----------------------------------------------------------------------------------------
    // Source side

    /// Checks everything that can be checked before anything moves, and picks the target.
    /// `keeps_running`: a live move, so the target must also match accelerator and QEMU.
    async fn migration_target(
        &self,
        vm: &Vm,
        asked: Option<NodeId>,
        keeps_running: bool,
    ) -> Result<NodeId, ApiError> {
        let me = self.inner.node;
        if asked == Some(me) {
            return Err(refused(
                "same_host",
                format!("VM '{}' is already on host {me}", vm.name),
            ));
        }
        let live = self.live_view().await?;
        // Disks on a shared pool stay where they are: the target needs only to see the pool.
        let shared = self.runtime_spec(vm)?.shared_disks;
        let demand = placement::Demand {
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disk_mib: if shared {
                0
            } else {
                vm.spec.disks.iter().map(|d| d.size_mib).sum()
            },
            rules: &vm.spec.placement,
            pool: vm.spec.pool.as_deref(),
            vm: Some(vm.id),
        };
        let report = self
            .inner
            .state
            .read_linearizable(|s| {
                placement::rank(s, &live, &demand, PlacementStrategy::Spread, asked)
            })
            .await?;
        let target = report.candidates.iter().map(|c| c.node).find(|n| *n != me);
        let Some(target) = target else {
            let (code, why) = placement::explain(&report, Some(me));
            return Err(refused(
                &code,
                format!(
                    "VM '{}' cannot move{}: {}",
                    vm.name,
                    asked.map(|n| format!(" to host {n}")).unwrap_or_default(),
                    if why.is_empty() {
                        "no other host runs VMs".to_string()
                    } else {
                        why
                    }
                ),
            ));
        };
        if !keeps_running {
            return Ok(target);
        }
        // Same accelerator and the same QEMU (the machine type must match exactly).
        let here = self.inner.hv.info();
        let status = self.cluster_status(false).await?;
        if let Some(inv) = status
            .members
            .iter()
            .find(|m| m.id == target)
            .and_then(|m| m.inventory.as_ref())
        {
            if !inv.accelerator.is_empty() && inv.accelerator != here.accelerator {
                return Err(refused(
                    "accelerator",
                    format!(
                        "host {target} runs guests with {}, this host with {}: a running guest \
                         cannot change accelerator; choose a host with {}",
                        inv.accelerator, here.accelerator, here.accelerator
                    ),
                ));
            }
            let my_cpu = crate::cluster::host::cpu_model();
            if here.accelerator == "kvm" && !inv.cpu_model.is_empty() && inv.cpu_model != my_cpu {
                return Err(refused(
                    "cpu_model",
                    format!(
                        "host {target} has a {} CPU, this host a {my_cpu}: a KVM guest runs with \
                         its host's CPU model and cannot move to a different one; choose a host \
                         with the same CPU",
                        inv.cpu_model
                    ),
                ));
            }
            if !inv.qemu_version.is_empty() && inv.qemu_version != here.qemu_version {
                return Err(refused(
                    "qemu_version",
                    format!(
                        "host {target} has QEMU {}, this host {}: guests run the `q35` machine \
                         of their QEMU, which differs between versions, so both hosts need the \
                         same QEMU; upgrade one or choose another host",
                        inv.qemu_version, here.qemu_version
                    ),
                ));
            }
        }
        Ok(target)
    }

    /// Starts a live migration of `key` as an operation.
    pub async fn migrate_vm(
        &self,
        key: &str,
        req: MigrateVmRequest,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        validate_migrate(&req)?;
        let (vm, guard) = self.lock_own_vm(key).await?;
        let observed = self.inner.hv.observe(vm.id).await;
        let cold = match (vm.state, observed) {
            (VmState::Running | VmState::Paused, VmState::Running | VmState::Paused) => false,
            (VmState::Stopped | VmState::Crashed, s) if !s.has_process() => true,
            _ => {
                return Err(refused(
                    "wrong_state",
                    format!(
                        "VM '{}' is {} (QEMU: {}); a running or paused VM moves live, a \
                         stopped one cold; wait until it settles",
                        vm.name,
                        vm.state.as_str(),
                        observed.as_str()
                    ),
                ));
            }
        };
        if !cold && !vm.snapshots.is_empty() {
            // Snapshots live inside the disk files; a live move mirrors only the current data.
            return Err(refused(
                "has_snapshots",
                format!(
                    "VM '{}' has {} disk snapshot(s), which a live move would lose; stop it and \
                     move it stopped (its files are copied whole), or delete the snapshots",
                    vm.name,
                    vm.snapshots.len()
                ),
            ));
        }
        // The same for snapshots of one of its disks (taken through the volume API).
        let with_snapshots: Vec<String> = self.inner.state.read(|s| {
            s.volumes_of(vm.id)
                .iter()
                .filter(|v| v.is_vm_disk() && !v.snapshots.is_empty())
                .map(|v| v.name.clone())
                .collect()
        });
        if !cold && !with_snapshots.is_empty() {
            return Err(refused(
                "has_snapshots",
                format!(
                    "disk(s) {} of VM '{}' have snapshots, which a live move would lose; stop \
                     it and move it stopped, or delete the snapshots",
                    with_snapshots.join(", "),
                    vm.name
                ),
            ));
        }
        // A live move would also have to put hot-plugged volumes in the same slots on the
        // target; a stopped one only needs their files there (shared pools).
        let kept: Vec<String> = self.inner.state.read(|s| {
            s.volumes_of(vm.id)
                .iter()
                .filter(|v| !v.is_vm_disk() && (!cold || v.node.is_some()))
                .map(|v| v.name.clone())
                .collect()
        });
        if !kept.is_empty() {
            return Err(refused(
                if cold {
                    "local_volumes_attached"
                } else {
                    "volumes_attached"
                },
                format!(
                    "VM '{}' has volumes attached that {} ({}); detach them first",
                    vm.name,
                    if cold {
                        "are on this host's local pools"
                    } else {
                        "a live move cannot take along (stop the VM to move it with volumes on \
                         shared pools)"
                    },
                    kept.join(", ")
                ),
            ));
        }
        let target = self.migration_target(&vm, req.target, !cold).await?;
        let permit = self
            .migrations()
            .outgoing
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                refused(
                    "too_many_outgoing",
                    format!(
                        "host {} already sends {} migrations (--max-outgoing-migrations); \
                         retry when one ends",
                        self.inner.node, self.inner.settings.migration.max_outgoing
                    ),
                )
            })?;
        let d = &self.inner.settings.migration;
        let on_timeout = req.on_timeout.unwrap_or(d.on_timeout);
        let tuning = MigrationTuning {
            max_bandwidth: Some(req.max_bandwidth_mib.unwrap_or(d.max_bandwidth_mib) << 20),
            downtime_limit_ms: Some(req.downtime_limit_ms.unwrap_or(d.downtime_limit_ms)),
            auto_converge: req.auto_converge.unwrap_or(d.auto_converge),
            postcopy: on_timeout == MigrationTimeoutAction::Postcopy,
            disk_bandwidth: req
                .disk_bandwidth_mib
                .or(d.disk_bandwidth_mib)
                .map(|m| m << 20),
        };
        let timeout = req
            .timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(d.timeout);
        let svc = self.clone();
        self.spawn_operation(
            "vm.migrate",
            vec![vm_path(vm.id), format!("/api/v1/nodes/{target}")],
            who,
            // The target's room is held from the start, so racing moves cannot overfill it.
            vec![CommandV1::BeginMigration {
                id: vm.id,
                from: self.inner.node,
                to: target,
            }],
            move |ctx| async move {
                let _guard = guard;
                let _permit = permit;
                let (tx, rx) = tokio::sync::watch::channel(false);
                svc.migrations()
                    .cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ctx.id, tx);
                if cold {
                    let r = svc
                        .cold_migrate(&ctx, &vm, target, tuning.disk_bandwidth, rx)
                        .await;
                    svc.migrations()
                        .cancel
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&ctx.id);
                    return r;
                }
                let mut run = Run {
                    svc: svc.clone(),
                    ctx: ctx.clone(),
                    vm,
                    target,
                    tuning,
                    timeout,
                    on_timeout,
                    cancel: rx,
                    started: Instant::now(),
                    progress: MigrationProgress {
                        source: svc.inner.node,
                        target,
                        phase: "preparing".into(),
                        ..Default::default()
                    },
                    last_report: None,
                    postcopy: false,
                    switched: false,
                    started_on_target: false,
                    paused_at: None,
                };
                let r = run.run().await;
                svc.migrations()
                    .cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&ctx.id);
                r
            },
        )
        .await
    }

    /// Releases the hold a failed migration had on its target.
    async fn end_migration(&self, vm: VmId) {
        if let Err(e) = self
            .inner
            .state
            .propose(CommandV1::EndMigration { id: vm })
            .await
        {
            tracing::warn!(%vm, "releasing the migration's hold on its target: {e}");
        }
    }

    /// After a restart (and re-adoption): migrations this host was sending died with it. Undo
    /// them and release their holds, and remove what is left here of VMs that live elsewhere (a waiting incoming QEMU whose
    /// source gave up, or the source's copy of a VM that moved while the cleanup was cut short).
    pub async fn clean_up_after_restart(&self) {
        let me = self.inner.node;
        let Ok(ours) = self
            .inner
            .state
            .read_linearizable(|s| {
                s.vms
                    .values()
                    .filter(|v| v.node == me && v.migrating_to.is_some())
                    .map(|v| v.id)
                    .collect::<Vec<VmId>>()
            })
            .await
        else {
            return;
        };
        for id in ours {
            tracing::info!(vm = %id, "a migration was interrupted by a restart; undoing it");
            // The QEMU (re-adopted by now) may still be migrating: stop it, remove the target's
            // copy (it never ran: targets start paused), and resume a guest left paused by a
            // completed migration whose switch of ownership never came.
            let hv = &self.inner.hv;
            let _ = hv.outgoing_cancel(id).await;
            let target = self.inner.state.read(|s| {
                let to = s.vms.get(&id)?.migrating_to?;
                s.nodes.get(&to.0).map(|n| n.api_address.clone())
            });
            if let Some(addr) = target {
                let _ = self
                    .cluster()
                    .transport
                    .call::<_, serde_json::Value>(
                        &addr,
                        &format!("/internal/v1/migrations/{id}/abort"),
                        &serde_json::json!({}),
                        Duration::from_secs(30),
                    )
                    .await;
            }
            if hv
                .outgoing_status(id)
                .await
                .is_ok_and(|st| st.status == "completed")
            {
                let _ = hv.resume(id).await;
            }
            self.end_migration(id).await;
            self.sync_vm_observed(id).await;
        }
        self.remove_stray_copies().await;
    }

    /// Removes this host's copies (QEMU and files, never a shared pool's disks) of VMs that
    /// live on another host and are not on their way here: left by a restart, or by HA having
    /// restarted them elsewhere while this host was cut off.
    pub async fn remove_stray_copies(&self) {
        let me = self.inner.node;
        let Ok(stray) = self
            .inner
            .state
            .read_linearizable(|s| {
                s.vms
                    .values()
                    .filter(|v| v.node != me && v.migrating_to != Some(me))
                    .map(|v| v.id)
                    .collect::<Vec<VmId>>()
            })
            .await
        else {
            return;
        };
        for id in stray {
            let files = self.inner.hv.disk_files(id, 0);
            let Some(dir) = files.first().and_then(|f| f.parent()) else {
                continue;
            };
            if dir.exists() {
                tracing::warn!(vm = %id, dir = %dir.display(), "removing a copy of a VM that lives on another host");
                // Under the VM's lock and on current records: it may have become this host's
                // since the list was read (HA, a migration).
                if let Err(e) = self.incoming_abort(id).await {
                    tracing::warn!(vm = %id, "removing the stray copy: {}", e.message);
                }
            }
        }
    }

    /// Moves a stopped VM: the target copies its disk files (rate-limited), then ownership
    /// switches and the source's copy goes.
    async fn cold_migrate(
        &self,
        ctx: &OpCtx,
        vm: &Vm,
        target: NodeId,
        bandwidth: Option<u64>,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ApiError> {
        let me = self.inner.node;
        let Some(addr) = self
            .inner
            .state
            .read(|s| s.nodes.get(&target.0).map(|n| n.api_address.clone()))
        else {
            self.end_migration(vm.id).await;
            return Err(ApiError::not_found("host", target));
        };
        let bandwidth = bandwidth.unwrap_or(self.inner.settings.migration.max_bandwidth_mib << 20);
        let total_mib: u64 = vm.spec.disks.iter().map(|d| d.size_mib).sum();
        let mut progress = MigrationProgress {
            source: me,
            target,
            phase: "copying disks".into(),
            disk_total_bytes: total_mib << 20,
            disk_remaining_bytes: total_mib << 20,
            transfer_rate_bytes: bandwidth,
            ..Default::default()
        };
        let started = Instant::now();
        let set = |progress: &MigrationProgress, pct: u8| CommandV1::SetMigrationProgress {
            id: ctx.id,
            progress: pct,
            message: format!("{} (cold: the VM is stopped)", describe(progress)),
            migration: progress.clone(),
            at: now_millis(),
        };
        let _ = self.inner.state.propose(set(&progress, 5)).await;
        // The disks are at most their virtual size: allow that at the bandwidth, plus a minute.
        let timeout = Duration::from_secs(((total_mib << 20) / bandwidth.max(1)) + 60);
        let req = ColdRequest {
            vm: vm.id,
            source: me,
            bandwidth,
        };
        let shared = self.runtime_spec(vm)?.shared_disks;
        let copy = async {
            if shared {
                // On a shared pool the target opens the same files: nothing to copy.
                return Ok(ColdCopied { bytes: 0 });
            }
            self.cluster()
                .transport
                .call::<_, ColdCopied>(&addr, "/internal/v1/migrations/cold", &req, timeout)
                .await
        };
        let mut cancel = cancel;
        let copied = tokio::select! {
            r = copy => r,
            _ = cancel.wait_for(|c| *c) => Err(novacron_state::network::TransportError::Timeout {
                addr: addr.clone(),
                timeout_ms: 0,
            }),
        };
        let undo = |why: ApiError| async move {
            let _ = self
                .cluster()
                .transport
                .call::<_, serde_json::Value>(
                    &addr,
                    &format!("/internal/v1/migrations/{}/abort", vm.id),
                    &serde_json::json!({}),
                    Duration::from_secs(30),
                )
                .await;
            self.end_migration(vm.id).await;
            why
        };
        let copied = match copied {
            Ok(c) => c,
            Err(_) if *cancel.borrow() => {
                return Err(undo(refused("cancelled", "cancelled while copying disks")).await);
            }
            Err(e) => {
                return Err(undo(refused(
                    "target_refused",
                    format!("host {target} could not copy the disks: {e}"),
                ))
                .await);
            }
        };
        let moved = self
            .inner
            .state
            .propose(CommandV1::MoveVm {
                id: vm.id,
                from: me,
                to: target,
                at: now_millis(),
            })
            .await;
        if let Err(e) = moved {
            return Err(undo(e).await);
        }
        if let Err(e) = self.inner.hv.undefine(vm.id).await {
            tracing::warn!(vm = %vm.id, "removing the source's copy after a cold migration: {e}");
        }
        progress.phase = "completed".into();
        progress.disk_remaining_bytes = 0;
        progress.elapsed_ms = started.elapsed().as_millis() as u64;
        progress.transfer_rate_bytes =
            (copied.bytes as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64;
        let _ = self.inner.state.propose(set(&progress, 100)).await;
        Ok(())
    }

    /// Puts this host in maintenance and moves every VM away: running ones live, stopped ones
    /// cold, as many at once as `--max-outgoing-migrations` allows. A leader hands leadership
    /// over first. The host stays in maintenance (also when some VMs could not move: the
    /// operation's error lists them) until `restore`.
    pub async fn evacuate(&self, who: &Principal) -> Result<Operation, ApiError> {
        let me = self.inner.node;
        let svc = self.clone();
        let who = who.clone();
        self.spawn_operation(
            "node.evacuate",
            vec![format!("/api/v1/nodes/{me}")],
            &who.clone(),
            vec![CommandV1::SetNodeMaintenance {
                node: me,
                maintenance: true,
            }],
            move |ctx| async move { svc.run_evacuation(&ctx, &who).await },
        )
        .await
    }

    async fn run_evacuation(&self, ctx: &OpCtx, who: &Principal) -> Result<(), ApiError> {
        let me = self.inner.node;
        if self.inner.state.leader().map(|l| l.0) == Some(me.0) {
            ctx.progress(2, "handing Raft leadership to another host")
                .await;
            match self.transfer_leader(None).await {
                Ok(to) => tracing::info!(to = %to.id, "evacuation: leadership handed over"),
                Err(e) => tracing::warn!("evacuation: keeping leadership: {}", e.message),
            }
        }
        let mut pending: Vec<Vm> = self
            .inner
            .state
            .read_linearizable(|s| s.vms.values().filter(|v| v.node == me).cloned().collect())
            .await?;
        pending.sort_by(|a, b| a.name.cmp(&b.name));
        let total = pending.len();
        let mut running: Vec<(String, Operation)> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut moved = 0usize;
        while !pending.is_empty() || !running.is_empty() {
            // Start what the outgoing limit allows.
            while let Some(vm) = pending.first().cloned() {
                match self
                    .migrate_vm(&vm.id.to_string(), MigrateVmRequest::default(), who)
                    .await
                {
                    Ok(op) => {
                        pending.remove(0);
                        running.push((vm.name.clone(), op));
                    }
                    Err(e) if e.reason.as_deref() == Some("too_many_outgoing") => break,
                    Err(e) => {
                        pending.remove(0);
                        failed.push(format!("{}: {}", vm.name, e.message));
                    }
                }
            }
            // Wait for one to end.
            let mut still = Vec::new();
            for (name, op) in running.drain(..) {
                let now = self
                    .wait_operation(&op.id.to_string(), Duration::from_millis(500))
                    .await?;
                match now.status {
                    s if !s.is_final() => still.push((name, now)),
                    novacron_types::OperationStatus::Success => moved += 1,
                    _ => failed.push(format!(
                        "{name}: {}",
                        now.error.map(|e| e.message).unwrap_or(now.message)
                    )),
                }
            }
            running = still;
            if running.is_empty() && !pending.is_empty() {
                // Other migrations hold this host's outgoing slots: wait for one to end.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let done = moved + failed.len();
            ctx.progress(
                (5 + 90 * done / total.max(1)) as u8,
                format!("{moved} of {total} VMs moved, {} failed", failed.len()),
            )
            .await;
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ApiError::conflict(format!(
                "{moved} of {total} VMs moved; host {me} stays in maintenance; not moved: {}",
                failed.join("; ")
            ))
            .with_reason("evacuation_incomplete"))
        }
    }

    /// Ends maintenance: new VMs may be placed on this host again.
    pub async fn restore(&self, node: NodeId) -> Result<(), ApiError> {
        self.inner
            .state
            .propose(CommandV1::SetNodeMaintenance {
                node,
                maintenance: false,
            })
            .await
    }

    /// Cancels a running operation, if it can be cancelled (volume moves; live migrations, in every phase
    /// before post-copy). Answered by the operation's host.
    pub async fn cancel_operation(&self, id: &str) -> Result<Operation, ApiError> {
        let op = self.get_operation(id).await?;
        if op.status.is_final() {
            return Err(ApiError::conflict(format!(
                "operation {id} already finished ({})",
                op.message
            )));
        }
        // Past the switch-over (or in post-copy) a cancel can no longer take effect: say so.
        if let Some(m) = &op.migration
            && matches!(
                m.phase.as_str(),
                "switching over" | "post-copy" | "finishing"
            )
        {
            return Err(refused(
                "too_late",
                format!(
                    "migration {id} is '{}': past the switch-over it can no longer be cancelled; \
                     migrate the VM back when it is done",
                    m.phase
                ),
            ));
        }
        let sent = self
            .migrations()
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&op.id)
            .map(|tx| tx.send(true).is_ok());
        match sent {
            Some(true) => Ok(op),
            _ => Err(ApiError::conflict(format!(
                "operation {id} ({}) cannot be cancelled",
                op.kind
            ))),
        }
    }
}

fn validate_migrate(req: &MigrateVmRequest) -> Result<(), ApiError> {
    let check = |field: &str, v: Option<u64>, lo: u64, hi: u64| match v {
        Some(x) if x < lo || x > hi => Err(ApiError::invalid(
            field,
            format!("{field} must be between {lo} and {hi} (got {x})"),
        )),
        _ => Ok(()),
    };
    check("max_bandwidth_mib", req.max_bandwidth_mib, 1, 100_000)?;
    check("disk_bandwidth_mib", req.disk_bandwidth_mib, 1, 100_000)?;
    check("downtime_limit_ms", req.downtime_limit_ms, 1, 60_000)?;
    check("timeout_seconds", req.timeout_seconds, 1, 86_400)
}

/// One outgoing migration.
struct Run {
    svc: Service,
    ctx: OpCtx,
    vm: Vm,
    target: NodeId,
    tuning: MigrationTuning,
    timeout: Duration,
    on_timeout: MigrationTimeoutAction,
    cancel: tokio::sync::watch::Receiver<bool>,
    started: Instant,
    progress: MigrationProgress,
    last_report: Option<Instant>,
    /// Post-copy began: from then on nothing is undone.
    postcopy: bool,
    /// The switch-over was let go (`migrate-continue`): a cancel or timeout comes too late.
    switched: bool,
    /// The target was told to run the guest (post-copy does that early).
    started_on_target: bool,
    /// When the guest was seen paused for the switch-over: the real downtime runs from here
    /// until the target runs it (QEMU's own figure ends at completion).
    paused_at: Option<Instant>,
}

/// How a run ended early.
enum Stop {
    /// Ownership did not move and the target's copy never ran (it is started paused): cancel
    /// here, remove the target's copy, and let the guest run here (resumed if the migration had
    /// completed).
    Undo(ApiError),
    /// Ownership moved, but the target could not start the guest: it stays paused there.
    Moved(ApiError),
    /// Whether ownership moved is unknown (no quorum to ask): both copies stay paused.
    Stuck(ApiError),
    /// Post-copy had begun: the guest runs on the target with part of its memory still here.
    /// Neither side may be stopped or resumed; a person decides.
    Postcopy(ApiError),
}

impl Run {
    fn addr(&self) -> Result<String, ApiError> {
        self.svc
            .inner
            .state
            .read(|s| s.nodes.get(&self.target.0).map(|n| n.api_address.clone()))
            .ok_or_else(|| ApiError::not_found("host", self.target))
    }

    async fn report(&mut self, percent: u8, force: bool) {
        let due = self
            .last_report
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        if !(force || due) {
            return;
        }
        self.last_report = Some(Instant::now());
        self.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        let message = describe(&self.progress);
        let cmd = CommandV1::SetMigrationProgress {
            id: self.ctx.id,
            progress: percent,
            message,
            migration: self.progress.clone(),
            at: now_millis(),
        };
        if let Err(e) = self.svc.inner.state.propose(cmd).await {
            tracing::warn!(op = %self.ctx.id, "recording migration progress: {e}");
        }
    }

    fn absorb(&mut self, st: &MigrationStats) {
        let p = &mut self.progress;
        p.ram_total_bytes = st.ram_total_bytes;
        p.ram_remaining_bytes = st.ram_remaining_bytes;
        p.ram_transferred_bytes = st.ram_transferred_bytes;
        // The mirrors end at the switch-over; keep the figures they last had.
        if st.disk_total_bytes > 0 {
            p.disk_total_bytes = st.disk_total_bytes;
            p.disk_remaining_bytes = st.disk_remaining_bytes;
        }
        p.transfer_rate_bytes = (st.mbps * 1_000_000.0 / 8.0) as u64;
        p.dirty_rate_bytes = st.dirty_bytes_rate;
        p.expected_downtime_ms = st.expected_downtime_ms;
        // Never below what we measured ourselves (see `paused_at`).
        p.downtime_ms = match (p.downtime_ms, st.downtime_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let net = p.transfer_rate_bytes.saturating_sub(p.dirty_rate_bytes);
        p.eta_seconds =
            (net > 0).then(|| (p.ram_remaining_bytes + p.disk_remaining_bytes).div_ceil(net));
    }

    fn percent(&self) -> u8 {
        let p = &self.progress;
        let frac = |done: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                done.min(total) as f64 / total as f64
            }
        };
        match p.phase.as_str() {
            "mirroring disks" => {
                (5.0 + 20.0
                    * frac(
                        p.disk_total_bytes - p.disk_remaining_bytes,
                        p.disk_total_bytes,
                    )) as u8
            }
            "copying memory" => {
                (25.0 + 65.0 * frac(p.ram_total_bytes - p.ram_remaining_bytes, p.ram_total_bytes))
                    as u8
            }
            "switching over" | "post-copy" => 92,
            "finishing" => 96,
            _ => 2,
        }
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    fn timed_out(&self) -> bool {
        self.started.elapsed() >= self.timeout
    }

    async fn status(&mut self) -> Result<MigrationStats, Stop> {
        let st = self
            .svc
            .inner
            .hv
            .outgoing_status(self.vm.id)
            .await
            .map_err(|e| Stop::Undo(hv_error(e)))?;
        self.absorb(&st);
        Ok(st)
    }

    async fn run(&mut self) -> Result<(), ApiError> {
        self.report(2, true).await;
        let mut outcome = self.drive().await;
        if self.postcopy
            && let Err(Stop::Undo(e)) = outcome
        {
            outcome = Err(Stop::Postcopy(e));
        }
        let me = self.svc.inner.node;
        let err = match outcome {
            Ok(()) => return Ok(()),
            Err(Stop::Postcopy(mut err)) => {
                err.message.push_str(&format!(
                    "; post-copy had begun, so the guest runs on host {} with part of its memory \
                     still on host {me}: neither was stopped; check both hosts",
                    self.target
                ));
                self.svc.end_migration(self.vm.id).await;
                err
            }
            Err(Stop::Stuck(mut err)) => {
                err.message.push_str(&format!(
                    "; the VM is paused on host {me} and loaded but paused on host {}: nothing \
                     runs it; once the cluster has a quorum, `novacron vm show` says which host \
                     owns it, and that host's copy may be resumed",
                    self.target
                ));
                err
            }
            Err(Stop::Moved(mut err)) => {
                err.message.push_str(&format!(
                    "; the VM now belongs to host {} and is paused there: resume it with \
                     `novacron vm resume {}`",
                    self.target, self.vm.name
                ));
                self.release_source().await;
                err
            }
            Err(Stop::Undo(mut err)) => {
                let hv = &self.svc.inner.hv;
                if let Err(e) = hv.outgoing_cancel(self.vm.id).await {
                    err.message
                        .push_str(&format!("; stopping the migration here failed too: {e}"));
                }
                if let Ok(addr) = self.addr()
                    && let Err(e) = self
                        .svc
                        .cluster()
                        .transport
                        .call::<_, serde_json::Value>(
                            &addr,
                            &format!("/internal/v1/migrations/{}/abort", self.vm.id),
                            &serde_json::json!({}),
                            Duration::from_secs(30),
                        )
                        .await
                {
                    // Its copy never ran (-S); it is removed later (its watchdog or restart).
                    tracing::warn!(vm = %self.vm.id, "removing the target's copy: {e}");
                }
                // A completed migration left the guest paused here; the target's copy never
                // ran, so this one goes on.
                if hv
                    .outgoing_status(self.vm.id)
                    .await
                    .is_ok_and(|st| st.status == "completed")
                    && let Err(e) = hv.resume(self.vm.id).await
                {
                    err.message
                        .push_str(&format!("; resuming the VM here failed: {e}"));
                }
                self.svc.end_migration(self.vm.id).await;
                err
            }
        };
        self.svc.sync_vm_observed(self.vm.id).await;
        self.progress.phase = if err.reason.as_deref() == Some("cancelled") {
            "cancelled".into()
        } else {
            "failed".into()
        };
        let pct = self.percent();
        self.report(pct, true).await;
        Err(err)
    }

    /// After ownership moved: the source's copy goes (mirror targets, the paused QEMU, files).
    async fn release_source(&self) {
        let hv = &self.svc.inner.hv;
        let id = self.vm.id;
        let _ = hv.outgoing_complete(id).await;
        if let Err(e) = hv.force_stop(id).await {
            tracing::warn!(vm = %id, "stopping the source QEMU after migrating: {e}");
        }
        if let Err(e) = hv.undefine(id).await {
            tracing::warn!(vm = %id, "removing the source's copy after migrating: {e}");
        }
    }

    /// Tells the target to run the guest (its copy is complete).
    async fn start_on_target(&mut self, addr: &str) -> Result<(), ApiError> {
        self.started_on_target = true;
        let r = self
            .svc
            .cluster()
            .transport
            .call::<_, serde_json::Value>(
                addr,
                &format!("/internal/v1/migrations/{}/finish", self.vm.id),
                &serde_json::json!({}),
                Duration::from_secs(30),
            )
            .await;
        if let (Ok(_), Some(t)) = (&r, self.paused_at) {
            // The guest's real pause: QEMU's figure, or ours if longer (ours includes recording
            // the new owner and starting the guest there).
            let ours = t.elapsed().as_millis() as u64;
            self.progress.downtime_ms = Some(self.progress.downtime_ms.unwrap_or(0).max(ours));
        }
        r.map(drop).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "host {} could not confirm it started the guest: {e}",
                    self.target
                ),
            )
        })
    }

    /// Records the switch of ownership. Ok(true): moved; Ok(false): refused (not moved).
    async fn move_ownership(&self) -> Result<bool, ApiError> {
        let id = self.vm.id;
        let me = self.svc.inner.node;
        let cmd = CommandV1::MoveVm {
            id,
            from: me,
            to: self.target,
            at: now_millis(),
        };
        for attempt in 0..20 {
            match self.svc.inner.state.propose(cmd.clone()).await {
                Ok(()) => return Ok(true),
                // Refused, or an earlier attempt whose answer was lost already moved it: ask.
                Err(e) if e.code == ErrorCode::Conflict || e.code == ErrorCode::Timeout => {
                    tracing::warn!(vm = %id, attempt, "recording the switch of ownership: {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!(vm = %id, attempt, "recording the switch of ownership: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        let owner = self
            .svc
            .inner
            .state
            .read_linearizable(|s| s.vms.get(&id).map(|v| v.node))
            .await?;
        Ok(owner == Some(self.target))
    }

    async fn drive(&mut self) -> Result<(), Stop> {
        let hv = self.svc.inner.hv.clone();
        let id = self.vm.id;
        let spec = self.svc.runtime_spec(&self.vm).map_err(Stop::Undo)?;
        let addr = self.addr().map_err(Stop::Undo)?;
        let transport = self.svc.cluster().transport.clone();
        let plan: IncomingPlan = transport
            .call(
                &addr,
                "/internal/v1/migrations/incoming",
                &IncomingRequest {
                    vm: id,
                    source: self.svc.inner.node,
                    postcopy: self.tuning.postcopy,
                },
                Duration::from_secs(60),
            )
            .await
            .map_err(|e| {
                Stop::Undo(refused(
                    "target_refused",
                    format!("host {} cannot receive the VM: {e}", self.target),
                ))
            })?;

        self.progress.phase = "mirroring disks".into();
        // Polls are cut short by QEMU's events (a mirror ready, a migration state change).
        let mut seen = 0;
        hv.outgoing_mirror(&spec, &plan, &self.tuning)
            .await
            .map_err(|e| Stop::Undo(hv_error(e)))?;
        let disks = spec.extra_disks_mib.len() + 1;
        loop {
            // Disks on a shared pool are not mirrored: the target opens the same files.
            if spec.shared_disks {
                break;
            }
            let st = self.status().await?;
            if st.disks_ready && st.disk_jobs == disks {
                break;
            }
            if st.disk_jobs < disks {
                return Err(Stop::Undo(refused(
                    "disk_mirror_failed",
                    format!(
                        "{} of {disks} disk mirrors ended early (an I/O error on host {} or a \
                         broken connection); nothing moved",
                        disks - st.disk_jobs,
                        self.target
                    ),
                )));
            }
            self.checkpoint(false).await?;
            let pct = self.percent();
            self.report(pct, false).await;
            seen = hv.outgoing_wait(id, seen, Duration::from_millis(100)).await;
        }

        self.progress.phase = "copying memory".into();
        hv.outgoing_migrate(id, &plan, &self.tuning)
            .await
            .map_err(|e| Stop::Undo(hv_error(e)))?;
        let ram_started = Instant::now();
        let st = loop {
            let st = self.status().await?;
            self.progress.ram_copy_ms = ram_started.elapsed().as_millis() as u64;
            match st.status.as_str() {
                "completed" => break st,
                "pre-switchover" if !self.switched => {
                    self.paused_at.get_or_insert_with(Instant::now);
                    if self.progress.precopy_ms == 0 {
                        self.progress.precopy_bytes = st.ram_transferred_bytes;
                        self.progress.precopy_ms = self.progress.ram_copy_ms.max(1);
                    }
                    self.progress.phase = "switching over".into();
                    hv.outgoing_switchover(&spec)
                        .await
                        .map_err(|e| Stop::Undo(hv_error(e)))?;
                    self.switched = true;
                }
                "postcopy-active" if !self.postcopy => {
                    self.postcopy = true;
                    self.progress.phase = "post-copy".into();
                    // Post-copy needs the guest running on the target, pulling its memory.
                    self.start_on_target(&addr).await.map_err(Stop::Undo)?;
                }
                "failed" | "cancelled" => {
                    return Err(Stop::Undo(refused(
                        "qemu_failed",
                        format!(
                            "QEMU's migration {}: {}",
                            st.status,
                            st.error.as_deref().unwrap_or("no reason given")
                        ),
                    )));
                }
                _ => {}
            }
            // After the switch-over is let go, a cancel or timeout comes too late.
            if !self.postcopy && !self.switched {
                self.checkpoint(true).await?;
            }
            let pct = self.percent();
            self.report(pct, false).await;
            seen = hv.outgoing_wait(id, seen, Duration::from_millis(100)).await;
        };

        // Completed: the guest is paused here with everything sent, and loaded but paused on
        // the target (-S). Ownership moves first; only then does the target run it.
        self.progress.phase = "finishing".into();
        self.absorb(&st);
        match self.move_ownership().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Stop::Undo(refused(
                    "move_refused",
                    format!(
                        "the switch of ownership to host {} was refused (it may have gone into \
                         maintenance meanwhile)",
                        self.target
                    ),
                )));
            }
            Err(e) => {
                return Err(Stop::Stuck(ApiError::new(
                    e.code,
                    format!(
                        "the switch of ownership could not be confirmed: {}",
                        e.message
                    ),
                )));
            }
        }
        if !self.started_on_target {
            self.start_on_target(&addr).await.map_err(Stop::Moved)?;
        }
        let record = CommandV1::RecordVmObservedOn {
            node: self.target,
            id,
            state: VmState::Running,
            reason: None,
            at: now_millis(),
        };
        if let Err(e) = self.svc.inner.state.propose(record).await {
            tracing::warn!(vm = %id, "recording the moved VM as running: {e}");
        }
        self.release_source().await;
        self.progress.phase = "completed".into();
        self.progress.ram_remaining_bytes = 0;
        self.progress.disk_remaining_bytes = 0;
        self.progress.eta_seconds = Some(0);
        tracing::info!(
            vm = %id, target = %self.target,
            total_ms = ?st.total_time_ms, downtime_ms = ?st.downtime_ms,
            "live migration completed"
        );
        self.report(100, true).await;
        Ok(())
    }

    /// Between polls: a cancel, or the completion timeout and its action.
    async fn checkpoint(&mut self, ram_phase: bool) -> Result<(), Stop> {
        if self.cancelled() {
            return Err(Stop::Undo(refused(
                "cancelled",
                format!("cancelled during '{}'", self.progress.phase),
            )));
        }
        if self.timed_out() {
            if ram_phase && self.on_timeout == MigrationTimeoutAction::Postcopy {
                self.svc
                    .inner
                    .hv
                    .outgoing_postcopy(self.vm.id)
                    .await
                    .map_err(|e| Stop::Undo(hv_error(e)))?;
                // No further timeouts: post-copy always finishes (`postcopy` is set when QEMU
                // reports it active).
                self.timeout = Duration::MAX;
                return Ok(());
            }
            let p = &self.progress;
            return Err(Stop::Undo(refused(
                "timeout",
                format!(
                    "not done after {}s in '{}' ({} MiB of memory and {} MiB of disk left; sending \
                     {} MiB/s while the guest dirties {} MiB/s): raise max_bandwidth_mib or \
                     timeout_seconds, enable auto_converge, or use on_timeout=postcopy",
                    self.timeout.as_secs(),
                    p.phase,
                    p.ram_remaining_bytes >> 20,
                    p.disk_remaining_bytes >> 20,
                    p.transfer_rate_bytes >> 20,
                    p.dirty_rate_bytes >> 20
                ),
            )));
        }
        Ok(())
    }
}

/// A one-line summary for the operation's message and the CLI's progress bar.
pub fn describe(p: &MigrationProgress) -> String {
    let mut s = format!("{} → host {}: {}", p.source, p.target, p.phase);
    if p.disk_total_bytes > 0 && p.phase == "mirroring disks" {
        s.push_str(&format!(
            ", disks {} of {} MiB left",
            p.disk_remaining_bytes >> 20,
            p.disk_total_bytes >> 20
        ));
    }
    if p.ram_total_bytes > 0 && p.phase != "mirroring disks" {
        s.push_str(&format!(
            ", memory {} of {} MiB left",
            p.ram_remaining_bytes >> 20,
            p.ram_total_bytes >> 20
        ));
    }
    if p.transfer_rate_bytes > 0 {
        s.push_str(&format!(", {} MiB/s", p.transfer_rate_bytes >> 20));
    }
    if p.dirty_rate_bytes > 0 {
        s.push_str(&format!(", dirtying {} MiB/s", p.dirty_rate_bytes >> 20));
    }
    if let Some(d) = p.downtime_ms {
        s.push_str(&format!(", downtime {d} ms"));
    } else if let Some(d) = p.expected_downtime_ms {
        s.push_str(&format!(", expected downtime {d} ms"));
    }
    if let Some(eta) = p.eta_seconds.filter(|e| *e > 0) {
        s.push_str(&format!(", ETA {eta}s"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse() {
        assert_eq!(host_of("http://127.0.0.12:8080"), "127.0.0.12");
        assert_eq!(host_of("http://[::1]:8080/"), "::1");
    }

    #[test]
    fn bad_settings_name_their_field() {
        let e = validate_migrate(&MigrateVmRequest {
            max_bandwidth_mib: Some(0),
            ..Default::default()
        })
        .expect_err("zero bandwidth");
        assert_eq!(e.field.as_deref(), Some("max_bandwidth_mib"));
        assert!(validate_migrate(&MigrateVmRequest::default()).is_ok());
    }
}
