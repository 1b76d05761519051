//! Volumes: files in pools that VMs use as disks. A VM's own disks (`root`, `disk1`, ...) are
//! volumes recorded with the VM; other volumes are created, attached (hot-plugged into a
//! running VM), detached, grown, snapshotted, moved between pools and deleted here.
//!
//! Where a volume's file is (see `volume_file`):
//! - a VM's own disk: in the VM's directory (pool `data`), or in `<pool dir of the VM>/<disk>.qcow2`
//!   (see `pools.rs`) with a link from the VM's directory, where QEMU opens it;
//! - pool `data`: `DATA/volumes/<id>.<format>` on the host holding it;
//! - a local pool: `<pool>/host-<node>/volumes/<id>.<format>`;
//! - a shared pool: `<pool>/volumes/<id>.<format>`.
//!
//! A move (`volume.move` operation) copies the file to the target pool and switches to it:
//! a volume of a running VM with QEMU's `blockdev-mirror` at the rate the move scheduler gives
//! it (changed on the fly with `block-job-set-speed`), then a pivot the guest does not notice;
//! a volume no QEMU has open with a block job in a `qemu-storage-daemon` (`FileCopy`, paced
//! the same way), compressed into a cold pool. The old file goes only after the replicated
//! state records the new place.
//!
//! A VM's own disk moves the same way; its copy is written as `<disk>.part` and put in place
//! (renamed, linked from the VM's directory) once the move is recorded (`settle_vm_disk`); a
//! boot disk's copy overlays the VM's image and takes only the disk's own layer.
//!
//! Invariants: file work happens on the host that must do it (the attached VM's host, or the
//! host holding a local volume; the API forwards there); at most [`MAX_MOVES`] moves run on a
//! host at once, sharing the policy's limits evenly (`limiter::shares`); nothing a VM opens is
//! removed before the replicated state says it is no longer the VM's disk (a VM whose disk is
//! recorded as moving does not start; a live move whose outcome QEMU cannot tell stays
//! recorded as running, for a restart to settle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_hypervisor::qemu::copy::FileCopy;
use novacron_hypervisor::qemu::relink;
use novacron_hypervisor::{AttachedVolume, Backing, disks};
use novacron_state::{CommandV1, MovedVolume};
use novacron_types::{
    ApiError, AttachVolumeRequest, CreateVolumeRequest, MoveVolumeRequest, NodeId, Operation,
    PoolTier, ResizeVolumeRequest, TieringPolicy, Vm, VmId, VmState, Volume, VolumeFormat,
    VolumeId, VolumePage, VolumeQuery, VolumeSnapshot, VolumeSnapshotRequest, now_millis, validate,
};

use super::{Service, hv_error};
use crate::auth::Principal;
use crate::limiter::{self, Limits, MoveDemand, Pressure, Throttle};

/// Moves a host runs at once; more wait their turn.
pub const MAX_MOVES: usize = 100;

const MB: u64 = 1_000_000;

/// The moves of this host: a turn for each (at most [`MAX_MOVES`]), what each competes for,
/// and the adaptive throttle.
pub(crate) struct Moves {
    turns: Arc<tokio::sync::Semaphore>,
    active: Mutex<BTreeMap<VolumeId, MoveDemand>>,
    throttle: Mutex<Throttle>,
    /// The last I/O time and operation totals of the guests, for the latency between samples.
    last_io: Mutex<Option<(u64, u64)>>,
}

impl Default for Moves {
    fn default() -> Self {
        Self {
            turns: Arc::new(tokio::sync::Semaphore::new(MAX_MOVES)),
            active: Mutex::default(),
            throttle: Mutex::default(),
            last_io: Mutex::default(),
        }
    }
}

/// Removes a move from the active set however its work ends.
struct Active<'a> {
    moves: &'a Moves,
    id: VolumeId,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.moves
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn limits_of(p: &TieringPolicy) -> Limits {
    Limits {
        global: p.global_mb * MB,
        per_pool: p.pool_mb * MB,
        per_volume: p.volume_mb * MB,
    }
}

/// The guest device name of a volume (`query-blockstats`, hypervisor calls).
pub(crate) fn device_of(v: &Volume) -> String {
    match &v.vm_disk {
        Some(d) => d.clone(),
        None => format!("vol-{}", v.id),
    }
}

impl Service {
    pub(crate) fn tiering_policy(&self) -> TieringPolicy {
        self.inner
            .state
            .read(|s| s.meta.tiering.clone())
            .unwrap_or_default()
    }

    pub async fn get_tiering_policy(&self) -> Result<TieringPolicy, ApiError> {
        Ok(self
            .inner
            .state
            .read_linearizable(|s| s.meta.tiering.clone())
            .await?
            .unwrap_or_default())
    }

    pub async fn set_tiering_policy(&self, p: TieringPolicy) -> Result<TieringPolicy, ApiError> {
        validate::tiering_policy(&p)?;
        self.inner
            .state
            .propose(CommandV1::SetTieringPolicy { policy: p.clone() })
            .await?;
        Ok(p)
    }

    /// Finds a volume by ID or name in this host's copy of the state.
    pub fn find_volume(&self, key: &str) -> Result<Volume, ApiError> {
        self.inner
            .state
            .read(|s| match key.parse::<VolumeId>() {
                Ok(id) => s.volumes.get(&id).cloned(),
                Err(_) => s.volume_by_name(key).cloned(),
            })
            .ok_or_else(|| ApiError::not_found("volume", key))
    }

    pub async fn get_volume(&self, key: &str) -> Result<Volume, ApiError> {
        self.inner.state.read_linearizable(|_| ()).await?;
        self.find_volume(key)
    }

    /// The host that must do a volume's file work (`None`: any host, a detached volume on a
    /// shared pool).
    pub fn volume_owner(&self, v: &Volume) -> Option<NodeId> {
        self.inner.state.read(|s| s.volume_host(v))
    }

