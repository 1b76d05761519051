//! The REST API under `/api/v1`: thin handlers that parse, call the [`Service`], and format.
//!
//! Roles are attached to each route where it is declared ([`viewer`], [`operator`], [`admin`]),
//! so no route can forget its check. Only `/healthz`, `/readyz`, `/api/v1/auth/login` and
//! `/api/v1/cluster/join` (the join token is its credential) are open; `/internal/v1` takes the
//! cluster secret only.

pub mod conn;
mod error;
mod extract;
mod forward;
mod handlers;
mod internal;
pub mod openapi;

pub use error::{HttpError, status_of};

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use novacron_types::{ApiError, ErrorCode, Role};

use crate::auth::{Principal, unauthenticated};
use crate::metrics::{RequestLabels, RouteLabels};
use crate::service::Service;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    /// Login attempts per client address and username, so a password cannot be guessed at line
    /// rate, and nobody elsewhere can lock a user out.
    pub login_limiter: Arc<DefaultKeyedRateLimiter<(std::net::IpAddr, String)>>,
    /// Login attempts per client address over all usernames, so one client spraying names
    /// cannot take every password check for itself.
    pub login_ip_limiter: Arc<DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// What `/readyz` answers.
    pub readiness: crate::readiness::Readiness,
}

impl AppState {
    pub fn new(service: Service, readiness: crate::readiness::Readiness) -> Self {
        let quota =
            Quota::per_minute(std::num::NonZeroU32::new(30).unwrap_or(std::num::NonZeroU32::MIN));
        let login_limiter = Arc::new(RateLimiter::keyed(quota));
        // 60 a minute with bursts of 10 per address: plenty for people and scripts behind one
        // address, far below what a hashing flood needs.
        let per_ip = Quota::per_minute(NonZeroU32::new(60).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN));
        let login_ip_limiter = Arc::new(RateLimiter::keyed(per_ip));
        // Forget idle keys every minute so the maps stay small.
        let (weak, weak_ip) = (
            Arc::downgrade(&login_limiter),
            Arc::downgrade(&login_ip_limiter),
        );
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                match (weak.upgrade(), weak_ip.upgrade()) {
                    (Some(l), Some(i)) => {
                        l.retain_recent();
                        i.retain_recent();
                    }
                    _ => break,
                }
            }
        });
        Self {
            service,
            login_limiter,
            login_ip_limiter,
            readiness,
        }
    }
}

fn authenticate(state: &AppState, req: &Request) -> Result<Principal, ApiError> {
    let header = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        unauthenticated("this endpoint needs 'Authorization: Bearer <token>'; log in first")
    })?;
    let value = header
        .to_str()
        .map_err(|_| unauthenticated("the Authorization header is not valid"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| unauthenticated("the Authorization header must be 'Bearer <token>'"))?;
    state.service.authenticate(token.trim())
}

