//! The replicated state and its pure `apply`.
//!
//! `apply` does no I/O and reads no clock: the same commands in the same order give the same state
//! on every replica. It returns which entities it touched; the store persists those rows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use novacron_types::{
    ApiError, ApiToken, Image, ImageId, JoinToken, NodeId, NodeInfo, Operation, OperationId,
    StoragePool, TieringPolicy, TokenId, User, UserId, Vm, VmId, Volume, VolumeId,
};

use crate::command::{Command, CommandResponse, CommandV1, Touched};

mod images;
mod nodes;
mod operations;
mod pools;
mod users;
mod vms;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

/// Cluster-wide settings created once at bootstrap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// HMAC key for session JWTs, shared so any host can check any session.
    pub jwt_secret: String,
    pub initialized_at: i64,
    /// Join tokens not yet used or expired (pruned when new ones are made).
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// IDs of removed hosts: never reused, and kept out of Raft membership.
    #[serde(default)]
    pub removed_nodes: BTreeSet<u64>,
    /// How volumes move between tiers (the defaults until someone sets it).
    #[serde(default)]
    pub tiering: Option<TieringPolicy>,
}

/// Everything replicated. Maps are ordered so snapshots are byte-for-byte reproducible.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub meta: ClusterMeta,
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub vms: BTreeMap<VmId, Vm>,
    pub images: BTreeMap<ImageId, Image>,
    pub users: BTreeMap<UserId, User>,
    pub tokens: BTreeMap<TokenId, ApiToken>,
    pub operations: BTreeMap<OperationId, Operation>,
    #[serde(default)]
    pub pools: BTreeMap<String, StoragePool>,
    #[serde(default)]
    pub volumes: BTreeMap<VolumeId, Volume>,
}

impl ClusterState {
    pub(crate) fn vm(&self, id: &VmId) -> Result<&Vm, ApiError> {
        self.vms
            .get(id)
            .ok_or_else(|| ApiError::not_found("VM", id))
    }

