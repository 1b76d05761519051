//! Volumes in the replicated state: the rules `apply` enforces for them (pure, like the rest of
//! `apply`).
//!
//! Invariants:
//! - volume names are unique;
//! - a VM's own disks (`vm_disk`) exist exactly as long as their VM, always attached to it;
//! - a volume is attached to at most one VM, and a volume on a local pool only to a VM on the
//!   host holding its file;
//! - a volume being moved (`moving_to`) is not deleted, detached, attached or moved again;
//! - a pool holding any volume cannot be deleted;
//! - a VM's own disks are all on shared pools or all on local ones (a migration copies every
//!   disk or none), and its `spec.pool` is where its boot disk is.

use novacron_types::{
    ApiError, NodeId, UnixMillis, Vm, VmId, Volume, VolumeFormat, VolumeId, VolumeSnapshot,
};

use crate::command::Touched;
use crate::machine::ClusterState;

impl ClusterState {
    pub fn volume(&self, id: &VolumeId) -> Result<&Volume, ApiError> {
        self.volumes
            .get(id)
            .ok_or_else(|| ApiError::not_found("volume", id))
    }

    fn volume_mut(&mut self, id: &VolumeId) -> Result<&mut Volume, ApiError> {
        self.volumes
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("volume", id))
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// Volumes attached to `vm`, its own disks first (`root`, `disk1`, ...), then the others
    /// by name.
    pub fn volumes_of(&self, vm: VmId) -> Vec<&Volume> {
        let mut v: Vec<&Volume> = self
            .volumes
            .values()
            .filter(|v| v.attached_to == Some(vm))
            .collect();
        v.sort_by(|a, b| {
            (a.vm_disk.is_none(), &a.vm_disk, &a.name).cmp(&(
                b.vm_disk.is_none(),
                &b.vm_disk,
                &b.name,
            ))
        });
        v
    }

    /// The host that must do a volume's file work: its VM's host when attached, else the
    /// host holding the file (`None`: any host, on a shared pool).
    pub fn volume_host(&self, v: &Volume) -> Option<NodeId> {
        match v.attached_to.and_then(|vm| self.vms.get(&vm)) {
            Some(vm) => Some(vm.node),
            None => v.node,
        }
    }

    fn pool_is_shared(&self, pool: &str) -> Result<bool, ApiError> {
        if pool == "data" {
            return Ok(false);
        }
        self.pools
            .get(pool)
            .map(|p| p.shared)
            .ok_or_else(|| ApiError::not_found("pool", pool))
    }

    fn not_moving(v: &Volume, what: &str) -> Result<(), ApiError> {
        match &v.moving_to {
            Some(to) => Err(ApiError::conflict(format!(
                "volume '{}' is moving to pool '{to}'; {what} after the move",
                v.name
            ))
            .with_reason("volume_moving")),
            None => Ok(()),
        }
    }

    /// The volumes of a new VM's own disks (the boot disk is `root`, sized like its image).
    pub(crate) fn vm_disk_volumes(&self, vm: &Vm) -> Result<Vec<Volume>, ApiError> {
        let shared = match &vm.spec.pool {
            Some(p) => self.pool_is_shared(p)?,
            None => false,
        };
        let disks = vm.spec.disks.iter().map(|d| (d.name.clone(), d.size_mib));
        let mut out = Vec::new();
        for (disk, size_mib) in disks {
            let name = format!("{}-{disk}", vm.name);
            if self.volume_by_name(&name).is_some() {
                return Err(ApiError::conflict(format!(
                    "a volume named '{name}' already exists (VM '{}' would name its {disk} disk \
                     so)",
                    vm.name
                )));
            }
            out.push(Volume {
                id: VolumeId::of_vm_disk(vm.id, &disk),
                name,
                pool: vm.spec.pool.clone().unwrap_or_else(|| "data".into()),
                node: (!shared).then_some(vm.node),
                size_mib,
                format: VolumeFormat::Qcow2,
                compressed: false,
                attached_to: Some(vm.id),
                vm_disk: Some(disk),
                snapshots: Vec::new(),
                labels: Default::default(),
                moving_to: None,
                moved_at: None,
                created_at: vm.created_at,
                updated_at: vm.created_at,
            });
        }
        Ok(out)
    }

