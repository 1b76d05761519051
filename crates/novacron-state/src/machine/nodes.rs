//! `apply` for the cluster and its hosts: bootstrap, host records, join tokens, joins,
//! removals, maintenance.

use novacron_types::{ApiError, JoinToken, NodeId, NodeInfo, UnixMillis, VmId, VmState};

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn init_cluster(
        &mut self,
        jwt_secret: &str,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
        if !self.meta.jwt_secret.is_empty() {
            return Err(ApiError::conflict("cluster is already initialized"));
        }
        self.meta.jwt_secret = jwt_secret.to_string();
        self.meta.initialized_at = *at;
        Ok(vec![Touched::Meta])
    }

    pub(super) fn register_node(&mut self, node: &NodeInfo) -> Result<Vec<Touched>, ApiError> {
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

    pub(super) fn create_join_token(
        &mut self,
        token: &JoinToken,
    ) -> Result<Vec<Touched>, ApiError> {
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

    pub(super) fn join_node(
        &mut self,
        token_id: &String,
        secret_sha256: &String,
        node: &NodeInfo,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
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

    pub(super) fn remove_node(
        &mut self,
        id: &NodeId,
        force: &bool,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
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
                vm.state_reason = Some(format!("its host {id} was removed from the cluster"));
                vm.updated_at = *at;
                touched.push(Touched::Vm(vm_id));
            }
        }
        self.nodes.remove(&id.0);
        self.meta.removed_nodes.insert(id.0);
        Ok(touched)
    }

    pub(super) fn set_node_maintenance(
        &mut self,
        node: &NodeId,
        maintenance: &bool,
    ) -> Result<Vec<Touched>, ApiError> {
        let n = self
            .nodes
            .get_mut(&node.0)
            .ok_or_else(|| ApiError::not_found("host", node))?;
        n.maintenance = *maintenance;
        Ok(vec![Touched::Node(node.0)])
    }
}