    pub async fn list_volumes(&self, q: VolumeQuery) -> Result<VolumePage, ApiError> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and 500 (got {limit})"),
            ));
        }
        let label = match &q.label {
            Some(l) => Some(l.split_once('=').ok_or_else(|| {
                ApiError::invalid("label", format!("label filter '{l}' must be key=value"))
            })?),
            None => None,
        };
        let after = match &q.after {
            Some(a) => Some(a.parse::<VolumeId>().map_err(|_| {
                ApiError::invalid(
                    "after",
                    format!("'{a}' is not a cursor from a previous page"),
                )
            })?),
            None => None,
        };
        let vm = match &q.vm {
            Some(key) => Some(self.get_vm(key).await?.id),
            None => None,
        };
        self.inner
            .state
            .read_linearizable(|s| {
                let tier_of = |pool: &str| match pool {
                    "data" => None,
                    p => s.pools.get(p).map(|p| p.tier),
                };
                let mut items = Vec::new();
                let mut more = false;
                let start = match after {
                    Some(a) => std::ops::Bound::Excluded(a),
                    None => std::ops::Bound::Unbounded,
                };
                for v in s
                    .volumes
                    .range((start, std::ops::Bound::Unbounded))
                    .map(|(_, v)| v)
                {
                    let keep = q.pool.as_ref().is_none_or(|p| &v.pool == p)
                        && q.tier.is_none_or(|t| tier_of(&v.pool) == Some(t))
                        && vm.is_none_or(|id| v.attached_to == Some(id))
                        && q.attached.is_none_or(|a| v.attached_to.is_some() == a)
                        && q.node.is_none_or(|n| s.volume_host(v) == Some(n))
                        && label.is_none_or(|(k, val)| v.labels.get(k).is_some_and(|x| x == val));
                    if !keep {
                        continue;
                    }
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(v.clone());
                }
                let next = more
                    .then(|| items.last().map(|v: &Volume| v.id.to_string()))
                    .flatten();
                VolumePage { items, next }
            })
            .await
    }

    /// Where a volume's file is (or goes) on this host, for pool `pool` as held by `node`.
    pub(crate) fn volume_file(
        &self,
        v: &Volume,
        pool: &str,
        node: Option<NodeId>,
        format: VolumeFormat,
    ) -> Result<PathBuf, ApiError> {
        if let (Some(disk), Some(vm)) = (&v.vm_disk, v.attached_to) {
            return Ok(match pool {
                "data" => self.vm_disk_link(vm, disk),
                _ => self.vm_disk_dir(vm, pool)?.0.join(format!("{disk}.qcow2")),
            });
        }
        let name = format!("{}.{}", v.id, format.as_str());
        if pool == "data" {
            return Ok(self.data_dir().join("volumes").join(name));
        }
        let p = self
            .inner
            .state
            .read(|s| s.pools.get(pool).cloned())
            .ok_or_else(|| ApiError::not_found("pool", pool))?;
        let root = PathBuf::from(&p.path);
        Ok(match node {
            Some(n) if !p.shared => root.join(format!("host-{n}")).join("volumes").join(name),
            _ => root.join("volumes").join(name),
        })
    }

    /// Disk `disk` of `vm` in the VM's directory: the file itself (pool `data`), or a link
    /// to it in its pool; QEMU opens it there.
    fn vm_disk_link(&self, vm: VmId, disk: &str) -> PathBuf {
        self.data_dir()
            .join("vms")
            .join(vm.to_string())
            .join(format!("{disk}.qcow2"))
    }

    fn current_file(&self, v: &Volume) -> Result<PathBuf, ApiError> {
        self.volume_file(v, &v.pool, v.node, v.format)
    }

    /// A pool's directory must be usable here before files are made there (a shared pool
    /// mounted, with its mark).
    fn require_pool_visible(&self, pool: &str) -> Result<(), ApiError> {
        if pool != "data" && !self.pool_usable_here(pool) {
            return Err(ApiError::conflict(format!(
                "pool '{pool}' is not usable on host {} (not mounted, or its directory cannot \
                 be made)",
                self.inner.node
            ))
            .with_reason("pool_unavailable"));
        }
        Ok(())
    }

    /// Volumes to give QEMU when it starts `vm` (its own disks are on its command line anyway).
    pub(crate) fn attached_volumes(&self, vm: VmId) -> Result<Vec<AttachedVolume>, ApiError> {
        let vols: Vec<Volume> = self.inner.state.read(|s| {
            s.volumes_of(vm)
                .into_iter()
                .filter(|v| !v.is_vm_disk())
                .cloned()
                .collect()
        });
        vols.iter()
            .map(|v| {
                Ok(AttachedVolume {
                    id: v.id,
                    path: self.current_file(v)?,
                    format: v.format,
                })
            })
            .collect()
    }

    /// The VM a volume is attached to and whether its QEMU runs now.
    fn live_vm(&self, v: &Volume) -> Option<Vm> {
        let vm = v
            .attached_to
            .and_then(|id| self.find_vm(&id.to_string()).ok())?;
        matches!(vm.state, VmState::Running | VmState::Paused).then_some(vm)
    }

    fn not_here(&self, what: &str, host: NodeId) -> ApiError {
        ApiError::unavailable(format!(
            "{what} must be done on host {host}, not host {}; send the request there",
            self.inner.node
        ))
    }

    /// The host a create must run on: the VM's host when attaching, the asked host, or here.
    pub async fn volume_create_host(&self, req: &CreateVolumeRequest) -> Result<NodeId, ApiError> {
        if let Some(vm) = &req.attach_to {
            let vm = self.get_vm(vm).await?;
            if let Some(n) = req.node
                && n != vm.node
            {
                return Err(ApiError::invalid(
                    "node",
                    format!("VM '{}' is on host {}, not host {n}", vm.name, vm.node),
                ));
            }
            return Ok(vm.node);
        }
        Ok(req.node.unwrap_or(self.inner.node))
    }

    pub async fn create_volume(
        &self,
        req: CreateVolumeRequest,
        who: &Principal,
    ) -> Result<Volume, ApiError> {
        validate::create_volume(&req)?;
        let host = self.volume_create_host(&req).await?;
        if host != self.inner.node {
            return Err(self.not_here("creating this volume", host));
        }
        let pool = req.pool.clone().unwrap_or_else(|| "data".into());
        let shared = if pool == "data" {
            false
        } else {
            self.get_pool(&pool).await?.shared
        };
        self.require_pool_visible(&pool)?;
        if self.find_volume(&req.name).is_ok() {
            return Err(ApiError::conflict(format!(
                "a volume named '{}' already exists",
                req.name
            )));
        }
        let now = now_millis();
        let v = Volume {
            id: VolumeId::new_random(),
            name: req.name.clone(),
            pool: pool.clone(),
            node: (!shared).then_some(self.inner.node),
            size_mib: req.size_mib,
            format: req.format,
            compressed: false,
            attached_to: None,
            vm_disk: None,
            snapshots: Vec::new(),
            labels: req.labels.clone(),
            moving_to: None,
            moved_at: None,
            created_at: now,
            updated_at: now,
        };
        let file = self.current_file(&v)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiError::internal(format!("cannot make {}: {e}", dir.display())))?;
        }
        disks::create_volume(&file, v.format, v.size_mib * 1024 * 1024)
            .await
            .map_err(hv_error)?;
        if let Err(e) = self
            .inner
            .state
            .propose(CommandV1::CreateVolume { volume: v.clone() })
            .await
        {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        if let Some(vm) = &req.attach_to {
            self.attach_volume(
                &v.id.to_string(),
                AttachVolumeRequest { vm: vm.clone() },
                who,
            )
            .await
            .map_err(|e| ApiError {
                message: format!(
                    "volume '{}' was created but not attached: {}",
                    v.name, e.message
                ),
                ..e
            })?;
        }
        self.find_volume(&v.id.to_string())
    }

    pub async fn delete_volume(&self, key: &str) -> Result<(), ApiError> {
        let v = self.get_volume(key).await?;
        if let Some(host) = self.volume_owner(&v)
            && host != self.inner.node
        {
            return Err(self.not_here("deleting this volume", host));
        }
        let file = self.current_file(&v)?;
        if v.attached_to.is_none() {
            self.require_pool_visible(&v.pool)?;
        }
        self.inner
            .state
            .propose(CommandV1::DeleteVolume { id: v.id })
            .await?;
        if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(volume = %v.id, "removing {}: {e}", file.display());
        }
        Ok(())
    }

    pub async fn attach_volume(
        &self,
        key: &str,
        req: AttachVolumeRequest,
        _who: &Principal,
    ) -> Result<Volume, ApiError> {
        let v = self.get_volume(key).await?;
        let (vm, _guard) = self.lock_own_vm(&req.vm).await?;
        if v.attached_to.is_some() || v.moving_to.is_some() {
            // `apply` says why, with the reason code.
            self.inner
                .state
                .propose(CommandV1::AttachVolume {
                    id: v.id,
                    vm: vm.id,
                    at: now_millis(),
                })
                .await?;
        }
        let attached = self.inner.state.read(|s| {
            s.volumes_of(vm.id)
                .iter()
                .filter(|x| !x.is_vm_disk())
                .count()
        });
        if attached >= novacron_hypervisor::VOLUME_SLOTS {
            return Err(ApiError::conflict(format!(
                "VM '{}' has {attached} volumes attached, the most it can take",
                vm.name
            ))
            .with_reason("no_free_slot"));
        }
        if v.node.is_some_and(|n| n != vm.node) {
            return Err(ApiError::conflict(format!(
                "volume '{}' is on host {}'s local pool '{}', but VM '{}' runs on host {}",
                v.name,
                v.node.unwrap_or_default(),
                v.pool,
                vm.name,
                vm.node
            ))
            .with_reason("volume_elsewhere"));
        }
        let file = self.current_file(&v)?;
        if !file.exists() {
            return Err(ApiError::conflict(format!(
                "volume '{}' has no file at {} on host {}",
                v.name,
                file.display(),
                self.inner.node
            ))
            .with_reason("pool_unavailable"));
        }
        let running = matches!(vm.state, VmState::Running | VmState::Paused);
        if running {
            let av = AttachedVolume {
                id: v.id,
                path: file,
                format: v.format,
            };
            self.inner
                .hv
                .attach_volume(vm.id, &av)
                .await
                .map_err(hv_error)?;
        }
        if let Err(e) = self
            .inner
            .state
            .propose(CommandV1::AttachVolume {
                id: v.id,
                vm: vm.id,
                at: now_millis(),
            })
            .await
        {
            if running {
                let _ = self.inner.hv.detach_volume(vm.id, v.id).await;
            }
            return Err(e);
        }
        self.find_volume(&v.id.to_string())
    }

    pub async fn detach_volume(&self, key: &str) -> Result<Volume, ApiError> {
        let v = self.get_volume(key).await?;
        let Some(vm) = v.attached_to else {
            return Err(
                ApiError::conflict(format!("volume '{}' is not attached", v.name))
                    .with_reason("not_attached"),
            );
        };
        if v.is_vm_disk() {
            return Err(ApiError::conflict(format!(
                "volume '{}' is its VM's own disk; it cannot be detached",
                v.name
            ))
            .with_reason("vm_disk"));
        }
        if v.moving_to.is_some() {
            // `apply` refuses with the reason.
            self.inner
                .state
                .propose(CommandV1::DetachVolume {
                    id: v.id,
                    at: now_millis(),
                })
                .await?;
        }
        let (vm, _guard) = self.lock_own_vm(&vm.to_string()).await?;
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            self.inner
                .hv
                .detach_volume(vm.id, v.id)
                .await
                .map_err(hv_error)?;
        }
        self.inner
            .state
            .propose(CommandV1::DetachVolume {
                id: v.id,
                at: now_millis(),
            })
            .await?;
        self.find_volume(&v.id.to_string())
    }

    /// The VM lock when the volume is attached to a VM of this host (file work on an attached
    /// volume must not race the VM's start or stop).
    async fn lock_for(
        &self,
        v: &Volume,
        what: &str,
    ) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>, ApiError> {
        match v.attached_to {
            Some(vm) => Ok(Some(self.lock_own_vm(&vm.to_string()).await?.1)),
            None => {
                if let Some(host) = v.node
                    && host != self.inner.node
                {
                    return Err(self.not_here(what, host));
                }
                self.require_pool_visible(&v.pool)?;
                Ok(None)
            }
        }
    }

    pub async fn resize_volume(
        &self,
        key: &str,
        req: ResizeVolumeRequest,
    ) -> Result<Volume, ApiError> {
        validate::volume_size("size_mib", req.size_mib)?;
        let v = self.get_volume(key).await?;
        if req.size_mib <= v.size_mib {
            return Err(ApiError::invalid(
                "size_mib",
                format!(
                    "volumes only grow: '{}' has {} MiB, asked for {}",
                    v.name, v.size_mib, req.size_mib
                ),
            ));
        }
        if v.moving_to.is_some() {
            return Err(ApiError::conflict(format!(
                "volume '{}' is moving; resize it after the move",
                v.name
            ))
            .with_reason("volume_moving"));
        }
        let _guard = self.lock_for(&v, "resizing this volume").await?;
        let bytes = req.size_mib * 1024 * 1024;
        match self.live_vm(&v) {
            Some(vm) => self
                .inner
                .hv
                .resize_disk(vm.id, &device_of(&v), bytes)
                .await
                .map_err(hv_error)?,
            None => disks::resize(&self.current_file(&v)?, v.format, bytes)
                .await
                .map_err(hv_error)?,
        }
        self.inner
            .state
            .propose(CommandV1::ResizeVolume {
                id: v.id,
                size_mib: req.size_mib,
                at: now_millis(),
            })
            .await?;
        self.find_volume(&v.id.to_string())
    }

    pub async fn snapshot_volume(
        &self,
        key: &str,
        req: VolumeSnapshotRequest,
    ) -> Result<Volume, ApiError> {
        validate::name("name", &req.name)?;
        let v = self.get_volume(key).await?;
        if v.format == VolumeFormat::Raw {
            return Err(ApiError::conflict(format!(
                "volume '{}' is raw; only qcow2 volumes keep snapshots",
                v.name
            ))
            .with_reason("raw_volume"));
        }
        if v.snapshots.iter().any(|s| s.name == req.name) {
            return Err(ApiError::conflict(format!(
                "volume '{}' already has a snapshot named '{}'",
                v.name, req.name
            )));
        }
        let _guard = self.lock_for(&v, "snapshotting this volume").await?;
        match self.live_vm(&v) {
            Some(vm) => self
                .inner
                .hv
                .snapshot_disk(vm.id, &device_of(&v), &req.name)
                .await
                .map_err(hv_error)?,
            None => disks::snapshot_create(&self.current_file(&v)?, &req.name)
                .await
                .map_err(hv_error)?,
        }
        self.inner
            .state
            .propose(CommandV1::AddVolumeSnapshot {
                id: v.id,
                snapshot: VolumeSnapshot {
                    name: req.name,
                    created_at: now_millis(),
                },
            })
            .await?;
        self.find_volume(&v.id.to_string())
    }

    /// Restores (`restore`) or deletes a snapshot of a volume no running VM has open.
    pub async fn volume_snapshot_action(
        &self,
        key: &str,
        name: &str,
        restore: bool,
    ) -> Result<Volume, ApiError> {
        let v = self.get_volume(key).await?;
        if !v.snapshots.iter().any(|s| s.name == name) {
            return Err(ApiError::not_found("snapshot", name));
        }
        let _guard = self
            .lock_for(&v, "changing this volume's snapshots")
            .await?;
        if let Some(vm) = self.live_vm(&v) {
            return Err(ApiError::conflict(format!(
                "volume '{}' is in use by VM '{}', which runs; stop the VM or detach the volume \
                 first",
                v.name, vm.name
            ))
            .with_reason("volume_in_use"));
        }
        let file = self.current_file(&v)?;
        if restore {
            disks::snapshot_apply(&file, name).await.map_err(hv_error)?;
            return self.find_volume(&v.id.to_string());
        }
        disks::snapshot_delete(&file, name)
            .await
            .map_err(hv_error)?;
        self.inner
            .state
            .propose(CommandV1::RemoveVolumeSnapshot {
                id: v.id,
                name: name.to_string(),
                at: now_millis(),
            })
            .await?;
        self.find_volume(&v.id.to_string())
    }

    /// Starts moving a volume to another pool (an operation, `volume.move`).
    pub async fn move_volume(
        &self,
        key: &str,
        req: MoveVolumeRequest,
        why: &str,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        validate::name("pool", &req.pool)?;
        if let Some(r) = req.rate_mb {
            validate::rate_mb("rate_mb", r)?;
        }
        let v = self.get_volume(key).await?;
        if let Some(vm) = v.attached_to.filter(|_| v.is_vm_disk())
            && let Ok(vm) = self.find_vm(&vm.to_string())
            && !vm.snapshots.is_empty()
        {
            return Err(ApiError::conflict(format!(
                "volume '{}' is a disk of VM '{}', which has {} snapshot(s) inside its disks; \
                 a move would lose them; delete them first",
                v.name,
                vm.name,
                vm.snapshots.len()
            ))
            .with_reason("has_snapshots"));
        }
        if !v.snapshots.is_empty() {
            // Snapshots live inside the file; a copy takes only the current data.
            return Err(ApiError::conflict(format!(
                "volume '{}' has {} snapshot(s), which a move would lose; delete them first",
                v.name,
                v.snapshots.len()
            ))
            .with_reason("has_snapshots"));
        }
        if req.pool != "data" {
            // (A linearizable read: a pool just made is there.)
            self.get_pool(&req.pool).await?;
        }
        if let Some(host) = self.volume_owner(&v)
            && host != self.inner.node
        {
            return Err(self.not_here("moving this volume", host));
        }
        self.require_pool_visible(&req.pool)?;
        if v.pool != "data" || v.attached_to.is_none() {
            self.require_pool_visible(&v.pool)?;
        }
        let (_, node, format, cold) = self.move_target(&v, &req.pool)?;
        let guard = match v.attached_to {
            Some(vm) => Some(self.lock_own_vm(&vm.to_string()).await?.1),
            None => None,
        };
        let backing = self.boot_disk_backing(&v, &req.pool).await?;
        let svc = self.clone();
        let to = req.pool.clone();
        let cap = req.rate_mb.map(|r| r * MB);
        let why = why.to_string();
        self.spawn_operation(
            "volume.move",
            vec![format!("/api/v1/volumes/{}", v.id)],
            who,
            vec![CommandV1::BeginVolumeMove {
                id: v.id,
                to: to.clone(),
                at: now_millis(),
            }],
            move |ctx| async move {
                let _guard = guard;
                let (tx, cancel) = tokio::sync::watch::channel(false);
                svc.migrations()
                    .cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ctx.id, tx);
                let id = v.id;
                let target = MoveTarget {
                    pool: to,
                    node,
                    format,
                    compress: cold,
                    backing,
                };
                let result = match svc.move_plan(v, target, cap, cancel) {
                    Ok(plan) => svc.run_move(&ctx, plan, &why).await,
                    Err(e) => {
                        let _ = svc.end_move(id, None).await;
                        Err(e)
                    }
                };
                svc.migrations()
                    .cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&ctx.id);
                result
            },
        )
        .await
    }

    /// The image the copy of a VM's boot disk overlays in pool `to` (a shared pool keeps its
    /// own copy of the image); `None` for any other volume.
    async fn boot_disk_backing(&self, v: &Volume, to: &str) -> Result<Option<Backing>, ApiError> {
        if v.vm_disk.as_deref() != Some("root") {
            return Ok(None);
        }
        let Some(vm) = v.attached_to else {
            return Ok(None);
        };
        let vm = self.find_vm(&vm.to_string())?;
        let image = self
            .inner
            .state
            .read(|s| s.images.get(&vm.spec.image).cloned())
            .ok_or_else(|| ApiError::internal(format!("the image of VM '{}' is gone", vm.name)))?;
        let (_, shared, root) = match to {
            "data" => (PathBuf::new(), false, PathBuf::new()),
            _ => self.vm_disk_dir(vm.id, to)?,
        };
        let path = if shared {
            let path = super::pools::pool_image(&root, &image);
            self.ensure_pool_image(&image, &path).await?;
            path
        } else {
            PathBuf::from(&image.path)
        };
        Ok(Some(Backing {
            path,
            format: image.format,
        }))
    }

    /// Where a move copies from and to, from the volume as it is now that `BeginVolumeMove`
    /// is recorded (an attach or detach that committed just before changes how it copies).
    fn move_plan(
        &self,
        asked: Volume,
        target: MoveTarget,
        cap: Option<u64>,
        cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Result<MovePlan, ApiError> {
        let v = self.find_volume(&asked.id.to_string())?;
        if v.attached_to != asked.attached_to || v.pool != asked.pool || v.node != asked.node {
            return Err(ApiError::conflict(format!(
                "volume '{}' changed while its move was starting (attached, detached or moved); \
                 ask again",
                v.name
            )));
        }
        let to_file = self.volume_file(&v, &target.pool, target.node, target.format)?;
        Ok(MovePlan {
            cancel,
            from_file: self.current_file(&v)?,
            stage: stage_file(&v, &to_file),
            to_file,
            to: target.pool,
            node: target.node,
            format: target.format,
            compress: target.compress,
            backing: target.backing,
            cap,
            v,
        })
    }

    /// A VM's own disk, after its move is recorded: the copy takes the disk's name in its new
    /// pool, the VM's directory links to it (or holds it, in pool `data`), and the old file
    /// goes. Every step can be redone (after a crash, `recover_volume_moves` does).
    fn settle_vm_disk(&self, v: &Volume, stage: &Path, to_file: &Path, from_file: &Path) {
        let (Some(disk), Some(vm)) = (&v.vm_disk, v.attached_to) else {
            return;
        };
        let link = self.vm_disk_link(vm, disk);
        let result = (|| -> Result<(), novacron_hypervisor::HvError> {
            if stage.exists() {
                novacron_hypervisor::durable::rename(stage, to_file)?;
            }
            if to_file != link {
                // Replaces the old link, or the old file itself when it was in pool `data`.
                relink(to_file, &link)?;
            }
            if from_file != link && from_file != to_file {
                let _ = std::fs::remove_file(from_file);
                if let Some(dir) = from_file.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                let _ = std::fs::remove_file(move_marker(to_file));
            }
            Err(e) => tracing::error!(
                volume = v.name,
                "moved, but putting the disk in place failed ({e}); a restart tries again"
            ),
        }
    }

    /// Records the end of a move, retrying through a brief loss of quorum.
    async fn end_move(&self, id: VolumeId, moved: Option<MovedVolume>) -> Result<(), ApiError> {
        let mut recorded = Err(ApiError::internal("not tried"));
        for _ in 0..30 {
            recorded = self
                .inner
                .state
                .propose(CommandV1::EndVolumeMove {
                    id,
                    moved: moved.clone(),
                    at: now_millis(),
                })
                .await;
            if recorded.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        recorded
    }

    async fn run_move(
        &self,
        ctx: &super::OpCtx,
        plan: MovePlan,
        why: &str,
    ) -> Result<(), ApiError> {
        let m = &self.inner.metrics;
        let v = &plan.v;
        ctx.progress(0, format!("waiting for a move slot ({why})"))
            .await;
        let mut cancel = plan.cancel.clone();
        let turn = tokio::select! {
            t = self.inner.moves.turns.clone().acquire_owned() => {
                t.map_err(|_| ApiError::internal("move slots closed"))
            }
            _ = cancel.wait_for(|c| *c) => Err(cancelled()),
        };
        let turn = match turn {
            Ok(t) => t,
            Err(e) => {
                let _ = self.end_move(v.id, None).await;
                return Err(e);
            }
        };
        self.inner
            .moves
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                v.id,
                MoveDemand {
                    pools: [v.pool.clone(), plan.to.clone()],
                    cap: plan.cap,
                },
            );
        let _active = Active {
            moves: &self.inner.moves,
            id: v.id,
        };
        m.volume_moves.get_or_create(&result_label("started")).inc();
        let started = Instant::now();
        let result = self.copy(ctx, &plan).await;
        drop(turn);
        let moved = result.as_ref().ok().map(|(_, compressed)| MovedVolume {
            node: plan.node,
            format: plan.format,
            compressed: *compressed,
        });
        let result = result.map(|(bytes, _)| bytes);
        if let Err(e) = &result
            && e.reason.as_deref() == Some(UNSETTLED)
        {
            // Left running for a restart to settle (see `copy_live`).
            m.volume_moves.get_or_create(&result_label("failed")).inc();
            return Err(e.clone());
        }
        // The new place must be recorded before the old file goes.
        let recorded = self.end_move(v.id, moved).await;
        match (&result, &recorded) {
            (Ok(bytes), Ok(())) => {
                if v.is_vm_disk() {
                    self.settle_vm_disk(v, &plan.stage, &plan.to_file, &plan.from_file);
                } else {
                    let _ = std::fs::remove_file(&plan.from_file);
                    let _ = std::fs::remove_file(move_marker(&plan.to_file));
                }
                m.volume_moves
                    .get_or_create(&result_label("finished"))
                    .inc();
                m.volume_move_bytes.inc_by(*bytes);
                tracing::info!(
                    volume = %v.id, from = v.pool, to = plan.to, bytes, why,
                    secs = started.elapsed().as_secs_f64(), "volume moved"
                );
                Ok(())
            }
            (Ok(_), Err(e)) => {
                m.volume_moves.get_or_create(&result_label("failed")).inc();
                Err(ApiError::internal(format!(
                    "volume '{}' was copied to {} but the new place could not be recorded \
                     ({}); both files are kept",
                    v.name,
                    plan.to_file.display(),
                    e.message
                )))
            }
            (Err(e), _) => {
                m.volume_moves.get_or_create(&result_label("failed")).inc();
                Err(e.clone())
            }
        }
    }

    /// Copies the file (live or not); returns the bytes copied and whether they are stored
    /// compressed.
    async fn copy(&self, ctx: &super::OpCtx, plan: &MovePlan) -> Result<(u64, bool), ApiError> {
        let v = &plan.v;
        if let Some(dir) = plan.to_file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiError::internal(format!("cannot make {}: {e}", dir.display())))?;
        }
        // (A VM's disk moving into pool `data` goes where its link is now.)
        let is_link = std::fs::symlink_metadata(&plan.to_file)
            .is_ok_and(|m| m.file_type().is_symlink())
            && v.is_vm_disk();
        for f in [&plan.stage, &plan.to_file] {
            if f.exists() && !(f == &plan.to_file && is_link) {
                return Err(ApiError::conflict(format!(
                    "{} already exists; a previous move left it (remove it)",
                    f.display()
                )));
            }
        }
        match self.live_vm(v) {
            // A live mirror writes plain clusters; only a copy compresses.
            Some(vm) => self.copy_live(ctx, plan, &vm).await.map(|b| (b, false)),
            None => self
                .copy_detached(ctx, plan)
                .await
                .map(|b| (b, plan.compress)),
        }
    }

    /// A copy of a file no QEMU has open: a block job in a `qemu-storage-daemon` of its own,
    /// paced like a live move (its speed follows this move's share).
    async fn copy_detached(&self, ctx: &super::OpCtx, plan: &MovePlan) -> Result<u64, ApiError> {
        let v = &plan.v;
        let mut pace = Pacer::new(self, v.id);
        let part = plan.to_file.with_extension("part");
        // For a restart (`recover_volume_move`): which host copies, and for a VM's disk
        // (put in place after the move is recorded) when the copy is complete.
        let marker = move_marker(&plan.to_file);
        Marker::write(plan, COPYING, self.inner.node)?;
        let copy = FileCopy::start(
            &plan.from_file,
            v.format,
            &part,
            plan.format,
            plan.backing.as_ref(),
            plan.compress,
            pace.speed,
        )
        .await
        .map_err(hv_error);
        let mut copy = match copy {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                let _ = std::fs::remove_file(&marker);
                return Err(e);
            }
        };
        let result = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if *plan.cancel.borrow() {
                break Err(cancelled());
            }
            let st = match copy.status().await.map_err(hv_error) {
                Ok(st) => st,
                Err(e) => break Err(e),
            };
            match st.done {
                Some(Ok(())) => break Ok(st.len),
                Some(Err(e)) => {
                    break Err(ApiError::internal(format!(
                        "copying volume '{}' to pool '{}': {e}",
                        v.name, plan.to
                    )));
                }
                None => {}
            }
            if let Some(want) = pace.retune(self, v.id)
                && let Err(e) = copy.set_speed(want).await.map_err(hv_error)
            {
                break Err(e);
            }
            pace.report(ctx, plan, plan.compress, st.offset, st.len)
                .await;
        };
        copy.stop().await;
        let result = result.and_then(|bytes| {
            if v.is_vm_disk() {
                self.mark_done(plan, COPIED);
                return Ok(bytes);
            }
            novacron_hypervisor::durable::rename(&part, &plan.to_file)
                .map(|()| bytes)
                .map_err(|e| ApiError::internal(format!("renaming the copy: {e}")))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&marker);
        }
        result
    }

    async fn copy_live(
        &self,
        ctx: &super::OpCtx,
        plan: &MovePlan,
        vm: &Vm,
    ) -> Result<u64, ApiError> {
        let hv = &self.inner.hv;
        let dev = device_of(&plan.v);
        let mut pace = Pacer::new(self, plan.v.id);
        // The two phases of a live move, on disk for a restart to read (`recover_volume_move`):
        // until "switched" the old file is the volume; from then on, the new one.
        let marker = move_marker(&plan.to_file);
        Marker::write(plan, MIRRORING, self.inner.node)?;
        if let Err(e) = hv
            .volume_mirror_start(
                vm.id,
                &dev,
                &plan.stage,
                plan.format,
                plan.backing.as_ref(),
                pace.speed,
            )
            .await
        {
            let _ = std::fs::remove_file(&marker);
            return Err(hv_error(e));
        }
        let result: Result<u64, ApiError> = async {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if *plan.cancel.borrow() {
                    return Err(cancelled());
                }
                let st = hv
                    .volume_mirror_status(vm.id, &dev)
                    .await
                    .map_err(hv_error)?
                    .ok_or_else(|| {
                        ApiError::internal(format!(
                            "the copy of volume '{}' stopped (the VM stopped, or an I/O error)",
                            plan.v.name
                        ))
                    })?;
                if st.ready {
                    hv.volume_mirror_finish(vm.id, &dev)
                        .await
                        .map_err(hv_error)?;
                    return Ok(st.len);
                }
                if let Some(want) = pace.retune(self, plan.v.id) {
                    hv.volume_mirror_speed(vm.id, &dev, want)
                        .await
                        .map_err(hv_error)?;
                }
                pace.report(ctx, plan, false, st.offset, st.len).await;
            }
        }
        .await;
        let result = match result {
            Ok(bytes) => Ok(bytes),
            Err(e) => match self.switched_to(vm, &dev, &plan.stage).await {
                // An error after the switch (closing the old file, a slow end of the job)
                // still leaves the guest on the new file: a finished move, whatever else
                // failed.
                Some(true) => {
                    tracing::warn!(volume = plan.v.name, "moved, but: {}", e.message);
                    Ok(plan.v.size_mib << 20)
                }
                Some(false) => Err(e),
                // QEMU cannot say which file the guest uses: both files and the marker stay,
                // the move stays recorded as running, and a restart decides.
                None => {
                    return Err(ApiError::internal(format!(
                        "moving volume '{}': {}; QEMU does not say which file the disk uses \
                         now, so both are kept and the move is settled when novacron restarts",
                        plan.v.name, e.message
                    ))
                    .with_reason(UNSETTLED));
                }
            },
        };
        match &result {
            // Kept until the new place is recorded (`run_move` removes it).
            Ok(_) => self.mark_done(plan, SWITCHED),
            Err(_) => {
                let _ = hv.volume_mirror_abort(vm.id, &dev).await;
                let _ = std::fs::remove_file(&plan.stage);
                let _ = std::fs::remove_file(&marker);
            }
        }
        result
    }

    /// Whether the running VM's disk `dev` now uses `file` (`Some(false)`: it uses another,
    /// or a copy still runs), asking QEMU a few times; `None` when QEMU does not answer.
    async fn switched_to(&self, vm: &Vm, dev: &str, file: &std::path::Path) -> Option<bool> {
        let hv = &self.inner.hv;
        for _ in 0..5 {
            match (
                hv.volume_mirror_status(vm.id, dev).await,
                hv.disk_file(vm.id, dev).await,
            ) {
                (Ok(Some(_)), _) => return Some(false),
                (Ok(None), Ok(Some(f))) => return Some(f == file),
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        None
    }

    /// After a restart: moves this host was running when it stopped are finished or undone.
    /// A copy that completed (a live disk already switched to its target file, or a detached
    /// copy renamed into place) is recorded as moved; anything else is dropped and the volume
    /// stays where it was. Detached volumes on shared pools are left alone (another host may be
    /// moving them).
    pub(crate) async fn recover_volume_moves(&self) {
        self.backfill_vm_disks().await;
        let me = self.inner.node;
        let (mut vols, unheld): (Vec<Volume>, Vec<Volume>) = self.inner.state.read(|s| {
            s.volumes
                .values()
                .filter(|v| v.moving_to.is_some())
                .filter(|v| s.volume_host(v).is_none_or(|h| h == me))
                .cloned()
                .partition(|v| s.volume_host(v).is_some())
        });
        // A volume no host holds (detached, shared pool): the host its marker names.
        for v in unheld {
            let to = v.moving_to.clone().unwrap_or_default();
            let ours = self
                .move_target(&v, &to)
                .ok()
                .and_then(|(to_file, ..)| Marker::read(&to_file))
                .is_some_and(|m| m.host == Some(me));
            if ours {
                vols.push(v);
            }
        }
        for v in vols {
            // Not while the VM's start, stop or another move runs.
            let _guard = match v.attached_to {
                Some(vm) => Some(self.lock_vm_waiting(vm).await),
                None => None,
            };
            if let Err(e) = self.recover_volume_move(&v).await {
                tracing::warn!(
                    volume = v.name,
                    "recovering an interrupted move: {}",
                    e.message
                );
            }
        }
        // A VM's disk whose move was recorded but not yet put in place.
        let disks: Vec<Volume> = self.inner.state.read(|s| {
            s.volumes
                .values()
                .filter(|v| v.is_vm_disk() && v.moving_to.is_none())
                .filter(|v| s.volume_host(v) == Some(me))
                .cloned()
                .collect()
        });
        for v in disks {
            let Ok(to_file) = self.current_file(&v) else {
                continue;
            };
            if let Some(m) = Marker::read(&to_file)
                && (m.phase == SWITCHED || m.phase == COPIED)
            {
                let _guard = match v.attached_to {
                    Some(vm) => Some(self.lock_vm_waiting(vm).await),
                    None => None,
                };
                let from = m.from.unwrap_or_else(|| to_file.clone());
                self.settle_vm_disk(&v, &stage_file(&v, &to_file), &to_file, &from);
                tracing::info!(volume = v.name, "a moved disk was put in place");
            }
        }
    }

    /// The VMs of this host recorded before their disks were volumes get those volumes.
    async fn backfill_vm_disks(&self) {
        let me = self.inner.node;
        let vms: Vec<(VmId, String)> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|vm| vm.node == me)
                .filter(|vm| {
                    vm.spec.disks.iter().any(|d| {
                        !s.volumes
                            .contains_key(&VolumeId::of_vm_disk(vm.id, &d.name))
                    })
                })
                .map(|vm| (vm.id, vm.name.clone()))
                .collect()
        });
        for (vm, name) in vms {
            match self
                .inner
                .state
                .propose(CommandV1::AddVmDiskVolumes { vm })
                .await
            {
                Ok(_) => tracing::info!(vm = name, "recorded the VM's disks as volumes"),
                Err(e) => tracing::warn!(
                    vm = name,
                    "recording the VM's disks as volumes: {}",
                    e.message
                ),
            }
        }
    }

    /// Where a move of `v` to pool `to` run by this host puts it: the file, the host holding
    /// it (a local pool), its format, and whether the pool is cold (copies compress).
    fn move_target(
        &self,
        v: &Volume,
        to: &str,
    ) -> Result<(PathBuf, Option<NodeId>, VolumeFormat, bool), ApiError> {
        let target = if to == "data" {
            None
        } else {
            self.inner.state.read(|s| s.pools.get(to).cloned())
        };
        let shared = target.as_ref().is_some_and(|p| p.shared);
        let cold = target.as_ref().is_some_and(|p| p.tier == PoolTier::Cold);
        let node = (!shared).then_some(self.inner.node);
        // Cold pools keep compressed qcow2 (a raw volume becomes qcow2 there).
        let format = if cold { VolumeFormat::Qcow2 } else { v.format };
        Ok((self.volume_file(v, to, node, format)?, node, format, cold))
    }

    /// Records in its marker that a move's copy is complete (`phase`: [`SWITCHED`] or
    /// [`COPIED`]).
    fn mark_done(&self, plan: &MovePlan, phase: &str) {
        if let Err(e) = Marker::write(plan, phase, self.inner.node) {
            tracing::error!("{}", e.message);
        }
    }

    async fn recover_volume_move(&self, v: &Volume) -> Result<(), ApiError> {
        let Some(to) = v.moving_to.clone() else {
            return Ok(());
        };
        let (to_file, node, format, cold) = self.move_target(v, &to)?;
        let from_file = self.current_file(v)?;
        let stage = stage_file(v, &to_file);
        let part = to_file.with_extension("part");
        let marker = move_marker(&to_file);
        let done = match Marker::read(&to_file).map(|m| m.phase).as_deref() {
            // A live move that had switched: the new file is the volume.
            Some(SWITCHED) => Some(false),
            // A VM disk's copy that had completed.
            Some(COPIED) => Some(cold),
            // Another volume's copy: complete once renamed into place. A daemon the dead
            // process left copying goes first.
            Some(COPYING) if !v.is_vm_disk() => {
                novacron_hypervisor::qemu::copy::kill_strays(&part);
                to_file.exists().then_some(cold)
            }
            // A live move that had not (or the switch was not written down yet: ask QEMU),
            // or a VM disk's copy that had not completed.
            Some(_) => match self.live_vm(v) {
                Some(vm) => {
                    let dev = device_of(v);
                    // (A VM disk's copy the VM was started after: its daemon goes.)
                    novacron_hypervisor::qemu::copy::kill_strays(&part);
                    match self.switched_to(&vm, &dev, &stage).await {
                        Some(true) => Some(false),
                        Some(false) => {
                            let _ = self.inner.hv.volume_mirror_abort(vm.id, &dev).await;
                            None
                        }
                        None => {
                            return Err(ApiError::unavailable(
                                "QEMU does not say which file the disk uses; left as it is",
                            ));
                        }
                    }
                }
                None => {
                    novacron_hypervisor::qemu::copy::kill_strays(&part);
                    None
                }
            },
            // A VM's disk whose copy had not begun.
            None if v.is_vm_disk() => None,
            // A copy by a version that wrote no marker: the same.
            None => {
                novacron_hypervisor::qemu::copy::kill_strays(&part);
                to_file.exists().then_some(cold)
            }
        };
        let moved = done.map(|compressed| MovedVolume {
            node,
            format,
            compressed,
        });
        self.end_move(v.id, moved.clone()).await?;
        if v.is_vm_disk() {
            match moved {
                Some(_) => self.settle_vm_disk(v, &stage, &to_file, &from_file),
                None => {
                    // (`to_file` may be the VM's link to the disk: it stays.)
                    let _ = std::fs::remove_file(&stage);
                    let _ = std::fs::remove_file(&marker);
                }
            }
        } else {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&marker);
            if moved.is_some() {
                let _ = std::fs::remove_file(&from_file);
            } else {
                let _ = std::fs::remove_file(&to_file);
            }
        }
        tracing::info!(
            volume = v.name,
            to,
            finished = moved.is_some(),
            "an interrupted move was {}",
            if moved.is_some() {
                "recorded"
            } else {
                "undone"
            }
        );
        Ok(())
    }

    /// This move's rate now (bytes/s): its even share of the policy's limits, throttled.
    fn share_of(&self, id: VolumeId) -> u64 {
        let limits = limits_of(&self.tiering_policy());
        let factor = self.throttle_factor();
        let active = self
            .inner
            .moves
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ids: Vec<VolumeId> = active.keys().copied().collect();
        let demands: Vec<MoveDemand> = active.values().cloned().collect();
        drop(active);
        let shares = limiter::shares(&limits, factor, &demands);
        ids.iter()
            .position(|x| *x == id)
            .map(|i| shares[i])
            .unwrap_or(limits.per_volume)
    }

    pub(crate) fn throttle_factor(&self) -> f64 {
        self.inner
            .moves
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .factor
    }

    /// Adaptive throttling, once a second while moves run: the guests' mean I/O latency since
    /// the last look and the host's load per CPU against the policy's targets.
    pub(crate) async fn observe_pressure(&self) {
        let busy = !self
            .inner
            .moves
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        let me = self.inner.node;
        let vms: Vec<VmId> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|v| v.node == me && v.state == VmState::Running)
                .map(|v| v.id)
                .collect()
        });
        let (mut ns, mut ops) = (0u64, 0u64);
        for id in vms {
            if let Ok((n, o)) = self.inner.hv.io_latency(id).await {
                ns += n;
                ops += o;
            }
        }
        let prev = self
            .inner
            .moves
            .last_io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((ns, ops));
        if !busy {
            return;
        }
        let latency_ms = match prev {
            Some((pn, po)) if ops > po && ns >= pn => (ns - pn) as f64 / (ops - po) as f64 / 1e6,
            _ => 0.0,
        };
        let policy = self.tiering_policy();
        let load = crate::cluster::host::load_per_cpu().unwrap_or(0.0);
        let p = Pressure {
            guest_latency_ms: latency_ms,
            latency_target_ms: policy.max_guest_latency_ms as f64,
            load_per_cpu: load,
            load_target: policy.max_load_per_cpu,
        };
        let mut t = self
            .inner
            .moves
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *t = t.next(&p);
        self.inner.metrics.volume_move_throttle.set(t.factor);
    }
}

