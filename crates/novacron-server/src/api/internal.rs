//! `/internal/v1`: host-to-host endpoints (Raft messages, forwarded writes, read index,
//! heartbeats, pings). Every request must carry the cluster secret; users' tokens do not work
//! here and the cluster secret works nowhere else.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt as _;

use novacron_state::network::{ForwardedWrite, ForwardedWriteReply, RaftReply, RaftRequest};
use novacron_types::{ApiError, ErrorCode, VmId};

use super::AppState;
use super::error::{ApiResult, HttpError};
use crate::cluster::status::ClusterStatus;
use crate::cluster::transport::{SECRET_HEADER, SNAPSHOT_HEADER, SnapshotHeader};
use crate::cluster::{Heartbeat, LeaseGrant};
use crate::service::{ColdCopied, ColdRequest, IncomingRequest};

/// Largest snapshot a host accepts (the whole replicated state, as JSON).
const MAX_SNAPSHOT: usize = 1 << 30;

async fn cluster_secret(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(SECRET_HEADER)
        .is_some_and(|v| s.service.cluster().secret_matches(v.as_bytes()));
    if !ok {
        return HttpError(ApiError::new(
            ErrorCode::Unauthenticated,
            "host-to-host endpoint: the cluster secret is missing or wrong",
        ))
        .into_response();
    }
    next.run(req).await
}

async fn raft(State(s): State<AppState>, Json(req): Json<RaftRequest>) -> Json<RaftReply> {
    Json(s.service.state().handle_raft(req).await)
}

async fn snapshot(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<openraft::raft::SnapshotResponse<novacron_state::TypeConfig>>> {
    let bad = |m: String| HttpError(ApiError::invalid(SNAPSHOT_HEADER, m));
    let header = headers
        .get(SNAPSHOT_HEADER)
        .ok_or_else(|| bad("missing snapshot header".into()))?;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let SnapshotHeader { vote, meta } =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    // Read the stream chunk by chunk (it may be large), bounded.
    let mut data = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("reading the snapshot: {e}")))?;
        if data.len() + chunk.len() > MAX_SNAPSHOT {
            return Err(HttpError(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "snapshot larger than 1 GiB",
            )));
        }
        data.extend_from_slice(&chunk);
    }
    let resp = s
        .service
        .state()
        .handle_snapshot(vote, meta, data)
        .await
        .map_err(|e| HttpError(ApiError::unavailable(e)))?;
    Ok(Json(resp))
}

async fn write(
    State(s): State<AppState>,
    Json(req): Json<ForwardedWrite>,
) -> ApiResult<Json<ForwardedWriteReply>> {
    Ok(Json(s.service.state().serve_forwarded_write(req).await?))
}

async fn read_index(State(s): State<AppState>) -> ApiResult<Json<u64>> {
    Ok(Json(s.service.state().serve_read_index().await?))
}

async fn heartbeat(
    State(s): State<AppState>,
    Json(beat): Json<Heartbeat>,
) -> ApiResult<Json<LeaseGrant>> {
    Ok(Json(s.service.cluster().receive_heartbeat(beat).await?))
}

async fn ping(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "node": s.service.node_id() }))
}

async fn status(State(s): State<AppState>) -> Json<ClusterStatus> {
    Json(s.service.cluster().status())
}

#[derive(serde::Deserialize)]
struct TransferTo {
    to: u64,
}

async fn transfer_leader(
    State(s): State<AppState>,
    Json(t): Json<TransferTo>,
) -> ApiResult<Json<serde_json::Value>> {
    s.service.state().transfer_leader(t.to).await?;
    Ok(Json(serde_json::json!({ "to": t.to })))
}

async fn migration_incoming(
    State(s): State<AppState>,
    Json(req): Json<IncomingRequest>,
) -> ApiResult<Json<novacron_hypervisor::IncomingPlan>> {
    Ok(Json(s.service.incoming_prepare(req).await?))
}

async fn migration_finish(
    State(s): State<AppState>,
    Path(vm): Path<VmId>,
) -> ApiResult<Json<serde_json::Value>> {
    s.service.incoming_finish(vm).await?;
    Ok(Json(serde_json::json!({})))
}

async fn migration_abort(
    State(s): State<AppState>,
    Path(vm): Path<VmId>,
) -> ApiResult<Json<serde_json::Value>> {
    s.service.incoming_abort(vm).await?;
    Ok(Json(serde_json::json!({})))
}

async fn migration_cold(
    State(s): State<AppState>,
    Json(req): Json<ColdRequest>,
) -> ApiResult<Json<ColdCopied>> {
    Ok(Json(s.service.cold_receive(req).await?))
}

/// A stopped VM's disk file, streamed (the target of a cold migration pulls it).
async fn vm_disk(
    State(s): State<AppState>,
    Path((vm, n)): Path<(VmId, usize)>,
) -> ApiResult<Response> {
    let file = s.service.serve_disk(vm, n).await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    Ok(body.into_response())
}

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/internal/v1/raft", post(raft))
        .route(
            "/internal/v1/raft/snapshot",
            post(snapshot).layer(DefaultBodyLimit::disable()),
        )
        .route("/internal/v1/write", post(write))
        .route("/internal/v1/read-index", get(read_index))
        .route("/internal/v1/heartbeat", post(heartbeat))
        .route("/internal/v1/ping", get(ping))
        .route("/internal/v1/cluster", get(status))
        .route("/internal/v1/transfer-leader", post(transfer_leader))
        .route("/internal/v1/migrations/incoming", post(migration_incoming))
        .route("/internal/v1/migrations/cold", post(migration_cold))
        .route("/internal/v1/vms/{vm}/disks/{n}", get(vm_disk))
        .route(
            "/internal/v1/migrations/{vm}/finish",
            post(migration_finish),
        )
        .route("/internal/v1/migrations/{vm}/abort", post(migration_abort))
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            cluster_secret,
        ))
}
