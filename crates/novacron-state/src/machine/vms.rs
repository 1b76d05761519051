//! `apply` for VMs: create and delete, desired and observed state, labels, snapshots, HA,
//! migrations and recovery after a host's loss.

use novacron_types::{ApiError, NodeId, PowerState, UnixMillis, Vm, VmId, VmSnapshot, VmState};
use std::collections::BTreeMap;

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn create_vm(&mut self, vm: &Vm) -> Result<Vec<Touched>, ApiError> {
        if self.vms.contains_key(&vm.id) {
            return Err(ApiError::conflict(format!(
                "VM ID {} already exists",
                vm.id
            )));
        }
        if self.vm_by_name(&vm.name).is_some() {
            return Err(ApiError::conflict(format!(
                "a VM named '{}' already exists",
                vm.name
            )));
        }
        if !self.images.contains_key(&vm.spec.image) {
            return Err(ApiError::not_found("image", vm.spec.image));
        }
        self.check_pool(vm, vm.spec.ha)?;
        self.check_placement(vm)?;
        let disks = self.vm_disk_volumes(vm)?;
        self.vms.insert(vm.id, vm.clone());
        let mut touched = vec![Touched::Vm(vm.id)];
        for d in disks {
            touched.push(Touched::Volume(d.id));
            self.volumes.insert(d.id, d);
        }
        Ok(touched)
    }

    pub(super) fn begin_migration(
        &mut self,
        id: &VmId,
        from: &NodeId,
        to: &NodeId,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_on(id, *from)?;
        if let Some(t) = vm.migrating_to {
            return Err(ApiError::conflict(format!(
                "VM '{}' is already migrating to host {t}",
                vm.name
            ))
            .with_reason("already_migrating"));
        }
        if let Some(v) = self
            .volumes_of(*id)
            .into_iter()
            .find(|v| v.moving_to.is_some())
        {
            return Err(ApiError::conflict(format!(
                "volume '{}' of VM '{}' is moving between pools; migrate the VM after \
                 the move",
                v.name, vm.name
            ))
            .with_reason("volume_moving"));
        }
        let mut there = vm.clone();
        there.node = *to;
        self.check_placement(&there)?;
        let vm = self.vm_mut(id)?;
        vm.migrating_to = Some(*to);
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn end_migration(&mut self, id: &VmId) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        vm.migrating_to = None;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn move_vm(
        &mut self,
        id: &VmId,
        from: &NodeId,
        to: &NodeId,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_on(id, *from)?;
        let mut moved = vm.clone();
        moved.node = *to;
        moved.updated_at = *at;
        moved.migrating_to = None;
        self.check_placement(&moved)?;
        self.vms.insert(*id, moved);
        let mut touched = vec![Touched::Vm(*id)];
        touched.extend(self.follow_vm(*id, *to));
        Ok(touched)
    }

    pub(super) fn set_vm_ha(
        &mut self,
        id: &VmId,
        ha: &bool,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm(id)?;
        self.check_pool(vm, *ha)?;
        if let Some(v) = self.local_volumes_of(*id).first().filter(|_| *ha) {
            return Err(ApiError::invalid(
                "ha",
                format!(
                    "VM '{}' cannot have HA: volume '{}' on a local pool is attached",
                    vm.name, v.name
                ),
            )
            .with_reason("ha_needs_shared_pool"));
        }
        let vm = self.vm_mut(id)?;
        vm.spec.ha = *ha;
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn recover_vm(
        &mut self,
        id: &VmId,
        from: &NodeId,
        to: &NodeId,
        seen: &UnixMillis,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_on(id, *from)?;
        if vm.updated_at != *seen {
            return Err(ApiError::conflict(format!(
                "VM '{}' changed since HA decided to move it",
                vm.name
            )));
        }
        if !vm.spec.ha {
            return Err(ApiError::conflict(format!(
                "VM '{}' is not marked for HA",
                vm.name
            )));
        }
        self.check_pool(vm, true)?;
        let mut moved = vm.clone();
        moved.node = *to;
        moved.migrating_to = None;
        moved.state = VmState::Stopped;
        moved.state_reason = Some(format!(
            "host {from} was lost; HA is restarting the VM on host {to}"
        ));
        moved.recovered_from = Some(*from);
        moved.updated_at = *at;
        self.check_placement(&moved)?;
        self.vms.insert(*id, moved);
        let mut touched = vec![Touched::Vm(*id)];
        touched.extend(self.follow_vm(*id, *to));
        Ok(touched)
    }

    pub(super) fn delete_vm(&mut self, id: &VmId) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm(id)?;
        if vm.state.has_process() {
            return Err(ApiError::conflict(format!(
                "VM '{}' is {}; stop it before deleting it",
                vm.name,
                vm.state.as_str()
            )));
        }
        let at = vm.updated_at;
        self.vms.remove(id);
        let mut touched = vec![Touched::Vm(*id)];
        touched.extend(self.drop_vm_volumes(*id, at));
        Ok(touched)
    }

    pub(super) fn set_vm_desired(
        &mut self,
        id: &VmId,
        desired: &PowerState,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        vm.desired = *desired;
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn record_vm_observed(
        &mut self,
        id: &VmId,
        state: &VmState,
        reason: &Option<String>,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        vm.state = *state;
        vm.state_reason = reason.clone();
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn record_vm_observed_on(
        &mut self,
        node: &NodeId,
        id: &VmId,
        state: &VmState,
        reason: &Option<String>,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        self.vm_on(id, *node)?;
        let vm = self.vm_mut(id)?;
        if *state == VmState::Running {
            vm.recovered_from = None;
        }
        vm.state = *state;
        vm.state_reason = reason.clone();
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn set_vm_labels(
        &mut self,
        id: &VmId,
        changes: &BTreeMap<String, Option<String>>,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        let mut labels = vm.labels.clone();
        for (k, v) in changes {
            match v {
                Some(v) => labels.insert(k.clone(), v.clone()),
                None => labels.remove(k),
            };
        }
        if labels.len() > novacron_types::validate::MAX_LABELS {
            return Err(ApiError::invalid(
                "labels",
                format!(
                    "a VM has at most {} labels",
                    novacron_types::validate::MAX_LABELS
                ),
            ));
        }
        vm.labels = labels;
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn add_vm_snapshot(
        &mut self,
        id: &VmId,
        snapshot: &VmSnapshot,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        if vm.snapshots.iter().any(|s| s.name == snapshot.name) {
            return Err(ApiError::conflict(format!(
                "VM '{}' already has a snapshot named '{}'",
                vm.name, snapshot.name
            )));
        }
        vm.snapshots.push(snapshot.clone());
        vm.updated_at = snapshot.created_at;
        Ok(vec![Touched::Vm(*id)])
    }

    pub(super) fn remove_vm_snapshot(
        &mut self,
        id: &VmId,
        name: &String,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        let vm = self.vm_mut(id)?;
        let before = vm.snapshots.len();
        vm.snapshots.retain(|s| &s.name != name);
        if vm.snapshots.len() == before {
            return Err(ApiError::not_found("snapshot", name));
        }
        vm.updated_at = *at;
        Ok(vec![Touched::Vm(*id)])
    }
}