/// What the two copy loops share: the move's speed, re-set when its share moves by more than
/// 5%, and a progress line once a second.
struct Pacer {
    speed: u64,
    last_report: Instant,
}

impl Pacer {
    fn new(svc: &Service, id: VolumeId) -> Self {
        Self {
            speed: svc.share_of(id),
            last_report: Instant::now(),
        }
    }

    /// The speed to set now, if the share moved.
    fn retune(&mut self, svc: &Service, id: VolumeId) -> Option<u64> {
        svc.inner.metrics.volume_move_rate.set(self.speed as i64);
        let want = svc.share_of(id);
        (want.abs_diff(self.speed) * 20 > self.speed).then(|| {
            self.speed = want;
            want
        })
    }

    async fn report(
        &mut self,
        ctx: &super::OpCtx,
        plan: &MovePlan,
        compressed: bool,
        done: u64,
        len: u64,
    ) {
        if self.last_report.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_report = Instant::now();
        let pct = (done * 90 / len.max(1)).min(90) as u8;
        ctx.progress(
            5 + pct,
            format!(
                "copying to pool '{}': {} of {} MiB at {:.1} MB/s{}",
                plan.to,
                done >> 20,
                len >> 20,
                self.speed as f64 / MB as f64,
                if compressed { ", compressed" } else { "" }
            ),
        )
        .await;
    }
}

