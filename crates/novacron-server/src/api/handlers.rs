//! Handlers: parse, call the service, format. No rules live here.

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use novacron_types::error::ErrorBody;
use novacron_types::{
    ApiError, CreatePoolRequest, CreateVmRequest, DiskIoReport, ErrorCode, Image,
    ImportImageRequest, MigrateVmRequest, NodeInfo, Operation, PlacementReport, PlacementRequest,
    Role, StoragePool, TokenView, UpdateVmRequest, UserView, Vm, VmSnapshot,
};
use novacron_types::{
    AttachVolumeRequest, CreateVolumeRequest, MoveVolumeRequest, NodeId, OperationStatus, Page,
    PoolTier, ResizeVolumeRequest, TieringPolicy, TieringReport, VmState, Volume, VolumePage,
    VolumeQuery, VolumeSnapshotRequest,
};

use super::AppState;
use super::error::ApiResult;
use super::extract::{JsonBody, Query};
use crate::auth::Principal;
use crate::cluster::status::{ClusterStatus, LeaderRef};
use crate::service::{JoinReply, JoinRequest, JoinTokenCreated, JoinTokenRequest, VmAction};

/// `limit` and `after`, the page of a list (documents them; parsed by [`Query::page`]).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageParams {
    /// Page size, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// The previous page's `next`.
    after: Option<String>,
}

/// How current a read must be (documents `?consistency=`; parsed by [`Query::stale`]).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Consistency {
    /// Confirmed current with the leader (the default).
    Linearizable,
    /// This host's own copy, possibly behind.
    Stale,
}

/// Console reads return at most this much per request.
const CONSOLE_READ_LIMIT: u64 = 1024 * 1024;
/// `wait?timeout=` is capped so a request cannot hang forever.
const MAX_WAIT_SECONDS: u64 = 3600;

// ---------------------------------------------------------------------------------------------
// System

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub node: u64,
}

#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
/// Liveness: the process answers. Says nothing of whether it can serve yet (`/readyz`).
pub async fn healthz(State(st): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        node: st.service.node_id().0,
    })
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
    pub node: u64,
    /// The last log index this host has applied.
    pub applied_index: u64,
}

#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, body = Ready),
        (status = 503, body = ErrorBody, description = "Not ready: `reason` is the phase \
            (`starting`, `catching_up`, `bootstrapping`, `stopping`) or `isolated`")))]
/// Readiness: 200 once this host has caught up with the log as the leader had it when the host
/// started, recorded the bootstrap (admin user, this host, demo image) and re-adopted its VMs,
/// while it is not isolated from the cluster or stopping.
pub async fn readyz(State(st): State<AppState>) -> Response {
    use crate::readiness::Phase;
    let phase = st.readiness.phase();
    let svc = &st.service;
    let not_ready = |reason: &str, message: String| {
        let error = ApiError::unavailable(message).with_reason(reason);
        (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error })).into_response()
    };
    if phase != Phase::Ready {
        return not_ready(phase.as_str(), format!("not ready: {}", phase.explain()));
    }
    if svc.cluster().is_isolated() {
        return not_ready(
            "isolated",
            "not ready: this host cannot renew its lease with a quorum of the cluster".into(),
        );
    }
    Json(Ready {
        status: "ready".into(),
        node: svc.node_id().0,
        applied_index: svc.state().metrics().applied_index,
    })
    .into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(st): State<AppState>) -> Response {
    let svc = &st.service;
    svc.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        svc.metrics().encode(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, description = "This document")))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
        .into_response()
}

#[derive(Serialize, ToSchema)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub info: NodeInfo,
    /// `online`, `offline`, `isolated`, `joining` or `unknown` (see `GET /api/v1/cluster`).
    pub status: String,
    pub raft: RaftStatus,
}

