//! `apply` for storage pools and the tiering policy.

use novacron_types::{ApiError, StoragePool, TieringPolicy};

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn create_pool(&mut self, pool: &StoragePool) -> Result<Vec<Touched>, ApiError> {
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

    pub(super) fn delete_pool(&mut self, name: &String) -> Result<Vec<Touched>, ApiError> {
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

    pub(super) fn set_tiering_policy(
        &mut self,
        policy: &TieringPolicy,
    ) -> Result<Vec<Touched>, ApiError> {
        novacron_types::validate::tiering_policy(policy)?;
        self.meta.tiering = Some(policy.clone());
        Ok(vec![Touched::Meta])
    }
}
