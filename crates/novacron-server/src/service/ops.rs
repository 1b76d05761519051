//! Long-running operations: persisted in the replicated state when they start, updated as they
//! progress, and finished with success or failure. A restart marks this host's unfinished
//! operations as failed (the work they tracked was interrupted).

use std::future::Future;
use std::time::Duration;

use novacron_state::{CommandV1, StateEvent, Touched};
use novacron_types::{
    ApiError, ErrorCode, Operation, OperationId, OperationStatus, Page, PageRequest, UnixMillis,
    VmId, now_millis,
};

use super::Service;

/// Filters of `GET /api/v1/operations`.
#[derive(Clone, Debug, Default)]
pub struct OperationFilter {
    pub status: Option<OperationStatus>,
    /// The kind (`vm.start`), or a prefix ending in a dot (`vm.`).
    pub kind: Option<String>,
    /// A resource path (`/api/v1/vms/{id}`), or a VM's name or ID.
    pub target: Option<String>,
    /// Created at or after (Unix milliseconds).
    pub since: Option<UnixMillis>,
    /// Created before (Unix milliseconds).
    pub until: Option<UnixMillis>,
}

impl OperationFilter {
    fn matches(&self, o: &Operation, target_vm: Option<VmId>) -> bool {
        let kind = self
            .kind
            .as_ref()
            .is_none_or(|k| match k.strip_suffix('.') {
                Some(prefix) => {
                    o.kind.starts_with(prefix) && o.kind[prefix.len()..].starts_with('.')
                }
                None => o.kind == *k,
            });
        let target = self.target.as_ref().is_none_or(|t| {
            o.resources
                .iter()
                .any(|r| r == t || target_vm.is_some_and(|id| *r == super::vms::vm_path(id)))
        });
        self.status.is_none_or(|st| o.status == st)
            && kind
            && target
            && self.since.is_none_or(|t| o.created_at >= t)
            && self.until.is_none_or(|t| o.created_at < t)
    }
}

/// Where a page of operations ends: newest first, so the key sorts later for older ones
/// (`<created_at>.<id>`, compared by creation time descending, then ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpCursor {
    created_at: UnixMillis,
    id: OperationId,
}

impl OpCursor {
    fn of(o: &Operation) -> Self {
        Self {
            created_at: o.created_at,
            id: o.id,
        }
    }
}

impl Ord for OpCursor {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .created_at
            .cmp(&self.created_at)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for OpCursor {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for OpCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at, self.id)
    }
}

impl std::str::FromStr for OpCursor {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (at, id) = s.split_once('.').ok_or(())?;
        Ok(Self {
            created_at: at.parse().map_err(|_| ())?,
            id: id.parse().map_err(|_| ())?,
        })
    }
}
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
            service.prune_if_over_count().await;
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

    /// Operations, newest first, filtered, a page at a time.
    pub async fn list_operations(
        &self,
        filter: &OperationFilter,
        page: &PageRequest,
    ) -> Result<Page<Operation>, ApiError> {
        // A VM named as a target also matches operations recorded with its ID.
        let target_vm = match &filter.target {
            Some(t) if !t.starts_with('/') => self.find_vm(t).ok().map(|vm| vm.id),
            _ => None,
        };
        self.inner
            .state
            .read_linearizable(|s| {
                let mut ops: Vec<&Operation> = s
                    .operations
                    .values()
                    .filter(|o| filter.matches(o, target_vm))
                    .collect();
                ops.sort_by_key(|o| OpCursor::of(o));
                page.page(ops, |o| OpCursor::of(o))
                    .map(|p| p.map(|o| o.clone()))
            })
            .await?
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
    /// Drops finished operations past the retention age, and the oldest beyond the retained
    /// count (`--operations-retention-days`, `--operations-max`).
    pub async fn prune_operations(&self) {
        let settings = &self.inner.settings;
        let before = now_millis() - settings.operations_retention.as_millis() as i64;
        let keep_at_most = settings.operations_max;
        let due = self.inner.state.read(|s| {
            let finished = s.operations.values().filter(|o| o.status.is_final());
            let (mut count, mut old) = (0u64, false);
            for o in finished {
                count += 1;
                old |= o.updated_at < before;
            }
            old || count > keep_at_most
        });
        if due
            && let Err(e) = self
                .inner
                .state
                .propose(CommandV1::PruneOperationsKeeping {
                    before,
                    keep_at_most,
                })
                .await
        {
            tracing::warn!("pruning operations: {e}");
        }
    }

    /// Prunes at once when finished operations exceed the retained count by a tenth (so a
    /// burst of operations cannot grow the state until the next periodic pass; the slack keeps
    /// it from pruning after every single one).
    async fn prune_if_over_count(&self) {
        let max = self.inner.settings.operations_max;
        let finished = self.inner.state.read(|s| {
            s.operations
                .values()
                .filter(|o| o.status.is_final())
                .count() as u64
        });
        if finished > max + max / 10 {
            self.prune_operations().await;
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
