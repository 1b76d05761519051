//! Long-running operations: persisted in the replicated state when they start, updated as they
//! progress, and finished with success or failure. A restart marks this host's unfinished
//! operations as failed (the work they tracked was interrupted).

use std::future::Future;
use std::time::Duration;

use novacron_state::{CommandV1, StateEvent, Touched};
use novacron_types::{ApiError, ErrorCode, Operation, OperationId, OperationStatus, now_millis};

use super::Service;
use crate::auth::Principal;
use crate::metrics::KindLabels;

/// Handed to an operation's work so it can report progress.
#[derive(Clone)]
pub struct OpCtx {
    service: Service,
    pub id: OperationId,
}

impl OpCtx {
    /// Records progress (0-100) and the current step. Failures to record are logged, not fatal.
    pub async fn progress(&self, percent: u8, message: impl Into<String>) {
        let cmd = CommandV1::UpdateOperation {
            id: self.id,
            status: OperationStatus::Running,
            progress: percent,
            message: message.into(),
            error: None,
            at: now_millis(),
        };
        if let Err(e) = self.service.inner.state.propose(cmd).await {
            tracing::warn!(op = %self.id, "recording progress: {e}");
        }
    }
}

impl Service {
    /// Records a new operation and runs `work` in the background; returns the operation as
    /// created (status `running`). `first` are commands replicated in the same batch as the
    /// operation record (for example the new desired state); if one is rejected, the operation is
    /// recorded as failed and `work` does not run.
    pub async fn spawn_operation<F, Fut>(
        &self,
        kind: &str,
        resources: Vec<String>,
        who: &Principal,
        first: Vec<CommandV1>,
        work: F,
    ) -> Result<Operation, ApiError>
    where
        F: FnOnce(OpCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), ApiError>> + Send + 'static,
    {
        let now = now_millis();
        let op = Operation {
            id: OperationId::new_random(),
            kind: kind.to_string(),
            status: OperationStatus::Running,
            progress: 0,
            message: String::new(),
            error: None,
            resources,
            node: self.inner.node,
            requestor: who.username.clone(),
            created_at: now,
            updated_at: now,
            migration: None,
        };
        // The records and the work start in one task, so a client that disconnects while the
        // records are being replicated cannot leave an operation that never runs.
        let service = self.clone();
        let created = op.clone();
        tokio::spawn(async move { service.start_operation(created, first, work).await })
            .await
            .map_err(|e| ApiError::internal(format!("starting the operation: {e}")))??;
        Ok(op)
    }

    async fn start_operation<F, Fut>(
        &self,
        op: Operation,
        first: Vec<CommandV1>,
        work: F,
    ) -> Result<(), ApiError>
    where
        F: FnOnce(OpCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), ApiError>> + Send + 'static,
    {
        let kind = op.kind.clone();
        let mut batch = first;
        batch.push(CommandV1::CreateOperation { op: op.clone() });
        let mut results = self.inner.state.propose_many(batch).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(ApiError::internal("no result for the operation")))?;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            let fail = CommandV1::UpdateOperation {
                id: op.id,
                status: OperationStatus::Failure,
                progress: 100,
                message: e.message.clone(),
                error: Some(e.clone()),
                at: now_millis(),
            };
            let _ = self.inner.state.propose(fail).await;
            return Err(e);
        }
        let ctx = OpCtx {
            service: self.clone(),
            id: op.id,
        };
        let service = self.clone();
        tokio::spawn(async move {
            let result = work(ctx).await;
            let (status, error, message) = match result {
                Ok(()) => (OperationStatus::Success, None, "done".to_string()),
                Err(e) => (OperationStatus::Failure, Some(e.clone()), e.message.clone()),
            };
            if let Some(e) = &error {
                tracing::warn!(op = %op.id, kind, "operation failed: {}", e.message);
            }
            service
                .inner
                .metrics
                .operations
                .get_or_create(&KindLabels {
                    kind: kind.clone(),
                    status: format!("{status:?}").to_lowercase(),
                })
                .inc();
            let finish = CommandV1::UpdateOperation {
                id: op.id,
                status,
                progress: 100,
                message,
                error,
                at: now_millis(),
            };
            if let Err(e) = service.inner.state.propose(finish).await {
                tracing::error!(op = %op.id, "recording the end of the operation: {e}");
            }
        });
        Ok(())
    }

    pub async fn get_operation(&self, id: &str) -> Result<Operation, ApiError> {
        let id: OperationId = id
            .parse()
            .map_err(|_| ApiError::not_found("operation", id))?;
        self.inner
            .state
            .read_linearizable(|s| s.operations.get(&id).cloned())
            .await?
            .ok_or_else(|| ApiError::not_found("operation", id))
    }

    pub async fn list_operations(&self) -> Result<Vec<Operation>, ApiError> {
        let mut ops = self
            .inner
            .state
            .read_linearizable(|s| s.operations.values().cloned().collect::<Vec<_>>())
            .await?;
        ops.sort_by_key(|o| std::cmp::Reverse(o.created_at));
        Ok(ops)
    }

    /// Waits until the operation is finished or `timeout` passes, then returns it as it is.
    pub async fn wait_operation(&self, id: &str, timeout: Duration) -> Result<Operation, ApiError> {
        let op = self.get_operation(id).await?;
        let id = op.id;
        let mut events = self.inner.state.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.inner.state.read(|s| s.operations.get(&id).cloned());
            match current {
                Some(op) if op.status.is_final() => return Ok(op),
                Some(op) => {
                    let wait = tokio::time::timeout_at(deadline, events.recv()).await;
                    match wait {
                        Err(_) => return Ok(op),
                        Ok(Ok(StateEvent::Applied { touched, .. }))
                            if !touched.contains(&Touched::Operation(id)) => {}
                        // Touched, lagged, or a snapshot: re-read.
                        Ok(_) => {}
                    }
                }
                None => return Err(ApiError::not_found("operation", id)),
            }
        }
    }

    /// Drops finished operations last updated more than `age` ago.
    pub async fn prune_operations(&self, age: Duration) {
        let before = now_millis() - age.as_millis() as i64;
        let any = self.inner.state.read(|s| {
            s.operations
                .values()
                .any(|o| o.status.is_final() && o.updated_at < before)
        });
        if any
            && let Err(e) = self
                .inner
                .state
                .propose(CommandV1::PruneOperations { before })
                .await
        {
            tracing::warn!("pruning operations: {e}");
        }
    }

    /// After a restart: operations this host was running were interrupted.
    pub async fn fail_interrupted_operations(&self) {
        let node = self.inner.node;
        let stale: Vec<OperationId> = self.inner.state.read(|s| {
            s.operations
                .values()
                .filter(|o| o.node == node && o.status == OperationStatus::Running)
                .map(|o| o.id)
                .collect()
        });
        for id in stale {
            let cmd = CommandV1::UpdateOperation {
                id,
                status: OperationStatus::Failure,
                progress: 100,
                message: "interrupted by a restart of novacron".into(),
                error: Some(ApiError::new(
                    ErrorCode::Unavailable,
                    "interrupted by a restart of novacron; check the resource and retry",
                )),
                at: now_millis(),
            };
            if let Err(e) = self.inner.state.propose(cmd).await {
                tracing::warn!(op = %id, "marking interrupted operation: {e}");
            }
        }
    }
}