#[derive(Serialize, ToSchema)]
pub struct RaftStatus {
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: u64,
    pub applied_index: u64,
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    params(PageParams),
    responses((status = 200, body = Page<NodeStatus>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Hosts by ID, a page at a time.
pub async fn list_nodes(State(st): State<AppState>, q: Query) -> ApiResult<Json<Page<NodeStatus>>> {
    q.only(&["limit", "after"])?;
    let svc = &st.service;
    let nodes = svc.list_nodes(&q.page()?).await?;
    let cluster = svc.cluster_status(false).await?;
    let m = svc.state().metrics();
    Ok(Json(nodes.map(|info| {
        let member = cluster.members.iter().find(|c| c.id == info.id);
        NodeStatus {
            status: member
                .map(|c| c.health.clone())
                .unwrap_or_else(|| "unknown".into()),
            raft: RaftStatus {
                role: if cluster.leader.as_ref().is_some_and(|l| l.id == info.id) {
                    "leader"
                } else {
                    match member.map(|c| c.voting) {
                        Some(true) => "follower",
                        Some(false) => "learner",
                        None => "unknown",
                    }
                }
                .into(),
                term: cluster.term,
                leader: cluster.leader.as_ref().map(|l| l.id.0).or(m.leader),
                last_log_index: member.and_then(|c| c.matched_index).unwrap_or(0),
                applied_index: member.and_then(|c| c.applied_index).unwrap_or(0),
            },
            info,
        }
    })))
}

// ---------------------------------------------------------------------------------------------
// Auth, users, tokens

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(min_length = 1, max_length = 63)]
    pub username: String,
    #[schema(max_length = 1024)]
    pub password: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
    pub role: Role,
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Response {
    // Usernames are short; anything longer is not a user and must not become a limiter key.
    if req.username.is_empty() || req.username.len() > 63 {
        return super::HttpError(ApiError::new(
            ErrorCode::Unauthenticated,
            "invalid username or password",
        ))
        .into_response();
    }
    let limited = |message: &str| {
        let e = ApiError::new(ErrorCode::Unavailable, message).with_reason("rate_limited");
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "10")],
            Json(ErrorBody { error: e }),
        )
            .into_response()
    };
    if st.login_ip_limiter.check_key(&peer.ip()).is_err() {
        return limited("too many login attempts from this address; wait a minute");
    }
    if st
        .login_limiter
        .check_key(&(peer.ip(), req.username.clone()))
        .is_err()
    {
        return limited("too many login attempts for this user; wait a minute");
    }
    match st.service.login(&req.username, &req.password).await {
        Ok(s) => Json(LoginResponse {
            token: s.token,
            expires_at: s.expires_at,
            role: s.role,
        })
        .into_response(),
        Err(e) => super::HttpError(e).into_response(),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub username: String,
    #[schema(min_length = 8, max_length = 1024)]
    pub password: String,
    pub role: Role,
}