/// Where a move goes and how the copy is stored there.
struct MoveTarget {
    pool: String,
    /// The host holding it (a local pool).
    node: Option<NodeId>,
    format: VolumeFormat,
    compress: bool,
    /// A boot disk's copy overlays this image.
    backing: Option<Backing>,
}

struct MovePlan {
    v: Volume,
    /// Set by `DELETE /api/v1/operations/{id}`.
    cancel: tokio::sync::watch::Receiver<bool>,
    from_file: PathBuf,
    to_file: PathBuf,
    /// Where the copy is written: `to_file`, except for a VM's own disk (whose `to_file` in
    /// pool `data` is the VM's link to the disk now), which is renamed in place once recorded.
    stage: PathBuf,
    to: String,
    node: Option<NodeId>,
    format: VolumeFormat,
    compress: bool,
    backing: Option<Backing>,
    cap: Option<u64>,
}

/// Where a move of `v` to `to_file` writes its copy (see [`MovePlan::stage`]).
fn stage_file(v: &Volume, to_file: &Path) -> PathBuf {
    if v.is_vm_disk() {
        to_file.with_extension("part")
    } else {
        to_file.to_path_buf()
    }
}

/// The reason of a move whose outcome QEMU could not tell: it stays recorded as running.
const UNSETTLED: &str = "move_unsettled";

