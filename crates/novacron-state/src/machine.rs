//! The replicated state and its pure `apply`.
//!
//! `apply` does no I/O and reads no clock: the same commands in the same order give the same state
//! on every replica. It returns which entities it touched; the store persists those rows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use novacron_types::{
    ApiError, ApiToken, Image, ImageId, JoinToken, NodeId, NodeInfo, Operation, OperationId,
    StoragePool, TieringPolicy, TokenId, User, UserId, Vm, VmId, VmState, Volume, VolumeId,
};

use crate::command::{Command, CommandResponse, CommandV1, Touched};

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
            InitCluster { jwt_secret, at } => {
                if !self.meta.jwt_secret.is_empty() {
                    return Err(ApiError::conflict("cluster is already initialized"));
                }
                self.meta.jwt_secret = jwt_secret.clone();
                self.meta.initialized_at = *at;
                Ok(vec![Touched::Meta])
            }
            RegisterNode { node } => {
                if self.meta.removed_nodes.contains(&node.id.0) {
                    return Err(ApiError::conflict(format!(
                        "host {} was removed from the cluster; wipe its data dir and join again",
                        node.id
                    )));
                }
                let mut node = node.clone();
                // Maintenance is the cluster's decision, not the host's: a restart keeps it.
                if let Some(old) = self.nodes.get(&node.id.0) {
                    node.maintenance = old.maintenance;
                }
                self.nodes.insert(node.id.0, node.clone());
                Ok(vec![Touched::Node(node.id.0)])
            }
            CreateJoinToken { token } => {
                if self.meta.join_tokens.contains_key(&token.id) {
                    return Err(ApiError::conflict("join token ID already exists"));
                }
                // Used and expired tokens are only history: drop them here so the set stays small.
                self.meta
                    .join_tokens
                    .retain(|_, t| t.used_by.is_none() && t.expires_at > token.created_at);
                self.meta
                    .join_tokens
                    .insert(token.id.clone(), token.clone());
                Ok(vec![Touched::Meta])
            }
            JoinNode {
                token_id,
                secret_sha256,
                node,
                at,
            } => {
                let bad = || {
                    ApiError::new(
                        novacron_types::ErrorCode::Unauthenticated,
                        "the join token is invalid, expired or already used; \
                         make a new one with `novacron cluster token`",
                    )
                };
                let token = self.meta.join_tokens.get(token_id).ok_or_else(bad)?;
                if token.secret_sha256 != *secret_sha256
                    || token.used_by.is_some()
                    || token.expires_at <= *at
                {
                    return Err(bad());
                }
                if node.role != token.role {
                    return Err(ApiError::invalid(
                        "role",
                        format!(
                            "this token is for a {} host, not a {} host",
                            token.role.as_str(),
                            node.role.as_str()
                        ),
                    ));
                }
                if node.id.0 == 0
                    || self.nodes.contains_key(&node.id.0)
                    || self.meta.removed_nodes.contains(&node.id.0)
                {
                    return Err(ApiError::conflict(format!(
                        "host ID {} is taken; retry the join",
                        node.id
                    )));
                }
                if let Some(t) = self.meta.join_tokens.get_mut(token_id) {
                    t.used_by = Some(node.id);
                }
                self.nodes.insert(node.id.0, node.clone());
                Ok(vec![Touched::Meta, Touched::Node(node.id.0)])
            }
            RemoveNode { id, force, at } => {
                if !self.nodes.contains_key(&id.0) {
                    return Err(ApiError::not_found("host", id));
                }
                let owned: Vec<VmId> = self
                    .vms
                    .values()
                    .filter(|v| v.node == *id)
                    .map(|v| v.id)
                    .collect();
                if !owned.is_empty() && !force {
                    return Err(ApiError::conflict(format!(
                        "host {id} still has {} VM(s); move or delete them, or remove it with \
                         --force if it is dead",
                        owned.len()
                    )));
                }
                let mut touched = vec![Touched::Meta, Touched::Node(id.0)];
                for vm_id in owned {
                    if let Some(vm) = self.vms.get_mut(&vm_id) {
                        vm.state = VmState::Unknown;
                        vm.state_reason =
                            Some(format!("its host {id} was removed from the cluster"));
                        vm.updated_at = *at;
                        touched.push(Touched::Vm(vm_id));
                    }
                }
                self.nodes.remove(&id.0);
                self.meta.removed_nodes.insert(id.0);
                Ok(touched)
            }
            CreateVm { vm } => {
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
            SetNodeMaintenance { node, maintenance } => {
                let n = self
                    .nodes
                    .get_mut(&node.0)
                    .ok_or_else(|| ApiError::not_found("host", node))?;
                n.maintenance = *maintenance;
                Ok(vec![Touched::Node(node.0)])
            }
            BeginMigration { id, from, to } => {
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
            EndMigration { id } => {
                let vm = self.vm_mut(id)?;
                vm.migrating_to = None;
                Ok(vec![Touched::Vm(*id)])
            }
            MoveVm { id, from, to, at } => {
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
            SetVmHa { id, ha, at } => {
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
            RecoverVm {
                id,
                from,
                to,
                seen,
                at,
            } => {
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
            CreatePool { pool } => {
                if self.pools.contains_key(&pool.name) {
                    return Err(ApiError::conflict(format!(
                        "a pool named '{}' already exists",
                        pool.name
                    )));
                }
                if let Some(other) = self.pools.values().find(|p| p.path == pool.path) {
                    return Err(ApiError::conflict(format!(
                        "pool '{}' already uses the directory {}",
                        other.name, pool.path
                    )));
                }
                self.pools.insert(pool.name.clone(), pool.clone());
                Ok(vec![Touched::Pool(pool.name.clone())])
            }
            DeletePool { name } => {
                if !self.pools.contains_key(name) {
                    return Err(ApiError::not_found("pool", name));
                }
                let users: Vec<&str> = self
                    .vms
                    .values()
                    .filter(|v| v.spec.pool.as_deref() == Some(name.as_str()))
                    .map(|v| v.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(ApiError::conflict(format!(
                        "pool '{name}' still holds the disks of {} VM(s): {}",
                        users.len(),
                        users.join(", ")
                    ))
                    .with_reason("pool_in_use"));
                }
                let volumes = self.volumes_on(name);
                if !volumes.is_empty() {
                    return Err(ApiError::conflict(format!(
                        "pool '{name}' still holds {} volume(s): {}",
                        volumes.len(),
                        volumes.join(", ")
                    ))
                    .with_reason("pool_in_use"));
                }
                self.pools.remove(name);
                Ok(vec![Touched::Pool(name.clone())])
            }
            DeleteVm { id } => {
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
            SetVmDesired { id, desired, at } => {
                let vm = self.vm_mut(id)?;
                vm.desired = *desired;
                vm.updated_at = *at;
                Ok(vec![Touched::Vm(*id)])
            }
            RecordVmObserved {
                id,
                state,
                reason,
                at,
            } => {
                let vm = self.vm_mut(id)?;
                vm.state = *state;
                vm.state_reason = reason.clone();
                vm.updated_at = *at;
                Ok(vec![Touched::Vm(*id)])
            }
            RecordVmObservedOn {
                node,
                id,
                state,
                reason,
                at,
            } => {
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
            SetVmLabels { id, changes, at } => {
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
            AddVmSnapshot { id, snapshot } => {
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
            RemoveVmSnapshot { id, name, at } => {
                let vm = self.vm_mut(id)?;
                let before = vm.snapshots.len();
                vm.snapshots.retain(|s| &s.name != name);
                if vm.snapshots.len() == before {
                    return Err(ApiError::not_found("snapshot", name));
                }
                vm.updated_at = *at;
                Ok(vec![Touched::Vm(*id)])
            }
            CreateImage { image } => {
                if self.images.contains_key(&image.id) {
                    return Err(ApiError::conflict(format!(
                        "image ID {} already exists",
                        image.id
                    )));
                }
                if self.image_by_name(&image.name).is_some() {
                    return Err(ApiError::conflict(format!(
                        "an image named '{}' already exists",
                        image.name
                    )));
                }
                self.images.insert(image.id, image.clone());
                Ok(vec![Touched::Image(image.id)])
            }
            DeleteImage { id } => {
                let image = self
                    .images
                    .get(id)
                    .ok_or_else(|| ApiError::not_found("image", id))?;
                if let Some(vm) = self.vms.values().find(|v| v.spec.image == *id) {
                    return Err(ApiError::conflict(format!(
                        "image '{}' is used by VM '{}'",
                        image.name, vm.name
                    )));
                }
                self.images.remove(id);
                Ok(vec![Touched::Image(*id)])
            }
            CreateUser { user } => {
                if self.users.contains_key(&user.id) || self.user_by_name(&user.username).is_some()
                {
                    return Err(ApiError::conflict(format!(
                        "a user named '{}' already exists",
                        user.username
                    )));
                }
                self.users.insert(user.id, user.clone());
                Ok(vec![Touched::User(user.id)])
            }
            CreateToken { token } => {
                if !self.users.contains_key(&token.user) {
                    return Err(ApiError::not_found("user", token.user));
                }
                if self.tokens.contains_key(&token.id) {
                    return Err(ApiError::conflict(format!(
                        "token ID {} already exists",
                        token.id
                    )));
                }
                self.tokens.insert(token.id, token.clone());
                Ok(vec![Touched::Token(token.id)])
            }
            RevokeToken { id } => {
                let token = self
                    .tokens
                    .get_mut(id)
                    .ok_or_else(|| ApiError::not_found("token", id))?;
                token.revoked = true;
                Ok(vec![Touched::Token(*id)])
            }
            CreateOperation { op } => {
                if self.operations.contains_key(&op.id) {
                    return Err(ApiError::conflict(format!(
                        "operation ID {} already exists",
                        op.id
                    )));
                }
                self.operations.insert(op.id, op.clone());
                Ok(vec![Touched::Operation(op.id)])
            }
            UpdateOperation {
                id,
                status,
                progress,
                message,
                error,
                at,
            } => {
                let op = self
                    .operations
                    .get_mut(id)
                    .ok_or_else(|| ApiError::not_found("operation", id))?;
                if op.status.is_final() {
                    return Err(ApiError::conflict(format!(
                        "operation {id} already finished ({:?})",
                        op.status
                    )));
                }
                op.status = *status;
                op.progress = (*progress).min(100);
                op.message = message.clone();
                op.error = error.clone();
                op.updated_at = *at;
                Ok(vec![Touched::Operation(*id)])
            }
            SetMigrationProgress {
                id,
                progress,
                message,
                migration,
                at,
            } => {
                let op = self
                    .operations
                    .get_mut(id)
                    .ok_or_else(|| ApiError::not_found("operation", id))?;
                if op.status.is_final() {
                    return Err(ApiError::conflict(format!(
                        "operation {id} already finished ({:?})",
                        op.status
                    )));
                }
                op.progress = (*progress).min(100);
                op.message = message.clone();
                op.migration = Some(migration.clone());
                op.updated_at = *at;
                Ok(vec![Touched::Operation(*id)])
            }
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
            SetTieringPolicy { policy } => {
                novacron_types::validate::tiering_policy(policy)?;
                self.meta.tiering = Some(policy.clone());
                Ok(vec![Touched::Meta])
            }
            AddVmDiskVolumes { vm } => self.add_vm_disk_volumes(vm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_types::*;

    /// A state with host 1 registered (VMs can only be recorded on a known host).
    pub(super) fn with_host(memory_mib: u64) -> ClusterState {
        let mut s = ClusterState::default();
        s.nodes.insert(
            1,
            NodeInfo {
                id: NodeId(1),
                name: "h1".into(),
                api_address: String::new(),
                qemu_version: String::new(),
                accelerator: "tcg".into(),
                cpus: 1,
                memory_mib,
                registered_at: 0,
                labels: Default::default(),
                role: HostRole::Full,
                cpu_overcommit_pct: 400,
                memory_overcommit_pct: 100,
                reserved_memory_mib: 0,
                maintenance: false,
            },
        );
        s
    }

    fn image(name: &str) -> Image {
        Image {
            id: ImageId::new_random(),
            name: name.into(),
            description: String::new(),
            format: ImageFormat::Qcow2,
            path: "/x".into(),
            virtual_size: 1,
            boot: None,
            node: NodeId(1),
            created_at: 0,
        }
    }

    fn vm(name: &str, image: ImageId) -> Vm {
        Vm {
            id: VmId::new_random(),
            name: name.into(),
            state: VmState::Stopped,
            state_reason: None,
            desired: PowerState::Stopped,
            node: NodeId(1),
            spec: VmSpec {
                name: name.into(),
                image,
                vcpus: 1,
                memory_mib: 128,
                disks: vec![],
                boot: None,
                placement: Default::default(),
                pool: None,
                ha: false,
            },
            snapshots: vec![],
            labels: Default::default(),
            created_at: 0,
            updated_at: 0,
            migrating_to: None,
            recovered_from: None,
        }
    }

    fn op() -> Operation {
        Operation {
            id: OperationId::new_random(),
            kind: "vm.start".into(),
            status: OperationStatus::Running,
            progress: 0,
            message: String::new(),
            error: None,
            resources: vec![],
            node: NodeId(1),
            requestor: "admin".into(),
            created_at: 0,
            updated_at: 0,
            migration: None,
        }
    }

    fn apply(s: &mut ClusterState, c: CommandV1) -> Result<(), ApiError> {
        s.apply(&Command::V1(c)).0.into_result()
    }

    #[test]
    fn vm_names_are_unique_and_a_rejected_command_changes_nothing() {
        let mut s = with_host(4096);
        let img = image("demo");
        apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
        apply(
            &mut s,
            CommandV1::CreateVm {
                vm: vm("a", img.id),
            },
        )
        .expect("first");
        let before = s.clone();
        let err = apply(
            &mut s,
            CommandV1::CreateVm {
                vm: vm("a", img.id),
            },
        )
        .expect_err("dup");
        assert_eq!(err.code, ErrorCode::Conflict);
        assert_eq!(s, before);
        let err = apply(
            &mut s,
            CommandV1::CreateVm {
                vm: vm("b", ImageId::new_random()),
            },
        )
        .expect_err("img");
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(s, before);
    }

    #[test]
    fn migrations_hold_room_on_the_target_until_they_end() {
        let mut s = with_host(4096);
        let mut small = s.nodes[&1].clone();
        small.id = NodeId(2);
        small.memory_mib = 200;
        s.nodes.insert(2, small);
        let img = image("demo");
        apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
        let (a, b) = (vm("a", img.id), vm("b", img.id));
        apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect("a");
        apply(&mut s, CommandV1::CreateVm { vm: b.clone() }).expect("b");
        let begin = |id| CommandV1::BeginMigration {
            id,
            from: NodeId(1),
            to: NodeId(2),
        };
        apply(&mut s, begin(a.id)).expect("a fits on host 2");
        let e = apply(&mut s, begin(a.id)).expect_err("twice");
        assert_eq!(e.reason.as_deref(), Some("already_migrating"));
        // 128 + 128 > 200: the second move does not fit while the first holds its room.
        let before = s.clone();
        let e = apply(&mut s, begin(b.id)).expect_err("no room");
        assert_eq!(e.reason.as_deref(), Some("not_enough_memory"), "{e:?}");
        assert_eq!(s, before);
        apply(&mut s, CommandV1::EndMigration { id: a.id }).expect("end");
        apply(&mut s, begin(b.id)).expect("room again");
        apply(
            &mut s,
            CommandV1::MoveVm {
                id: b.id,
                from: NodeId(1),
                to: NodeId(2),
                at: 9,
            },
        )
        .expect("move");
        assert_eq!(
            (s.vms[&b.id].node, s.vms[&b.id].migrating_to),
            (NodeId(2), None)
        );
        let e = apply(
            &mut s,
            CommandV1::MoveVm {
                id: b.id,
                from: NodeId(1),
                to: NodeId(2),
                at: 10,
            },
        )
        .expect_err("a repeated switch changes nothing");
        assert_eq!(e.code, ErrorCode::Conflict);
    }

    fn pool(name: &str, shared: bool) -> StoragePool {
        StoragePool {
            name: name.into(),
            path: format!("/srv/{name}"),
            tier: novacron_types::PoolTier::Hot,
            shared,
            capacity_bytes: 1 << 40,
            cost_per_gib_month: 0.1,
            performance_class: "ssd".into(),
            created_at: 0,
        }
    }

    #[test]
    fn ha_needs_a_shared_pool_and_recovery_moves_the_vm_once() {
        let mut s = with_host(4096);
        let mut h2 = s.nodes[&1].clone();
        h2.id = NodeId(2);
        s.nodes.insert(2, h2);
        let img = image("demo");
        apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
        apply(
            &mut s,
            CommandV1::CreatePool {
                pool: pool("local", false),
            },
        )
        .expect("local");
        apply(
            &mut s,
            CommandV1::CreatePool {
                pool: pool("nfs", true),
            },
        )
        .expect("nfs");
        let e = apply(
            &mut s,
            CommandV1::CreatePool {
                pool: pool("nfs", true),
            },
        )
        .expect_err("dup");
        assert_eq!(e.code, ErrorCode::Conflict);

        let mut a = vm("a", img.id);
        a.spec.ha = true;
        let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("no pool");
        assert_eq!(e.reason.as_deref(), Some("ha_needs_shared_pool"));
        a.spec.pool = Some("local".into());
        let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("local pool");
        assert_eq!(e.reason.as_deref(), Some("ha_needs_shared_pool"));
        a.spec.pool = Some("ghost".into());
        let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("ghost");
        assert_eq!(e.code, ErrorCode::NotFound);
        a.spec.pool = Some("nfs".into());
        a.spec.disks = vec![DiskSpec {
            name: "root".into(),
            size_mib: 64,
        }];
        apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect("shared pool");
        // Host 1 starts moving the VM's boot disk to another shared pool, then is lost.
        s.pools.insert("nfs2".into(), pool("nfs2", true));
        let root = VolumeId::of_vm_disk(a.id, "root");
        apply(
            &mut s,
            CommandV1::BeginVolumeMove {
                id: root,
                to: "nfs2".into(),
                at: 8,
            },
        )
        .expect("move");

        let recover = |from, to, seen| CommandV1::RecoverVm {
            id: a.id,
            from: NodeId(from),
            to: NodeId(to),
            seen,
            at: 9,
        };
        // The VM changed since the decision (its host came back and recorded a start).
        let e = apply(&mut s, recover(1, 2, 1)).expect_err("stale decision");
        assert_eq!(e.code, ErrorCode::Conflict);
        apply(&mut s, recover(1, 2, 0)).expect("recovered");
        assert_eq!(s.vms[&a.id].node, NodeId(2));
        // The move died with its host: the disk is where it was, and free to move again.
        let disk = s.volume(&root).expect("root");
        assert_eq!(
            (disk.pool.as_str(), disk.moving_to.as_deref()),
            ("nfs", None)
        );
        assert_eq!(s.vms[&a.id].recovered_from, Some(NodeId(1)));
        // A second leader deciding the same thing changes nothing.
        let before = s.clone();
        apply(&mut s, recover(1, 2, 9)).expect_err("already moved");
        assert_eq!(s, before);
        // A late report from the lost host is refused; the new host's running clears the mark.
        let seen = |node, state| CommandV1::RecordVmObservedOn {
            node: NodeId(node),
            id: a.id,
            state,
            reason: None,
            at: 10,
        };
        apply(&mut s, seen(1, VmState::Running)).expect_err("old host");
        apply(&mut s, seen(2, VmState::Running)).expect("new host");
        assert_eq!(s.vms[&a.id].recovered_from, None);

        let e = apply(&mut s, CommandV1::DeletePool { name: "nfs".into() }).expect_err("in use");
        assert_eq!(e.reason.as_deref(), Some("pool_in_use"));
        apply(
            &mut s,
            CommandV1::SetVmHa {
                id: a.id,
                ha: false,
                at: 11,
            },
        )
        .expect("ha off");
        let e = apply(&mut s, recover(2, 1, 11)).expect_err("not ha");
        assert_eq!(e.code, ErrorCode::Conflict);
        apply(
            &mut s,
            CommandV1::DeletePool {
                name: "local".into(),
            },
        )
        .expect("unused");
        assert!(!s.pools.contains_key("local"));
    }

    fn volume(name: &str, pool: &str, node: Option<NodeId>) -> Volume {
        Volume {
            id: VolumeId::new_random(),
            name: name.into(),
            pool: pool.into(),
            node,
            size_mib: 16,
            format: VolumeFormat::Qcow2,
            compressed: false,
            attached_to: None,
            vm_disk: None,
            snapshots: vec![],
            labels: Default::default(),
            moving_to: None,
            moved_at: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn volumes_follow_their_rules() {
        let mut s = with_host(4096);
        let mut h2 = s.nodes[&1].clone();
        h2.id = NodeId(2);
        s.nodes.insert(2, h2);
        let img = image("demo");
        s.images.insert(img.id, img.clone());
        s.pools.insert("cold".into(), pool("cold", false));
        s.pools.insert("nfs".into(), pool("nfs", true));
        let mut v1 = vm("web", img.id);
        v1.spec.disks = vec![DiskSpec {
            name: "root".into(),
            size_mib: 64,
        }];
        apply(&mut s, CommandV1::CreateVm { vm: v1.clone() }).expect("vm");
        // The VM's boot disk is a volume, attached, named after the VM.
        let root = s.volume_by_name("web-root").expect("root volume").clone();
        assert_eq!(root.id, VolumeId::of_vm_disk(v1.id, "root"));
        assert_eq!(root.attached_to, Some(v1.id));
        assert_eq!((root.pool.as_str(), root.node), ("data", Some(NodeId(1))));
        let err = apply(&mut s, CommandV1::DeleteVolume { id: root.id }).expect_err("own disk");
        assert_eq!(err.reason.as_deref(), Some("volume_attached"));
        let err = apply(&mut s, CommandV1::DetachVolume { id: root.id, at: 1 }).expect_err("own");
        assert_eq!(err.reason.as_deref(), Some("vm_disk"));

        // A local volume on host 2 cannot go to a VM on host 1; a shared one can.
        let far = volume("far", "cold", Some(NodeId(2)));
        apply(
            &mut s,
            CommandV1::CreateVolume {
                volume: far.clone(),
            },
        )
        .expect("far");
        let err = apply(
            &mut s,
            CommandV1::AttachVolume {
                id: far.id,
                vm: v1.id,
                at: 1,
            },
        )
        .expect_err("elsewhere");
        assert_eq!(err.reason.as_deref(), Some("volume_elsewhere"));
        let dup = volume("far", "cold", Some(NodeId(1)));
        assert!(apply(&mut s, CommandV1::CreateVolume { volume: dup }).is_err());
        let bad = volume("nohost", "cold", None);
        let err = apply(&mut s, CommandV1::CreateVolume { volume: bad }).expect_err("node");
        assert_eq!(err.field.as_deref(), Some("node"));
        let shared = volume("shared", "nfs", None);
        apply(
            &mut s,
            CommandV1::CreateVolume {
                volume: shared.clone(),
            },
        )
        .expect("shared");
        apply(
            &mut s,
            CommandV1::AttachVolume {
                id: shared.id,
                vm: v1.id,
                at: 2,
            },
        )
        .expect("attach");
        assert!(
            apply(&mut s, CommandV1::DeleteVolume { id: shared.id }).is_err(),
            "attached volumes are not deleted"
        );

        // Moves: one at a time; a pool with volumes (or moves into it) is not deleted.
        apply(
            &mut s,
            CommandV1::BeginVolumeMove {
                id: far.id,
                to: "nfs".into(),
                at: 3,
            },
        )
        .expect("begin");
        let err = apply(
            &mut s,
            CommandV1::BeginVolumeMove {
                id: far.id,
                to: "data".into(),
                at: 3,
            },
        )
        .expect_err("twice");
        assert_eq!(err.reason.as_deref(), Some("volume_moving"));
        assert!(apply(&mut s, CommandV1::DeleteVolume { id: far.id }).is_err());
        let moved = crate::MovedVolume {
            node: Some(NodeId(2)),
            format: VolumeFormat::Qcow2,
            compressed: false,
        };
        assert!(
            apply(
                &mut s,
                CommandV1::EndVolumeMove {
                    id: far.id,
                    moved: Some(moved),
                    at: 4
                }
            )
            .is_err(),
            "a shared pool names no host"
        );
        let moved = crate::MovedVolume {
            node: None,
            format: VolumeFormat::Qcow2,
            compressed: true,
        };
        apply(
            &mut s,
            CommandV1::EndVolumeMove {
                id: far.id,
                moved: Some(moved),
                at: 4,
            },
        )
        .expect("end");
        let far_now = s.volume(&far.id).expect("far").clone();
        assert_eq!(
            (far_now.pool.as_str(), far_now.node, far_now.compressed),
            ("nfs", None, true)
        );
        assert_eq!(far_now.moved_at, Some(4));
        let err = apply(&mut s, CommandV1::DeletePool { name: "nfs".into() }).expect_err("in use");
        assert_eq!(err.reason.as_deref(), Some("pool_in_use"));
        assert!(
            apply(
                &mut s,
                CommandV1::ResizeVolume {
                    id: far.id,
                    size_mib: 8,
                    at: 5
                }
            )
            .is_err()
        );
        apply(
            &mut s,
            CommandV1::ResizeVolume {
                id: far.id,
                size_mib: 32,
                at: 5,
            },
        )
        .expect("grow");

        // A VM that moves takes its local disks along; a deleted VM drops its own disks and
        // leaves the others detached.
        apply(
            &mut s,
            CommandV1::MoveVm {
                id: v1.id,
                from: NodeId(1),
                to: NodeId(2),
                at: 6,
            },
        )
        .expect("move");
        assert_eq!(s.volume(&root.id).expect("root").node, Some(NodeId(2)));
        apply(&mut s, CommandV1::DeleteVm { id: v1.id }).expect("delete vm");
        assert!(s.volume(&root.id).is_err());
        assert_eq!(s.volume(&shared.id).expect("kept").attached_to, None);
    }

    #[test]
    fn a_vms_own_disks_move_resize_and_keep_its_pool() {
        let mut s = with_host(4096);
        let img = image("demo");
        s.images.insert(img.id, img.clone());
        s.pools.insert("hot".into(), pool("hot", false));
        s.pools.insert("nfs".into(), pool("nfs", true));
        let mut v = vm("db", img.id);
        v.spec.disks = vec![
            DiskSpec {
                name: "root".into(),
                size_mib: 64,
            },
            DiskSpec {
                name: "disk1".into(),
                size_mib: 8,
            },
        ];
        apply(&mut s, CommandV1::CreateVm { vm: v.clone() }).expect("vm");
        let root = VolumeId::of_vm_disk(v.id, "root");
        let disk1 = VolumeId::of_vm_disk(v.id, "disk1");
        // Local disks stay local: a migration copies all of a VM's disks or none.
        let err = apply(
            &mut s,
            CommandV1::BeginVolumeMove {
                id: root,
                to: "nfs".into(),
                at: 1,
            },
        )
        .expect_err("kind");
        assert_eq!(err.reason.as_deref(), Some("vm_disk_pool_kind"));
        // The boot disk moves: the VM's pool follows it; a failed move changes nothing.
        let begin = |id| CommandV1::BeginVolumeMove {
            id,
            to: "hot".into(),
            at: 2,
        };
        apply(&mut s, begin(root)).expect("begin");
        let err = apply(
            &mut s,
            CommandV1::BeginMigration {
                id: v.id,
                from: NodeId(1),
                to: NodeId(1),
            },
        )
        .expect_err("moving");
        assert_eq!(err.reason.as_deref(), Some("volume_moving"));
        apply(
            &mut s,
            CommandV1::EndVolumeMove {
                id: root,
                moved: None,
                at: 3,
            },
        )
        .expect("failed move");
        assert_eq!(s.vms[&v.id].spec.pool, None);
        apply(&mut s, begin(root)).expect("begin");
        let done = crate::MovedVolume {
            node: Some(NodeId(1)),
            format: VolumeFormat::Qcow2,
            compressed: false,
        };
        apply(
            &mut s,
            CommandV1::EndVolumeMove {
                id: root,
                moved: Some(done.clone()),
                at: 4,
            },
        )
        .expect("moved");
        assert_eq!(s.vms[&v.id].spec.pool.as_deref(), Some("hot"));
        assert_eq!(s.volume(&root).expect("root").pool, "hot");
        // Another disk moving leaves the VM's pool alone.
        apply(
            &mut s,
            CommandV1::BeginVolumeMove {
                id: disk1,
                to: "hot".into(),
                at: 5,
            },
        )
        .expect("begin disk1");
        apply(
            &mut s,
            CommandV1::EndVolumeMove {
                id: disk1,
                moved: Some(done),
                at: 6,
            },
        )
        .expect("moved disk1");
        assert_eq!(s.vms[&v.id].spec.pool.as_deref(), Some("hot"));
        // Growing an own disk grows the VM's spec of it.
        apply(
            &mut s,
            CommandV1::ResizeVolume {
                id: disk1,
                size_mib: 12,
                at: 7,
            },
        )
        .expect("grow");
        assert_eq!(s.vms[&v.id].spec.disks[1].size_mib, 12);

        // A VM recorded before its disks were volumes gets them, once.
        s.volumes.remove(&root);
        apply(&mut s, CommandV1::AddVmDiskVolumes { vm: v.id }).expect("backfill");
        let back = s.volume(&root).expect("root again").clone();
        assert_eq!((back.pool.as_str(), back.node), ("hot", Some(NodeId(1))));
        let count = s.volumes.len();
        apply(&mut s, CommandV1::AddVmDiskVolumes { vm: v.id }).expect("again");
        assert_eq!(
            (s.volumes.len(), s.volume(&root).ok()),
            (count, Some(&back))
        );
    }

    #[test]
    fn running_vms_and_used_images_cannot_be_deleted() {
        let mut s = with_host(4096);
        let img = image("demo");
        apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
        let v = vm("a", img.id);
        apply(&mut s, CommandV1::CreateVm { vm: v.clone() }).expect("vm");
        apply(
            &mut s,
            CommandV1::RecordVmObserved {
                id: v.id,
                state: VmState::Running,
                reason: None,
                at: 5,
            },
        )
        .expect("observed");
        assert_eq!(s.vms[&v.id].updated_at, 5);
        let e = apply(&mut s, CommandV1::DeleteVm { id: v.id }).expect_err("running");
        assert_eq!(e.code, ErrorCode::Conflict);
        let e = apply(&mut s, CommandV1::DeleteImage { id: img.id }).expect_err("in use");
        assert_eq!(e.code, ErrorCode::Conflict);
        apply(
            &mut s,
            CommandV1::RecordVmObserved {
                id: v.id,
                state: VmState::Crashed,
                reason: Some("killed".into()),
                at: 6,
            },
        )
        .expect("crashed");
        apply(&mut s, CommandV1::DeleteVm { id: v.id }).expect("delete crashed");
        apply(&mut s, CommandV1::DeleteImage { id: img.id }).expect("image free now");
        assert!(s.vms.is_empty() && s.images.is_empty());
    }

    #[test]
    fn finished_operations_are_immutable_and_pruned_by_age() {
        let mut s = with_host(4096);
        let o = op();
        apply(&mut s, CommandV1::CreateOperation { op: o.clone() }).expect("create");
        let done = |status| CommandV1::UpdateOperation {
            id: o.id,
            status,
            progress: 250,
            message: "done".into(),
            error: None,
            at: 10,
        };
        apply(&mut s, done(OperationStatus::Success)).expect("finish");
        assert_eq!(s.operations[&o.id].progress, 100, "progress is clamped");
        let e = apply(&mut s, done(OperationStatus::Failure)).expect_err("final");
        assert_eq!(e.code, ErrorCode::Conflict);
        assert_eq!(s.operations[&o.id].status, OperationStatus::Success);

        let running = op();
        apply(
            &mut s,
            CommandV1::CreateOperation {
                op: running.clone(),
            },
        )
        .expect("create 2");
        let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperations { before: 11 }));
        assert_eq!(touched, vec![Touched::Operation(o.id)]);
        assert!(
            s.operations.contains_key(&running.id),
            "running operations are never pruned"
        );
    }

    #[test]
    fn operations_are_pruned_by_count_oldest_first_and_never_while_running() {
        let mut s = ClusterState::default();
        let mut finished = Vec::new();
        for at in 1..=5 {
            let mut o = op();
            o.status = OperationStatus::Success;
            o.updated_at = at;
            finished.push(o.id);
            apply(&mut s, CommandV1::CreateOperation { op: o }).expect("create");
        }
        let running = op();
        apply(
            &mut s,
            CommandV1::CreateOperation {
                op: running.clone(),
            },
        )
        .expect("create running");
        let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperationsKeeping {
            before: 0,
            keep_at_most: 2,
        }));
        assert_eq!(touched.len(), 3, "{touched:?}");
        let left: Vec<OperationId> = finished
            .iter()
            .copied()
            .filter(|id| s.operations.contains_key(id))
            .collect();
        assert_eq!(left, finished[3..].to_vec(), "the two newest are kept");
        assert!(s.operations.contains_key(&running.id));
        // Age still applies below the count.
        let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperationsKeeping {
            before: 5,
            keep_at_most: 100,
        }));
        assert_eq!(touched, vec![Touched::Operation(finished[3])]);
    }

    #[test]
    fn cluster_init_happens_once() {
        let mut s = with_host(4096);
        apply(
            &mut s,
            CommandV1::InitCluster {
                jwt_secret: "k".into(),
                at: 1,
            },
        )
        .expect("init");
        let e = apply(
            &mut s,
            CommandV1::InitCluster {
                jwt_secret: "other".into(),
                at: 2,
            },
        )
        .expect_err("twice");
        assert_eq!(e.code, ErrorCode::Conflict);
        assert_eq!(s.meta.jwt_secret, "k");
    }

    #[test]
    fn commands_are_tagged_with_their_version_on_the_wire() {
        let c: Command = CommandV1::DeleteVm {
            id: VmId::new_random(),
        }
        .into();
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["version"], "1");
        assert_eq!(json["type"], "delete_vm");
        let back: Command = serde_json::from_value(json).expect("back");
        assert_eq!(back, c);
    }
}

/// Property tests over random command sequences (a small seeded generator, reproducible).
#[cfg(test)]
mod properties {
    use super::*;
    use crate::command::{Command, CommandV1};
    use novacron_chaos::seeded::Seeded as Gen;
    use novacron_types::*;

    /// A command drawn from a small pool of names and IDs, so conflicts and hits are frequent.
    fn command(g: &mut Gen, vms: &[VmId], images: &[ImageId], ops: &[OperationId]) -> Command {
        let vm = vms[g.below(vms.len() as u64) as usize];
        let image = images[g.below(images.len() as u64) as usize];
        let op = ops[g.below(ops.len() as u64) as usize];
        let at = g.below(1000) as i64;
        let name = format!("n{}", g.below(3));
        let states = VmState::ALL;
        let c = match g.below(9) {
            0 => CommandV1::CreateImage {
                image: Image {
                    id: image,
                    name,
                    description: String::new(),
                    format: ImageFormat::Qcow2,
                    path: "/i".into(),
                    virtual_size: 1,
                    boot: None,
                    node: NodeId(1),
                    created_at: at,
                },
            },
            1 | 2 => CommandV1::CreateVm {
                vm: Vm {
                    id: vm,
                    name: name.clone(),
                    state: VmState::Stopped,
                    state_reason: None,
                    desired: PowerState::Stopped,
                    node: NodeId(1),
                    spec: VmSpec {
                        name,
                        image,
                        vcpus: 1,
                        memory_mib: 64,
                        disks: vec![],
                        boot: None,
                        placement: Default::default(),
                        pool: None,
                        ha: false,
                    },
                    snapshots: vec![],
                    labels: Default::default(),
                    created_at: at,
                    updated_at: at,
                    migrating_to: None,
                    recovered_from: None,
                },
            },
            3 => CommandV1::DeleteVm { id: vm },
            4 => CommandV1::RecordVmObserved {
                id: vm,
                state: states[g.below(states.len() as u64) as usize],
                reason: None,
                at,
            },
            5 => CommandV1::DeleteImage { id: image },
            6 => CommandV1::CreateOperation {
                op: Operation {
                    id: op,
                    kind: "vm.start".into(),
                    status: OperationStatus::Running,
                    progress: 0,
                    message: String::new(),
                    error: None,
                    resources: vec![],
                    node: NodeId(1),
                    requestor: "p".into(),
                    created_at: at,
                    updated_at: at,
                    migration: None,
                },
            },
            7 => CommandV1::UpdateOperation {
                id: op,
                status: [
                    OperationStatus::Running,
                    OperationStatus::Success,
                    OperationStatus::Failure,
                ][g.below(3) as usize],
                progress: g.below(200) as u8,
                message: String::new(),
                error: None,
                at,
            },
            _ => CommandV1::PruneOperations { before: at },
        };
        Command::V1(c)
    }

    #[test]
    fn apply_is_deterministic_rejections_change_nothing_and_invariants_hold() {
        for seed in 0..200u64 {
            let mut g = Gen::new(seed);
            let vms: Vec<VmId> = (0..4).map(|_| VmId::new_random()).collect();
            let images: Vec<ImageId> = (0..2).map(|_| ImageId::new_random()).collect();
            let ops: Vec<OperationId> = (0..3).map(|_| OperationId::new_random()).collect();
            let cmds: Vec<Command> = (0..60)
                .map(|_| command(&mut g, &vms, &images, &ops))
                .collect();

            // Room for three of the four VMs: some creates must be refused for capacity.
            let (mut a, mut b) = (tests::with_host(200), tests::with_host(200));
            for cmd in &cmds {
                let before = a.clone();
                let (ra, ta) = a.apply(cmd);
                let (rb, tb) = b.apply(cmd);
                assert_eq!(
                    (&ra, &ta),
                    (&rb, &tb),
                    "seed {seed}: replicas disagree on {cmd:?}"
                );
                if ra.error.is_some() {
                    assert_eq!(a, before, "seed {seed}: rejected {cmd:?} changed state");
                    assert!(ta.is_empty());
                }
                // Invariants after every step.
                let mut names: Vec<&str> = a.vms.values().map(|v| v.name.as_str()).collect();
                names.sort();
                let total = names.len();
                names.dedup();
                assert_eq!(names.len(), total, "seed {seed}: duplicate VM names");
                for v in a.vms.values() {
                    assert!(
                        a.images.contains_key(&v.spec.image),
                        "seed {seed}: VM without its image"
                    );
                }
                for (node, r) in crate::placement::reserved(&a, None) {
                    let host = &a.nodes[&node];
                    assert!(
                        r.memory_mib <= host.memory_capacity_mib()
                            && r.vcpus <= host.vcpu_capacity(),
                        "seed {seed}: host {node} overfilled: {r:?}"
                    );
                }
                for o in a.operations.values() {
                    assert!(o.progress <= 100);
                }
            }
            assert_eq!(a, b);
            // A snapshot of the state restores to an equal state.
            let json = serde_json::to_vec(&a).expect("ser");
            let back: ClusterState = serde_json::from_slice(&json).expect("de");
            assert_eq!(back, a, "seed {seed}: snapshot round trip");
        }
    }

    #[test]
    fn finished_operations_never_change_again() {
        for seed in 0..100u64 {
            let mut g = Gen::new(seed);
            let ops: Vec<OperationId> = (0..2).map(|_| OperationId::new_random()).collect();
            let vms = [VmId::new_random()];
            let images = [ImageId::new_random()];
            let mut s = tests::with_host(4096);
            let mut finished: BTreeMap<OperationId, Operation> = BTreeMap::new();
            for _ in 0..80 {
                let cmd = command(&mut g, &vms, &images, &ops);
                s.apply(&cmd);
                for (id, op) in &finished {
                    if let Some(now) = s.operations.get(id) {
                        assert_eq!(now, op, "seed {seed}: a finished operation changed");
                    }
                }
                for op in s.operations.values().filter(|o| o.status.is_final()) {
                    finished.entry(op.id).or_insert_with(|| op.clone());
                }
                // A pruned operation may come back only as a new record with the same ID.
                finished.retain(|id, _| s.operations.contains_key(id));
            }
        }
    }
}
