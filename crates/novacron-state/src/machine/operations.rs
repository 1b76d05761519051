//! `apply` for operations: created, updated (finished ones never change again), migration
//! progress.

use novacron_types::{
    ApiError, MigrationProgress, Operation, OperationId, OperationStatus, UnixMillis,
};

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn create_operation(&mut self, op: &Operation) -> Result<Vec<Touched>, ApiError> {
        if self.operations.contains_key(&op.id) {
            return Err(ApiError::conflict(format!(
                "operation ID {} already exists",
                op.id
            )));
        }
        self.operations.insert(op.id, op.clone());
        Ok(vec![Touched::Operation(op.id)])
    }

    pub(super) fn update_operation(
        &mut self,
        id: &OperationId,
        status: &OperationStatus,
        progress: &u8,
        message: &str,
        error: &Option<ApiError>,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
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
        op.message = message.to_string();
        op.error = error.clone();
        op.updated_at = *at;
        Ok(vec![Touched::Operation(*id)])
    }

    pub(super) fn set_migration_progress(
        &mut self,
        id: &OperationId,
        progress: &u8,
        message: &str,
        migration: &MigrationProgress,
        at: &UnixMillis,
    ) -> Result<Vec<Touched>, ApiError> {
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
        op.message = message.to_string();
        op.migration = Some(migration.clone());
        op.updated_at = *at;
        Ok(vec![Touched::Operation(*id)])
    }
}