async fn require(role: Role, state: AppState, mut req: Request, next: Next) -> Response {
    let principal = match authenticate(&state, &req) {
        Ok(p) => p,
        Err(e) => return HttpError(e).into_response(),
    };
    if let Err(e) = principal.require(role) {
        return HttpError(e).into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

fn with_role(
    role: Role,
    state: &AppState,
    route: MethodRouter<AppState>,
) -> MethodRouter<AppState> {
    route.route_layer(middleware::from_fn_with_state(
        state.clone(),
        move |State(s): State<AppState>, r: Request, n: Next| require(role, s, r, n),
    ))
}

pub fn viewer(state: &AppState, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    with_role(Role::Viewer, state, route)
}
pub fn operator(state: &AppState, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    with_role(Role::Operator, state, route)
}
pub fn admin(state: &AppState, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    with_role(Role::Admin, state, route)
}

/// Runs the route on the host that owns the VM in its path (after authentication, which the
/// role layer wrapped around it does first).
fn on_owner(state: &AppState, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.route_layer(middleware::from_fn_with_state(
        state.clone(),
        forward::to_vm_owner,
    ))
}

/// Runs the route on the host that must do the file work of the volume in its path.
fn on_volume_owner(state: &AppState, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.route_layer(middleware::from_fn_with_state(
        state.clone(),
        forward::to_volume_owner,
    ))
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    let m = state.service.metrics();
    m.http_requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.http_duration
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Rejections produced by axum itself (a path that is not valid UTF-8, a WebSocket route hit
/// without an upgrade, ...) come as plain text; clients get the one JSON error shape instead.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        408 | 504 => ErrorCode::Timeout,
        409 => ErrorCode::Conflict,
        413 => ErrorCode::PayloadTooLarge,
        429 | 503 => ErrorCode::Unavailable,
        s if s >= 500 => ErrorCode::Internal,
        _ => ErrorCode::InvalidArgument,
    };
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let error = ApiError::new(code, message);
    let mut out = (status, axum::Json(novacron_types::ErrorBody { error })).into_response();
    // Keep what the original said besides its body (Allow, WWW-Authenticate, Retry-After, ...).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

async fn not_found() -> HttpError {
    HttpError(ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see /api/v1/openapi.json",
    ))
}

async fn method_not_allowed() -> Response {
    let error = ApiError::new(
        ErrorCode::InvalidArgument,
        "this method is not allowed on this endpoint",
    );
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(novacron_types::error::ErrorBody { error }),
    )
        .into_response()
}

/// The largest body the unauthenticated routes (login, join) read.
const OPEN_BODY_LIMIT: usize = 8 * 1024;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    use handlers::*;
    let s = &state;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", viewer(s, get(metrics)))
        .route("/api/v1/openapi.json", viewer(s, get(openapi_json)))
        // Open routes take small bodies only: each byte of a bogus request costs the host.
        .route(
            "/api/v1/auth/login",
            post(login).layer(DefaultBodyLimit::max(OPEN_BODY_LIMIT)),
        )
        .route(
            "/api/v1/users",
            admin(s, get(list_users)).merge(admin(s, post(create_user))),
        )
        .route(
            "/api/v1/tokens",
            viewer(s, get(list_tokens)).merge(operator(s, post(create_token))),
        )
        .route("/api/v1/tokens/{id}", operator(s, delete(revoke_token)))
        .route(
            "/api/v1/vms",
            viewer(s, get(list_vms)).merge(operator(s, post(create_vm))),
        )
        .route(
            "/api/v1/vms/{vm}",
            viewer(s, get(get_vm))
                .merge(operator(s, patch(update_vm)))
                .merge(operator(s, on_owner(s, delete(delete_vm)))),
        )
        .route(
            "/api/v1/vms/{vm}/actions/migrate",
            operator(s, on_owner(s, post(migrate_vm))),
        )
        .route(
            "/api/v1/vms/{vm}/actions/{action}",
            operator(s, on_owner(s, post(vm_action))),
        )
        .route(
            "/api/v1/vms/{vm}/console",
            viewer(s, on_owner(s, get(vm_console))),
        )
        .route("/api/v1/vms/{vm}/console/ws", viewer(s, get(vm_console_ws)))
        .route(
            "/api/v1/vms/{vm}/disks/stats",
            viewer(s, on_owner(s, get(vm_disk_stats))),
        )
        .route(
            "/api/v1/vms/{vm}/snapshots",
            viewer(s, get(list_snapshots)).merge(operator(s, on_owner(s, post(create_snapshot)))),
        )
        .route(
            "/api/v1/vms/{vm}/snapshots/{name}",
            operator(s, on_owner(s, delete(delete_snapshot))),
        )
        .route(
            "/api/v1/vms/{vm}/snapshots/{name}/restore",
            operator(s, on_owner(s, post(restore_snapshot))),
        )
        // Importing reads a path on the host: admin only (it could read any file novacron can).
        .route(
            "/api/v1/images",
            viewer(s, get(list_images)).merge(admin(s, post(import_image))),
        )
        .route(
            "/api/v1/images/{image}",
            viewer(s, get(get_image)).merge(operator(s, delete(delete_image))),
        )
        // A pool names a directory on the hosts: admin only.
        .route(
            "/api/v1/pools",
            viewer(s, get(list_pools)).merge(admin(s, post(create_pool))),
        )
        .route(
            "/api/v1/pools/{pool}",
            viewer(s, get(get_pool)).merge(admin(s, delete(delete_pool))),
        )
        .route(
            "/api/v1/volumes",
            viewer(s, get(list_volumes)).merge(operator(s, post(create_volume))),
        )
        .route(
            "/api/v1/volumes/{volume}",
            viewer(s, get(get_volume))
                .merge(operator(s, on_volume_owner(s, delete(delete_volume)))),
        )
        .route(
            "/api/v1/volumes/{volume}/actions/attach",
            operator(s, post(attach_volume)),
        )
        .route(
            "/api/v1/volumes/{volume}/actions/detach",
            operator(s, on_volume_owner(s, post(detach_volume))),
        )
        .route(
            "/api/v1/volumes/{volume}/actions/resize",
            operator(s, on_volume_owner(s, post(resize_volume))),
        )
        .route(
            "/api/v1/volumes/{volume}/actions/move",
            operator(s, on_volume_owner(s, post(move_volume))),
        )
        .route(
            "/api/v1/volumes/{volume}/snapshots",
            operator(s, on_volume_owner(s, post(snapshot_volume))),
        )
        .route(
            "/api/v1/volumes/{volume}/snapshots/{name}",
            operator(s, on_volume_owner(s, delete(delete_volume_snapshot))),
        )
        .route(
            "/api/v1/volumes/{volume}/snapshots/{name}/restore",
            operator(s, on_volume_owner(s, post(restore_volume_snapshot))),
        )
        .route(
            "/api/v1/tiering/policy",
            viewer(s, get(get_tiering_policy)).merge(admin(s, put(set_tiering_policy))),
        )
        .route("/api/v1/tiering/plan", viewer(s, get(tiering_plan)))
        .route("/api/v1/placement", viewer(s, post(place)))
        .route("/api/v1/nodes", viewer(s, get(list_nodes)))
        .route("/api/v1/nodes/{id}/evacuate", admin(s, post(evacuate_node)))
        .route("/api/v1/nodes/{id}/restore", admin(s, post(restore_node)))
        .route("/api/v1/cluster", viewer(s, get(cluster_status)))
        .route("/api/v1/cluster/tokens", admin(s, post(create_join_token)))
        .route(
            "/api/v1/cluster/join",
            post(join_cluster).layer(DefaultBodyLimit::max(OPEN_BODY_LIMIT)),
        )
        .route(
            "/api/v1/cluster/members/{id}",
            admin(s, delete(remove_member)),
        )
        .route("/api/v1/cluster/leader", admin(s, post(transfer_leader)))
        .route("/api/v1/operations", viewer(s, get(list_operations)))
        .route(
            "/api/v1/operations/{id}",
            viewer(s, get(get_operation)).merge(operator(s, delete(cancel_operation))),
        )
        .route(
            "/api/v1/operations/{id}/wait",
            viewer(s, get(wait_operation)),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .merge(internal::router(s))
        .with_state(state)
}