#[utoipa::path(get, path = "/api/v1/users", tag = "auth", params(PageParams),
    responses((status = 200, body = Page<UserView>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Users by name, a page at a time.
pub async fn list_users(State(st): State<AppState>, q: Query) -> ApiResult<Json<Page<UserView>>> {
    q.only(&["limit", "after"])?;
    Ok(Json(st.service.list_users(&q.page()?).await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "auth", request_body = CreateUserRequest,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let user = st
        .service
        .create_user(&req.username, &req.password, req.role)
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// At most the caller's role; the caller's role when omitted.
    #[serde(default)]
    pub role: Option<Role>,
    /// The token expires after this many days; never when omitted.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<u32>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The secret, shown this once.
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth", params(PageParams),
    responses((status = 200, body = Page<TokenView>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// API tokens by ID (the caller's own; everyone's for an admin), a page at a time.
pub async fn list_tokens(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    q: Query,
) -> ApiResult<Json<Page<TokenView>>> {
    q.only(&["limit", "after"])?;
    Ok(Json(st.service.list_tokens(&who, &q.page()?).await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    JsonBody(req): JsonBody<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    if req.expires_in_days == Some(0) || req.expires_in_days.is_some_and(|d| d > 3650) {
        return Err(ApiError::invalid(
            "expires_in_days",
            "expires_in_days must be between 1 and 3650",
        )
        .into());
    }
    let ttl = req
        .expires_in_days
        .map(|d| Duration::from_secs(u64::from(d) * 86_400));
    let (token, view) = st
        .service
        .create_token(&who, &req.name, req.role, ttl)
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { token, view })))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth",
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_token(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.service.revoke_token(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// VMs

fn accepted(op: Operation) -> Response {
    let location = format!("/api/v1/operations/{}", op.id);
    let mut resp = (StatusCode::ACCEPTED, Json(op)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    params(("consistency" = Option<Consistency>, Query,
        description = "`stale`: this host's copy of the state, without confirming it is current"),
        ("node" = Option<u64>, Query, description = "on this host"),
        ("state" = Option<VmState>, Query, description = "in this observed state"),
        PageParams),
    responses((status = 200, body = Page<Vm>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// VMs by name, filtered, a page at a time.
pub async fn list_vms(State(st): State<AppState>, q: Query) -> ApiResult<Json<Page<Vm>>> {
    q.only(&["consistency", "node", "state", "limit", "after"])?;
    let state = match q.0.get("state") {
        None => None,
        Some(v) => Some(
            VmState::ALL
                .into_iter()
                .find(|s| s.as_str() == v)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "state",
                        format!(
                            "state must be one of {} (got '{v}')",
                            VmState::ALL.map(VmState::as_str).join(", ")
                        ),
                    )
                })?,
        ),
    };
    let filter = crate::service::VmFilter {
        node: q.u64("node", u64::MAX)?.map(NodeId),
        state,
    };
    Ok(Json(
        st.service.list_vms(&filter, &q.page()?, q.stale()?).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = CreateVmRequest,
    responses((status = 201, body = Vm), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_vm(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    JsonBody(mut req): JsonBody<CreateVmRequest>,
) -> Response {
    let svc = &st.service;
    // A host placement chose may have died since its last heartbeat. If it cannot even be
    // connected to, nothing was sent, so nothing was recorded: the next best host is tried
    // (unless the request named the host).
    let named = req.node.is_some();
    let mut unreachable = Vec::new();
    let host = loop {
        let host = match svc.choose_host(&req, &unreachable).await {
            Ok(h) => h,
            Err(e) => return super::HttpError(e).into_response(),
        };
        if host == svc.node_id() {
            break host;
        }
        req.node = Some(host);
        let body = serde_json::to_vec(&req).unwrap_or_default();
        match super::forward::try_to_node(
            svc,
            host,
            axum::http::Method::POST,
            "/api/v1/vms",
            &headers,
            body.into(),
        )
        .await
        {
            Err(super::forward::Failed::Unreachable(e)) if !named && unreachable.len() < 2 => {
                tracing::warn!(
                    "host {host} could not be reached to create VM '{}' ({}); trying the next \
                     best host",
                    req.name,
                    e.message
                );
                unreachable.push(host);
                req.node = None;
            }
            Err(f) => return super::HttpError(f.into_error()).into_response(),
            Ok(r) => return r,
        }
    };
    req.node = Some(host);
    match svc.create_vm(req, &who).await {
        Ok(vm) => (StatusCode::CREATED, Json(vm)).into_response(),
        Err(e) => super::HttpError(e).into_response(),
    }
}

#[utoipa::path(post, path = "/api/v1/placement", tag = "vms", request_body = PlacementRequest,
    responses((status = 200, body = PlacementReport), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// A placement dry run: every host, ranked or rejected with reasons. Nothing is created.
pub async fn place(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<PlacementRequest>,
) -> ApiResult<Json<PlacementReport>> {
    Ok(Json(st.service.place(&req).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}", tag = "vms", params(("vm" = String, Path, description = "ID or name"),
        ("consistency" = Option<Consistency>, Query,
        description = "`stale`: this host's copy of the state, without confirming it is current")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_vm(
    State(st): State<AppState>,
    Path(vm): Path<String>,
    q: Query,
) -> ApiResult<Json<Vm>> {
    if q.stale()? {
        return Ok(Json(st.service.find_vm(&vm)?));
    }
    Ok(Json(st.service.get_vm(&vm).await?))
}

#[utoipa::path(patch, path = "/api/v1/vms/{vm}", tag = "vms", params(("vm" = String, Path, description = "ID or name")),
    request_body = UpdateVmRequest,
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_vm(
    State(st): State<AppState>,
    Path(vm): Path<String>,
    JsonBody(req): JsonBody<UpdateVmRequest>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(st.service.update_vm(&vm, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{vm}", tag = "vms", params(("vm" = String, Path, description = "ID or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_vm(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
) -> ApiResult<StatusCode> {
    st.service.delete_vm(&vm, &who).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/actions/{action}", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"),
           ("action" = String, Path, description = "start | stop | force-stop | reboot | pause | resume")),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_action(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((vm, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let action = VmAction::parse(&action)?;
    Ok(accepted(st.service.vm_action(&vm, action, &who).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/actions/migrate", tag = "vms",
    params(("vm" = String, Path, description = "ID or name")),
    request_body = MigrateVmRequest,
    responses((status = 202, body = Operation, description = "The migration runs; follow the operation"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Pre-flight refused it; `reason` says why")),
    security(("bearer" = [])))]
/// Live-migrates a running VM. Pre-flight checks (target capacity and rules, QEMU version,
/// accelerator, image, concurrency) answer 409 with a `reason` before anything moves.
pub async fn migrate_vm(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    JsonBody(req): JsonBody<MigrateVmRequest>,
) -> ApiResult<Response> {
    Ok(accepted(st.service.migrate_vm(&vm, req, &who).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}/disks/stats", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"),
           ("step" = Option<u64>, Query, maximum = 86400, description = "Seconds per bucket at least (default: the finest kept)")),
    responses((status = 200, body = DiskIoReport), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_disk_stats(
    State(st): State<AppState>,
    Path(vm): Path<String>,
    q: Query,
) -> ApiResult<Json<DiskIoReport>> {
    let step = q.u64("step", 86_400)?;
    Ok(Json(st.service.disk_stats(&vm, step)?))
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}/console", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"),
           ("offset" = Option<u64>, Query, maximum = 9223372036854775807u64, description = "Start at this byte of the log"),
           ("tail" = Option<u64>, Query, maximum = 1048576, description = "Only the last N bytes (at most 1 MiB)")),
    responses((status = 200, description = "The serial log; header X-Console-Next-Offset continues it",
        content_type = "text/plain"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn vm_console(
    State(st): State<AppState>,
    Path(vm): Path<String>,
    q: Query,
) -> ApiResult<Response> {
    let offset = q.u64("offset", u64::MAX >> 1)?;
    let tail = q.u64("tail", CONSOLE_READ_LIMIT)?;
    let chunk = st
        .service
        .console(&vm, offset, tail, CONSOLE_READ_LIMIT)
        .await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-console-offset", HeaderValue::from(chunk.offset));
    headers.insert(
        "x-console-next-offset",
        HeaderValue::from(chunk.next_offset),
    );
    Ok((headers, chunk.data).into_response())
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}/console/ws", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"),
           ("offset" = Option<u64>, Query, maximum = 9223372036854775807u64, description = "Start at this byte (default: the end)")),
    responses((status = 101, description = "WebSocket: binary messages carry console bytes as they are written"),
        (status = 404, body = ErrorBody), (status = 426, body = ErrorBody, description = "Not a WebSocket request")),
    security(("bearer" = [])))]
pub async fn vm_console_ws(
    State(st): State<AppState>,
    Path(vm): Path<String>,
    q: Query,
    permit: Option<Extension<super::conn::ConnPermit>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // The VM first: an unknown VM is a 404 whether or not the request asked for a WebSocket.
    let vm = st.service.get_vm(&vm).await?;
    let offset = q.u64("offset", u64::MAX >> 1)?;
    let Ok(ws) = ws else {
        let e = ApiError::invalid(
            "upgrade",
            "this endpoint is a WebSocket: send 'Connection: upgrade' and 'Upgrade: websocket'",
        );
        return Ok((StatusCode::UPGRADE_REQUIRED, Json(ErrorBody { error: e })).into_response());
    };
    if vm.node != st.service.node_id() {
        // WebSockets are not forwarded: point the client at the VM's host.
        let addr = st
            .service
            .state()
            .read(|s| s.nodes.get(&vm.node.0).map(|n| n.api_address.clone()))
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "VM '{}' runs on host {} ({addr}); open its console stream there",
            vm.name, vm.node
        ))
        .into());
    }
    let path = st.service.console_path(&vm);
    Ok(ws.on_upgrade(move |socket| async move {
        // The connection's place under the caps is held for as long as the stream lives.
        let _permit = permit;
        stream_console(socket, path, offset).await
    }))
}

async fn stream_console(mut socket: WebSocket, path: std::path::PathBuf, offset: Option<u64>) {
    let mut pos = match offset {
        Some(o) => o,
        None => std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let chunk = match crate::service::read_console(&path, Some(pos), None, 64 * 1024).await {
                    Ok(c) => c,
                    Err(_) => break,
                };
                if chunk.data.is_empty() {
                    // The VM's files are gone (deleted, or moved to another host): end the
                    // stream, so the client can look for it elsewhere.
                    if path.parent().is_some_and(|d| !d.exists()) {
                        break;
                    }
                    // The log was rotated or truncated (a restart): start over.
                    if std::fs::metadata(&path).map(|m| m.len() < pos).unwrap_or(false) {
                        pos = 0;
                    }
                    continue;
                }
                pos = chunk.next_offset;
                if socket.send(Message::Binary(chunk.data.into())).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            }
        }
    }
    // A clean end, so the client knows the stream is over rather than broken.
    let _ = socket.send(Message::Close(None)).await;
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
}

#[utoipa::path(get, path = "/api/v1/vms/{vm}/snapshots", tag = "vms",
    params(("vm" = String, Path, description = "ID or name")),
    responses((status = 200, body = Vec<VmSnapshot>), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<Json<Vec<VmSnapshot>>> {
    Ok(Json(st.service.get_vm(&vm).await?.snapshots))
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots", tag = "vms", request_body = CreateSnapshotRequest,
    params(("vm" = String, Path, description = "ID or name")),
    responses((status = 202, body = Operation), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_snapshot(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(vm): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshotRequest>,
) -> ApiResult<Response> {
    Ok(accepted(
        st.service.snapshot_vm(&vm, &req.name, &who).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{vm}/snapshots/{name}/restore", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"), ("name" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn restore_snapshot(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((vm, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(accepted(st.service.restore_vm(&vm, &name, &who).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{vm}/snapshots/{name}", tag = "vms",
    params(("vm" = String, Path, description = "ID or name"), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_snapshot(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((vm, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    st.service.delete_snapshot(&vm, &name, &who).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Images

#[utoipa::path(get, path = "/api/v1/images", tag = "images", params(PageParams),
    responses((status = 200, body = Page<Image>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Images by name, a page at a time.
pub async fn list_images(State(st): State<AppState>, q: Query) -> ApiResult<Json<Page<Image>>> {
    q.only(&["limit", "after"])?;
    Ok(Json(st.service.list_images(&q.page()?).await?))
}

#[utoipa::path(get, path = "/api/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "ID or name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_image(
    State(st): State<AppState>,
    Path(image): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(st.service.get_image(&image).await?))
}

#[utoipa::path(post, path = "/api/v1/images", tag = "images", request_body = ImportImageRequest,
    responses((status = 202, body = Operation), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_image(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    JsonBody(req): JsonBody<ImportImageRequest>,
) -> ApiResult<Response> {
    Ok(accepted(st.service.import_image(req, &who).await?))
}

#[utoipa::path(delete, path = "/api/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "ID or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_image(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(image): Path<String>,
) -> ApiResult<StatusCode> {
    st.service.delete_image(&image, &who).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Storage pools

#[utoipa::path(get, path = "/api/v1/pools", tag = "pools", params(PageParams),
    responses((status = 200, body = Page<StoragePool>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Pools by name, a page at a time.
pub async fn list_pools(
    State(st): State<AppState>,
    q: Query,
) -> ApiResult<Json<Page<StoragePool>>> {
    q.only(&["limit", "after"])?;
    Ok(Json(st.service.list_pools(&q.page()?).await?))
}

#[utoipa::path(get, path = "/api/v1/pools/{pool}", tag = "pools",
    params(("pool" = String, Path, description = "pool name")),
    responses((status = 200, body = StoragePool), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_pool(
    State(st): State<AppState>,
    Path(pool): Path<String>,
) -> ApiResult<Json<StoragePool>> {
    Ok(Json(st.service.get_pool(&pool).await?))
}

#[utoipa::path(post, path = "/api/v1/pools", tag = "pools", request_body = CreatePoolRequest,
    responses((status = 201, body = StoragePool), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_pool(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreatePoolRequest>,
) -> ApiResult<(StatusCode, Json<StoragePool>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.service.create_pool(req).await?),
    ))
}

#[utoipa::path(delete, path = "/api/v1/pools/{pool}", tag = "pools",
    params(("pool" = String, Path, description = "pool name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_pool(
    State(st): State<AppState>,
    Path(pool): Path<String>,
) -> ApiResult<StatusCode> {
    st.service.delete_pool(&pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Volumes

#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes",
    params(("pool" = Option<String>, Query), ("tier" = Option<PoolTier>, Query),
           ("vm" = Option<String>, Query, description = "attached to this VM (ID or name)"),
           ("attached" = Option<bool>, Query), ("node" = Option<u64>, Query),
           ("label" = Option<String>, Query, description = "key=value"),
           PageParams),
    responses((status = 200, body = Page<Volume>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Volumes in ID order, filtered, a page at a time.
pub async fn list_volumes(State(st): State<AppState>, q: Query) -> ApiResult<Json<VolumePage>> {
    const KNOWN: [&str; 8] = [
        "pool", "tier", "vm", "attached", "node", "label", "limit", "after",
    ];
    if let Some(k) = q.0.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            k.clone(),
            format!("unknown filter '{k}' (known: {})", KNOWN.join(", ")),
        )
        .into());
    }
    let tier = match q.0.get("tier").map(String::as_str) {
        None => None,
        Some("hot") => Some(PoolTier::Hot),
        Some("warm") => Some(PoolTier::Warm),
        Some("cold") => Some(PoolTier::Cold),
        Some(t) => {
            return Err(ApiError::invalid(
                "tier",
                format!("tier must be hot, warm or cold (got '{t}')"),
            )
            .into());
        }
    };
    let query = VolumeQuery {
        pool: q.0.get("pool").cloned(),
        tier,
        vm: q.0.get("vm").cloned(),
        attached: q.bool("attached")?,
        node: q.u64("node", u64::MAX)?.map(NodeId),
        label: q.0.get("label").cloned(),
        limit: q.u64("limit", 100_000)?.map(|l| l as usize),
        after: q.0.get("after").cloned(),
    };
    Ok(Json(st.service.list_volumes(query).await?))
}

#[utoipa::path(get, path = "/api/v1/volumes/{volume}", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_volume(
    State(st): State<AppState>,
    Path(volume): Path<String>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(st.service.get_volume(&volume).await?))
}

#[utoipa::path(post, path = "/api/v1/volumes", tag = "volumes", request_body = CreateVolumeRequest,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Creates a volume on the host that will hold it (the VM's host with `attach_to`, else `node`,
/// else the host receiving the request; the request is passed there).
pub async fn create_volume(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1024 * 1024)
        .await
        .map_err(|e| ApiError::invalid("body", e.to_string()))?;
    let create: CreateVolumeRequest = super::extract::decode(&bytes)?;
    novacron_types::validate::create_volume(&create)?;
    let host = st.service.volume_create_host(&create).await?;
    if host != st.service.node_id() {
        let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
        return Ok(super::forward::pass_on(&st.service, host, req).await);
    }
    let v = st.service.create_volume(create, &who).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[utoipa::path(delete, path = "/api/v1/volumes/{volume}", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "attached or moving; `reason` says which")),
    security(("bearer" = [])))]
pub async fn delete_volume(
    State(st): State<AppState>,
    Path(volume): Path<String>,
) -> ApiResult<StatusCode> {
    st.service.delete_volume(&volume).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/actions/attach", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")), request_body = AttachVolumeRequest,
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Attaches a volume to a VM; a running VM gets it hot-plugged. Runs on the VM's host.
pub async fn attach_volume(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(volume): Path<String>,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1024 * 1024)
        .await
        .map_err(|e| ApiError::invalid("body", e.to_string()))?;
    let attach: AttachVolumeRequest = super::extract::decode(&bytes)?;
    let vm = st.service.get_vm(&attach.vm).await?;
    if vm.node != st.service.node_id() {
        let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
        return Ok(super::forward::pass_on(&st.service, vm.node, req).await);
    }
    let v = st.service.attach_volume(&volume, attach, &who).await?;
    Ok(Json(v).into_response())
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/actions/detach", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Detaches a volume; a running VM's guest must release the device (ACPI hot-unplug).
pub async fn detach_volume(
    State(st): State<AppState>,
    Path(volume): Path<String>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(st.service.detach_volume(&volume).await?))
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/actions/resize", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")), request_body = ResizeVolumeRequest,
    responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Grows a volume (live for a running VM's disk).
pub async fn resize_volume(
    State(st): State<AppState>,
    Path(volume): Path<String>,
    JsonBody(req): JsonBody<ResizeVolumeRequest>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(st.service.resize_volume(&volume, req).await?))
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/snapshots", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")), request_body = VolumeSnapshotRequest,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// An internal (qcow2) snapshot of the volume, taken live when its VM runs.
pub async fn snapshot_volume(
    State(st): State<AppState>,
    Path(volume): Path<String>,
    JsonBody(req): JsonBody<VolumeSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.service.snapshot_volume(&volume, req).await?),
    ))
}

#[utoipa::path(delete, path = "/api/v1/volumes/{volume}/snapshots/{name}", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name"), ("name" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Deletes a snapshot (the volume must not be open by a running VM).
pub async fn delete_volume_snapshot(
    State(st): State<AppState>,
    Path((volume, name)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(
        st.service
            .volume_snapshot_action(&volume, &name, false)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/snapshots/{name}/restore", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name"), ("name" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Rolls the volume back to a snapshot (the volume must not be open by a running VM).
pub async fn restore_volume_snapshot(
    State(st): State<AppState>,
    Path((volume, name)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(
        st.service
            .volume_snapshot_action(&volume, &name, true)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/volumes/{volume}/actions/move", tag = "volumes",
    params(("volume" = String, Path, description = "ID or name")), request_body = MoveVolumeRequest,
    responses((status = 202, body = Operation, description = "The move runs; follow the operation"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Moves a volume to another pool: live (`blockdev-mirror`) when its VM runs, else a copy
/// (compressed into a cold pool), within the tiering policy's rate limits.
pub async fn move_volume(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(volume): Path<String>,
    JsonBody(req): JsonBody<MoveVolumeRequest>,
) -> ApiResult<Response> {
    Ok(accepted(
        st.service
            .move_volume(&volume, req, "asked through the API", &who)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/tiering/plan", tag = "volumes",
    responses((status = 200, body = TieringReport), (status = 404, body = ErrorBody, description = "no pass yet")),
    security(("bearer" = [])))]
/// The last tiering pass of the host answering: each volume's forecast, the moves planned
/// with the policy and reason for each, and the models' running accuracy.
pub async fn tiering_plan(State(st): State<AppState>) -> ApiResult<Json<TieringReport>> {
    Ok(Json(st.service.tiering_report()?))
}

#[utoipa::path(get, path = "/api/v1/tiering/policy", tag = "volumes",
    responses((status = 200, body = TieringPolicy)), security(("bearer" = [])))]
pub async fn get_tiering_policy(State(st): State<AppState>) -> ApiResult<Json<TieringPolicy>> {
    Ok(Json(st.service.get_tiering_policy().await?))
}

#[utoipa::path(put, path = "/api/v1/tiering/policy", tag = "volumes", request_body = TieringPolicy,
    responses((status = 200, body = TieringPolicy), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Replaces the tiering policy (validated; every field is required).
pub async fn set_tiering_policy(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<TieringPolicy>,
) -> ApiResult<Json<TieringPolicy>> {
    Ok(Json(st.service.set_tiering_policy(req).await?))
}

// ---------------------------------------------------------------------------------------------
// Operations

#[utoipa::path(get, path = "/api/v1/operations", tag = "operations",
    params(("status" = Option<OperationStatus>, Query),
        ("kind" = Option<String>, Query, description = "a kind (`vm.start`) or a prefix ending in a dot (`vm.`)"),
        ("target" = Option<String>, Query, description = "a resource path (`/api/v1/vms/{id}`) or a VM's name or ID"),
        ("since" = Option<i64>, Query, minimum = 0, description = "created at or after (Unix milliseconds)"),
        ("until" = Option<i64>, Query, minimum = 0, description = "created before (Unix milliseconds)"),
        PageParams),
    responses((status = 200, body = Page<Operation>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
/// Operations, newest first, filtered, a page at a time. Finished ones are kept for
/// `--operations-retention-days` and at most `--operations-max` of them.
pub async fn list_operations(
    State(st): State<AppState>,
    q: Query,
) -> ApiResult<Json<Page<Operation>>> {
    q.only(&[
        "status", "kind", "target", "since", "until", "limit", "after",
    ])?;
    let status = match q.0.get("status").map(String::as_str) {
        None => None,
        Some("running") => Some(OperationStatus::Running),
        Some("success") => Some(OperationStatus::Success),
        Some("failure") => Some(OperationStatus::Failure),
        Some("cancelled") => Some(OperationStatus::Cancelled),
        Some(v) => {
            return Err(ApiError::invalid(
                "status",
                format!("status must be running, success, failure or cancelled (got '{v}')"),
            )
            .into());
        }
    };
    let millis = |name: &str| q.u64(name, i64::MAX as u64).map(|v| v.map(|t| t as i64));
    let filter = crate::service::OperationFilter {
        status,
        kind: q.0.get("kind").cloned(),
        target: q.0.get("target").cloned(),
        since: millis("since")?,
        until: millis("until")?,
    };
    Ok(Json(st.service.list_operations(&filter, &q.page()?).await?))
}

#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "operations",
    responses((status = 200, body = Operation), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_operation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    Ok(Json(st.service.get_operation(&id).await?))
}

#[utoipa::path(delete, path = "/api/v1/operations/{id}", tag = "operations",
    responses((status = 202, body = Operation, description = "Cancelling; follow the operation"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Cancels a running operation that can be cancelled (a live migration before post-copy).
pub async fn cancel_operation(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let svc = &st.service;
    let op = match svc.get_operation(&id).await {
        Ok(op) => op,
        Err(e) => return super::HttpError(e).into_response(),
    };
    if op.node != svc.node_id() {
        return super::forward::to_node(
            svc,
            op.node,
            axum::http::Method::DELETE,
            &format!("/api/v1/operations/{id}"),
            &headers,
            bytes::Bytes::new(),
        )
        .await;
    }
    match svc.cancel_operation(&id).await {
        Ok(op) => accepted(op),
        Err(e) => super::HttpError(e).into_response(),
    }
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/evacuate", tag = "nodes",
    params(("id" = u64, Path, minimum = 1, description = "Host ID")),
    responses((status = 202, body = Operation, description = "Evacuating; follow the operation"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Puts the host in maintenance and moves its VMs away (running ones live, stopped ones cold).
pub async fn evacuate_node(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let svc = &st.service;
    if !svc.state().read(|s| s.nodes.contains_key(&id)) {
        return super::HttpError(ApiError::not_found("host", id)).into_response();
    }
    if id != svc.node_id().0 {
        return super::forward::to_node(
            svc,
            novacron_types::NodeId(id),
            axum::http::Method::POST,
            &format!("/api/v1/nodes/{id}/evacuate"),
            &headers,
            bytes::Bytes::new(),
        )
        .await;
    }
    match svc.evacuate(&who).await {
        Ok(op) => accepted(op),
        Err(e) => super::HttpError(e).into_response(),
    }
}

#[utoipa::path(post, path = "/api/v1/nodes/{id}/restore", tag = "nodes",
    params(("id" = u64, Path, minimum = 1, description = "Host ID")),
    responses((status = 200, body = NodeInfo), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Ends maintenance: VMs may be placed on the host again.
pub async fn restore_node(
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> ApiResult<Json<NodeInfo>> {
    st.service.restore(novacron_types::NodeId(id)).await?;
    let node = st
        .service
        .state()
        .read(|s| s.nodes.get(&id).cloned())
        .ok_or_else(|| ApiError::not_found("host", id))?;
    Ok(Json(node))
}

#[utoipa::path(get, path = "/api/v1/operations/{id}/wait", tag = "operations",
    params(("timeout" = Option<u64>, Query, maximum = 3600, description = "Seconds to wait (default 60, at most 3600)")),
    responses((status = 200, body = Operation, description = "Finished, or still running at the timeout"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn wait_operation(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> ApiResult<Json<Operation>> {
    let timeout = q.u64("timeout", MAX_WAIT_SECONDS)?.unwrap_or(60);
    Ok(Json(
        st.service
            .wait_operation(&id, Duration::from_secs(timeout))
            .await?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Cluster

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    params(("consistency" = Option<Consistency>, Query,
        description = "`stale`: this host's own view, without asking the leader")),
    responses((status = 200, body = ClusterStatus)), security(("bearer" = [])))]
pub async fn cluster_status(
    State(st): State<AppState>,
    q: Query,
) -> ApiResult<Json<ClusterStatus>> {
    let stale = q.stale()?;
    Ok(Json(st.service.cluster_status(stale).await?))
}

#[utoipa::path(post, path = "/api/v1/cluster/tokens", tag = "cluster",
    request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenCreated), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_join_token(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    JsonBody(req): JsonBody<JoinTokenRequest>,
) -> ApiResult<(StatusCode, Json<JoinTokenCreated>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.service.create_join_token(req, &who).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/cluster/join", tag = "cluster", request_body = JoinRequest,
    responses((status = 200, body = JoinReply), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
pub async fn join_cluster(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(req): JsonBody<JoinRequest>,
) -> Response {
    // The token is the credential: rate-limit guesses like logins.
    if st
        .login_limiter
        .check_key(&(peer.ip(), "\0join".to_string()))
        .is_err()
    {
        let e = ApiError::new(
            ErrorCode::Unavailable,
            "too many join attempts from this address; wait a minute",
        );
        return (StatusCode::TOO_MANY_REQUESTS, Json(ErrorBody { error: e })).into_response();
    }
    match st.service.join(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => super::HttpError(e).into_response(),
    }
}

#[utoipa::path(delete, path = "/api/v1/cluster/members/{id}", tag = "cluster",
    params(("id" = u64, Path, minimum = 1, description = "Host ID"),
        ("force" = Option<bool>, Query, description = "Remove a host that is down")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> ApiResult<StatusCode> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid("id", format!("'{id}' is not a host ID")))?;
    let force = q.bool("force")?.unwrap_or(false);
    st.service.remove_node(id, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct TransferLeaderRequest {
    /// The voter to hand leadership to (default: the healthiest other voter).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub to: Option<u64>,
}

#[utoipa::path(post, path = "/api/v1/cluster/leader", tag = "cluster",
    request_body = TransferLeaderRequest,
    responses((status = 200, body = LeaderRef), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn transfer_leader(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<TransferLeaderRequest>,
) -> ApiResult<Json<LeaderRef>> {
    Ok(Json(st.service.transfer_leader(req.to).await?))
}