    /// Records the volumes of `vm`'s own disks that are missing (a VM recorded before its
    /// disks were volumes). They are where the VM's pool is.
    pub(crate) fn add_vm_disk_volumes(&mut self, vm: &VmId) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm(vm)?.clone();
        let mut missing = vm.clone();
        missing.spec.disks.retain(|d| {
            !self
                .volumes
                .contains_key(&VolumeId::of_vm_disk(vm.id, &d.name))
        });
        let mut touched = Vec::new();
        for mut v in self.vm_disk_volumes(&missing)? {
            v.updated_at = vm.updated_at;
            touched.push(Touched::Volume(v.id));
            self.volumes.insert(v.id, v);
        }
        Ok(touched)
    }

    /// A VM was recorded on another host (live migration, HA): its local disks went with it,
    /// and a move of one of its volumes, which its old host ran, is over (after a migration
    /// there is none: a VM with a volume moving does not migrate).
    pub(crate) fn follow_vm(&mut self, vm: VmId, to: NodeId) -> Vec<Touched> {
        let mut touched = Vec::new();
        for v in self.volumes.values_mut() {
            if v.attached_to != Some(vm) || (v.node.is_none() && v.moving_to.is_none()) {
                continue;
            }
            if v.node.is_some() {
                v.node = Some(to);
            }
            v.moving_to = None;
            touched.push(Touched::Volume(v.id));
        }
        touched
    }

    /// A VM was deleted: its own disks go, other volumes stay, detached.
    pub(crate) fn drop_vm_volumes(&mut self, vm: VmId, at: UnixMillis) -> Vec<Touched> {
        let mut touched = Vec::new();
        self.volumes.retain(|id, v| {
            if v.attached_to != Some(vm) {
                return true;
            }
            touched.push(Touched::Volume(*id));
            if v.vm_disk.is_some() {
                return false;
            }
            v.attached_to = None;
            v.updated_at = at;
            true
        });
        touched
    }

    pub(crate) fn create_volume(&mut self, v: &Volume) -> Result<Vec<Touched>, ApiError> {
        if self.volumes.contains_key(&v.id) {
            return Err(ApiError::conflict(format!(
                "volume ID {} already exists",
                v.id
            )));
        }
        if self.volume_by_name(&v.name).is_some() {
            return Err(ApiError::conflict(format!(
                "a volume named '{}' already exists",
                v.name
            )));
        }
        if v.vm_disk.is_some() {
            return Err(ApiError::invalid(
                "vm_disk",
                "a VM's own disks are made with the VM",
            ));
        }
        let shared = self.pool_is_shared(&v.pool)?;
        if shared != v.node.is_none() {
            return Err(ApiError::invalid(
                "node",
                "a volume names its host exactly when its pool is local",
            ));
        }
        if let Some(n) = v.node
            && !self.nodes.contains_key(&n.0)
        {
            return Err(ApiError::not_found("host", n));
        }
        if let Some(vm) = v.attached_to {
            self.check_attach(v, vm)?;
        }
        self.volumes.insert(v.id, v.clone());
        Ok(vec![Touched::Volume(v.id)])
    }

    fn check_attach(&self, v: &Volume, vm: VmId) -> Result<(), ApiError> {
        let vm = self.vm(&vm)?;
        if let Some(n) = v.node
            && n != vm.node
        {
            return Err(ApiError::conflict(format!(
                "volume '{}' is on host {n}'s local pool '{}', but VM '{}' runs on host {}",
                v.name, v.pool, vm.name, vm.node
            ))
            .with_reason("volume_elsewhere"));
        }
        if let Some(t) = vm.migrating_to {
            return Err(
                ApiError::conflict(format!("VM '{}' is migrating to host {t}", vm.name))
                    .with_reason("already_migrating"),
            );
        }
        if vm.spec.ha && v.node.is_some() {
            return Err(ApiError::conflict(format!(
                "VM '{}' has HA, which restarts it on another host; volume '{}' is on a local \
                 pool that host could not open",
                vm.name, v.name
            ))
            .with_reason("ha_needs_shared_pool"));
        }
        Ok(())
    }

    /// Volumes on local pools attached to `vm` besides its own disks (they keep it on its
    /// host: no HA, no migration).
    pub fn local_volumes_of(&self, vm: VmId) -> Vec<&Volume> {
        self.volumes_of(vm)
            .into_iter()
            .filter(|v| !v.is_vm_disk() && v.node.is_some())
            .collect()
    }

    pub(crate) fn delete_volume(&mut self, id: &VolumeId) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        if let Some(vm) = v.attached_to {
            let vm = self.vms.get(&vm).map(|x| x.name.as_str()).unwrap_or("?");
            return Err(ApiError::conflict(format!(
                "volume '{}' is attached to VM '{vm}'; {}",
                v.name,
                if v.vm_disk.is_some() {
                    "it is that VM's own disk and goes with the VM"
                } else {
                    "detach it first"
                }
            ))
            .with_reason("volume_attached"));
        }
        Self::not_moving(v, "delete it")?;
        self.volumes.remove(id);
        Ok(vec![Touched::Volume(*id)])
    }

    pub(crate) fn attach_volume(
        &mut self,
        id: &VolumeId,
        vm: VmId,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        if let Some(other) = v.attached_to {
            let name = self.vms.get(&other).map(|x| x.name.as_str()).unwrap_or("?");
            return Err(ApiError::conflict(format!(
                "volume '{}' is already attached to VM '{name}'",
                v.name
            ))
            .with_reason("volume_attached"));
        }
        Self::not_moving(v, "attach it")?;
        self.check_attach(v, vm)?;
        let v = self.volume_mut(id)?;
        v.attached_to = Some(vm);
        v.updated_at = at;
        Ok(vec![Touched::Volume(*id)])
    }

    pub(crate) fn detach_volume(
        &mut self,
        id: &VolumeId,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        if v.vm_disk.is_some() {
            return Err(ApiError::conflict(format!(
                "volume '{}' is its VM's own disk; it cannot be detached",
                v.name
            ))
            .with_reason("vm_disk"));
        }
        if v.attached_to.is_none() {
            return Err(
                ApiError::conflict(format!("volume '{}' is not attached", v.name))
                    .with_reason("not_attached"),
            );
        }
        Self::not_moving(v, "detach it")?;
        // Attached to a VM on its host: the file stays there.
        let host = self.volume_host(v);
        let shared = self.pool_is_shared(&v.pool)?;
        let v = self.volume_mut(id)?;
        v.attached_to = None;
        if !shared {
            v.node = host.or(v.node);
        }
        v.updated_at = at;
        Ok(vec![Touched::Volume(*id)])
    }

    pub(crate) fn resize_volume(
        &mut self,
        id: &VolumeId,
        size_mib: u64,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        if size_mib <= v.size_mib {
            return Err(ApiError::invalid(
                "size_mib",
                format!(
                    "volumes only grow: '{}' has {} MiB, asked for {size_mib}",
                    v.name, v.size_mib
                ),
            ));
        }
        Self::not_moving(v, "resize it")?;
        let mut touched = vec![Touched::Volume(*id)];
        // A VM's own disk: the VM's spec says its size too (a migration target makes it so).
        if let (Some(disk), Some(vm)) = (v.vm_disk.clone(), v.attached_to)
            && let Some(vm) = self.vms.get_mut(&vm)
            && let Some(d) = vm.spec.disks.iter_mut().find(|d| d.name == disk)
        {
            d.size_mib = size_mib;
            vm.updated_at = at;
            touched.push(Touched::Vm(vm.id));
        }
        let v = self.volume_mut(id)?;
        v.size_mib = size_mib;
        v.updated_at = at;
        Ok(touched)
    }

    pub(crate) fn add_volume_snapshot(
        &mut self,
        id: &VolumeId,
        snapshot: &VolumeSnapshot,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        if v.snapshots.iter().any(|s| s.name == snapshot.name) {
            return Err(ApiError::conflict(format!(
                "volume '{}' already has a snapshot named '{}'",
                v.name, snapshot.name
            )));
        }
        let v = self.volume_mut(id)?;
        v.snapshots.push(snapshot.clone());
        v.updated_at = snapshot.created_at;
        Ok(vec![Touched::Volume(*id)])
    }

    pub(crate) fn remove_volume_snapshot(
        &mut self,
        id: &VolumeId,
        name: &str,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume_mut(id)?;
        let before = v.snapshots.len();
        v.snapshots.retain(|s| s.name != name);
        if v.snapshots.len() == before {
            return Err(ApiError::not_found("snapshot", name));
        }
        v.updated_at = at;
        Ok(vec![Touched::Volume(*id)])
    }

    pub(crate) fn begin_volume_move(
        &mut self,
        id: &VolumeId,
        to: &str,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        Self::not_moving(v, "move it again")?;
        if v.pool == to {
            return Err(ApiError::conflict(format!(
                "volume '{}' is already on pool '{to}'",
                v.name
            ))
            .with_reason("same_pool"));
        }
        let shared = self.pool_is_shared(to)?;
        let vm = v.attached_to.and_then(|vm| self.vms.get(&vm));
        if let (Some(disk), Some(vm)) = (&v.vm_disk, vm) {
            if shared != self.pool_is_shared(&v.pool)? {
                return Err(ApiError::conflict(format!(
                    "volume '{}' is VM '{}''s {disk} disk, on a {} pool; its disks stay all on \
                     shared pools or all on local ones (a migration copies all or none), so \
                     pool '{to}' ({}) is not possible",
                    v.name,
                    vm.name,
                    if shared { "local" } else { "shared" },
                    if shared { "shared" } else { "local" },
                ))
                .with_reason("vm_disk_pool_kind"));
            }
            if let Some(t) = vm.migrating_to {
                return Err(ApiError::conflict(format!(
                    "VM '{}' is migrating to host {t}",
                    vm.name
                ))
                .with_reason("already_migrating"));
            }
        }
        if let Some(vm) = vm
            && vm.spec.ha
            && !shared
        {
            return Err(ApiError::conflict(format!(
                "volume '{}' is attached to HA VM '{}', which another host may have to start; \
                 pool '{to}' is local",
                v.name, vm.name
            ))
            .with_reason("ha_needs_shared_pool"));
        }
        let v = self.volume_mut(id)?;
        v.moving_to = Some(to.to_string());
        v.updated_at = at;
        Ok(vec![Touched::Volume(*id)])
    }

    /// A move ended: on success the volume is now on `moving_to` (held on `node` for a local
    /// pool), stored as `format`, `compressed`; on failure it stays where it was.
    pub(crate) fn end_volume_move(
        &mut self,
        id: &VolumeId,
        done: Option<(Option<NodeId>, VolumeFormat, bool)>,
        at: UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let v = self.volume(id)?;
        let Some(to) = v.moving_to.clone() else {
            return Err(ApiError::conflict(format!(
                "volume '{}' is not moving",
                v.name
            )));
        };
        if let Some((node, _, _)) = &done {
            let shared = self.pool_is_shared(&to)?;
            if shared != node.is_none() {
                return Err(ApiError::invalid(
                    "node",
                    "a volume names its host exactly when its pool is local",
                ));
            }
        }
        let mut touched = vec![Touched::Volume(*id)];
        // A VM's boot disk moved: the VM's pool is where its boot disk is.
        if done.is_some()
            && v.vm_disk.as_deref() == Some("root")
            && let Some(vm) = v.attached_to.and_then(|vm| self.vms.get_mut(&vm))
        {
            vm.spec.pool = (to != "data").then(|| to.clone());
            vm.updated_at = at;
            touched.push(Touched::Vm(vm.id));
        }
        let v = self.volume_mut(id)?;
        v.moving_to = None;
        v.updated_at = at;
        if let Some((node, format, compressed)) = done {
            v.pool = to;
            v.node = node;
            v.format = format;
            v.compressed = compressed;
            v.moved_at = Some(at);
        }
        Ok(touched)
    }

    /// Names of the volumes on `pool` (a pool in use cannot be deleted).
    pub(crate) fn volumes_on(&self, pool: &str) -> Vec<&str> {
        self.volumes
            .values()
            .filter(|v| v.pool == pool || v.moving_to.as_deref() == Some(pool))
            .map(|v| v.name.as_str())
            .collect()
    }
}