    fn vm_mut(&mut self, id: &VmId) -> Result<&mut Vm, ApiError> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("VM", id))
    }

    /// The VM, if it is on `node` (a stale or repeated command about a VM that moved is
    /// refused).
    fn vm_on(&self, id: &VmId, node: NodeId) -> Result<&Vm, ApiError> {
        let vm = self.vm(id)?;
        if vm.node != node {
            return Err(ApiError::conflict(format!(
                "VM '{}' is on host {}, not host {node}",
                vm.name, vm.node
            )));
        }
        Ok(vm)
    }

    /// Whether the VM's disks are on a shared pool (another host could open them).
    pub fn on_shared_pool(&self, vm: &Vm) -> bool {
        vm.spec
            .pool
            .as_ref()
            .and_then(|p| self.pools.get(p))
            .is_some_and(|p| p.shared)
    }

    /// [`Self::check_pool`] with the VM's own HA flag, for callers outside `apply`.
    pub fn check_vm_pool(&self, vm: &Vm) -> Result<(), ApiError> {
        self.check_pool(vm, vm.spec.ha)
    }

    /// A VM's pool must exist, and HA needs it shared (no other host could open local disks).
    fn check_pool(&self, vm: &Vm, ha: bool) -> Result<(), ApiError> {
        let pool = match &vm.spec.pool {
            Some(name) => Some(
                self.pools
                    .get(name)
                    .ok_or_else(|| ApiError::not_found("pool", name))?,
            ),
            None => None,
        };
        if ha && !pool.is_some_and(|p| p.shared) {
            return Err(ApiError::invalid(
                "ha",
                format!(
                    "VM '{}' cannot have HA: its disks are {}; HA restarts a VM on another host, \
                     which needs its disks on a shared pool",
                    vm.name,
                    match pool {
                        Some(p) => format!("on pool '{}', which is local to each host", p.name),
                        None => "in its host's own data directory".to_string(),
                    }
                ),
            )
            .with_reason("ha_needs_shared_pool"));
        }
        Ok(())
    }

    /// The rules the replicated state decides for a VM recorded on `vm.node` (capacity,
    /// role, maintenance, labels, affinity): checked in `apply`, so racing creates cannot
    /// overfill a host.
    fn check_placement(&self, vm: &Vm) -> Result<(), ApiError> {
        let node = self
            .nodes
            .get(&vm.node.0)
            .ok_or_else(|| ApiError::not_found("host", vm.node))?;
        let demand = crate::placement::Demand {
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disk_mib: 0,
            rules: &vm.spec.placement,
            pool: vm.spec.pool.as_deref(),
            vm: Some(vm.id),
        };
        let reasons = crate::placement::check_state(self, node, &demand);
        match reasons.first() {
            None => Ok(()),
            Some(first) => Err(ApiError::conflict(format!(
                "VM '{}' cannot go to host {}: {}",
                vm.name,
                vm.node,
                reasons
                    .iter()
                    .map(|r| r.message.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_reason(first.code.clone())),
        }
    }

    /// Removes finished operations last updated before `before`, then the oldest finished ones
    /// (by last update, then ID) until at most `keep_at_most` finished ones are left. Running
    /// operations are never removed.
    fn prune_operations(&mut self, before: i64, keep_at_most: u64) -> Vec<Touched> {
        let mut finished: Vec<(i64, OperationId)> = self
            .operations
            .values()
            .filter(|o| o.status.is_final())
            .map(|o| (o.updated_at, o.id))
            .collect();
        finished.sort();
        let over = finished
            .len()
            .saturating_sub(usize::try_from(keep_at_most).unwrap_or(usize::MAX));
        let old: Vec<OperationId> = finished
            .iter()
            .enumerate()
            .filter(|(i, (at, _))| *at < before || *i < over)
            .map(|(_, (_, id))| *id)
            .collect();
        for id in &old {
            self.operations.remove(id);
        }
        old.into_iter().map(Touched::Operation).collect()
    }

    pub fn vm_by_name(&self, name: &str) -> Option<&Vm> {
        self.vms.values().find(|v| v.name == name)
    }

    pub fn image_by_name(&self, name: &str) -> Option<&Image> {
        self.images.values().find(|i| i.name == name)
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.username == name)
    }

    /// Applies one command. A rejected command leaves the state exactly as it was.
    pub fn apply(&mut self, cmd: &Command) -> (CommandResponse, Vec<Touched>) {
        match cmd {
            Command::V1(c) => match self.apply_v1(c) {
                Ok(touched) => (CommandResponse::ok(), touched),
                Err(e) => (CommandResponse::rejected(e), Vec::new()),
            },
        }
    }

    fn apply_v1(&mut self, cmd: &CommandV1) -> Result<Vec<Touched>, ApiError> {
        use CommandV1::*;
        match cmd {
            InitCluster { jwt_secret, at } => self.init_cluster(jwt_secret, at),
            RegisterNode { node } => self.register_node(node),
            CreateJoinToken { token } => self.create_join_token(token),
            JoinNode {
                token_id,
                secret_sha256,
                node,
                at,
            } => self.join_node(token_id, secret_sha256, node, at),
            RemoveNode { id, force, at } => self.remove_node(id, force, at),
            CreateVm { vm } => self.create_vm(vm),
            SetNodeMaintenance { node, maintenance } => {
                self.set_node_maintenance(node, maintenance)
            }
            BeginMigration { id, from, to } => self.begin_migration(id, from, to),
            EndMigration { id } => self.end_migration(id),
            MoveVm { id, from, to, at } => self.move_vm(id, from, to, at),
            SetVmHa { id, ha, at } => self.set_vm_ha(id, ha, at),
            RecoverVm {
                id,
                from,
                to,
                seen,
                at,
            } => self.recover_vm(id, from, to, seen, at),
            CreatePool { pool } => self.create_pool(pool),
            DeletePool { name } => self.delete_pool(name),
            DeleteVm { id } => self.delete_vm(id),
            SetVmDesired { id, desired, at } => self.set_vm_desired(id, desired, at),
            RecordVmObserved {
                id,
                state,
                reason,
                at,
            } => self.record_vm_observed(id, state, reason, at),
            RecordVmObservedOn {
                node,
                id,
                state,
                reason,
                at,
            } => self.record_vm_observed_on(node, id, state, reason, at),
            SetVmLabels { id, changes, at } => self.set_vm_labels(id, changes, at),
            AddVmSnapshot { id, snapshot } => self.add_vm_snapshot(id, snapshot),
            RemoveVmSnapshot { id, name, at } => self.remove_vm_snapshot(id, name, at),
            CreateImage { image } => self.create_image(image),
            DeleteImage { id } => self.delete_image(id),
            CreateUser { user } => self.create_user(user),
            CreateToken { token } => self.create_token(token),
            RevokeToken { id } => self.revoke_token(id),
            CreateOperation { op } => self.create_operation(op),
            UpdateOperation {
                id,
                status,
                progress,
                message,
                error,
                at,
            } => self.update_operation(id, status, progress, message, error, at),
            SetMigrationProgress {
                id,
                progress,
                message,
                migration,
                at,
            } => self.set_migration_progress(id, progress, message, migration, at),
            PruneOperations { before } => Ok(self.prune_operations(*before, u64::MAX)),
            PruneOperationsKeeping {
                before,
                keep_at_most,
            } => Ok(self.prune_operations(*before, *keep_at_most)),
            CreateVolume { volume } => self.create_volume(volume),
            DeleteVolume { id } => self.delete_volume(id),
            AttachVolume { id, vm, at } => self.attach_volume(id, *vm, *at),
            DetachVolume { id, at } => self.detach_volume(id, *at),
            ResizeVolume { id, size_mib, at } => self.resize_volume(id, *size_mib, *at),
            AddVolumeSnapshot { id, snapshot } => self.add_volume_snapshot(id, snapshot),
            RemoveVolumeSnapshot { id, name, at } => self.remove_volume_snapshot(id, name, *at),
            BeginVolumeMove { id, to, at } => self.begin_volume_move(id, to, *at),
            EndVolumeMove { id, moved, at } => self.end_volume_move(
                id,
                moved.as_ref().map(|m| (m.node, m.format, m.compressed)),
                *at,
            ),
            SetTieringPolicy { policy } => self.set_tiering_policy(policy),
            AddVmDiskVolumes { vm } => self.add_vm_disk_volumes(vm),
        }
    }
}