const MIRRORING: &str = "mirroring";
const COPYING: &str = "copying";
/// A live move switched the guest to the new file.
const SWITCHED: &str = "switched";
/// A VM disk's copy (VM stopped) is complete.
const COPIED: &str = "copied";

/// What a move writes beside its target (`<target>.move`) for a restart to read: its phase,
/// the file a VM's disk replaces, and the host running it (for a volume no host holds: a
/// detached one on a shared pool).
struct Marker {
    phase: String,
    from: Option<PathBuf>,
    host: Option<NodeId>,
}

impl Marker {
    fn read(to_file: &Path) -> Option<Marker> {
        let text = std::fs::read_to_string(move_marker(to_file)).ok()?;
        let mut lines = text.lines();
        let phase = lines.next().unwrap_or_default().to_string();
        let from = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
        let host = lines
            .next()
            .and_then(|l| l.strip_prefix("host "))
            .and_then(|n| n.trim().parse().ok())
            .map(NodeId);
        Some(Marker { phase, from, host })
    }

    fn write(plan: &MovePlan, phase: &str, host: NodeId) -> Result<(), ApiError> {
        let marker = move_marker(&plan.to_file);
        let from = if plan.v.is_vm_disk() {
            plan.from_file.display().to_string()
        } else {
            String::new()
        };
        // Durably: a restart decides from the marker whether a copy is complete.
        let text = format!("{phase}\n{from}\nhost {}\n", host.0);
        novacron_hypervisor::durable::write(&marker, text.as_bytes(), 0o644)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", marker.display())))
    }
}

/// The file recording a live move's phase, beside its target.
fn move_marker(to_file: &std::path::Path) -> PathBuf {
    PathBuf::from(format!("{}.move", to_file.display()))
}

fn cancelled() -> ApiError {
    ApiError::conflict("the move was cancelled; the volume stays where it was")
        .with_reason("cancelled")
}

fn result_label(r: &str) -> crate::metrics::ResultLabels {
    crate::metrics::ResultLabels {
        result: r.to_string(),
    }
}

/// Runs for the life of the host: the throttle's eyes.
pub async fn watch_pressure(svc: Service) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        svc.observe_pressure().await;
    }
}
