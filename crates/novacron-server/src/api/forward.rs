//! Any host accepts any request: a request about a VM that lives on another host is passed to
//! that host unchanged (same path, query, credentials and body), and its answer is returned.
//! Writes to the replicated state need no forwarding here: the state layer forwards them to the
//! Raft leader.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use novacron_types::{ApiError, ErrorCode, NodeId};

use super::AppState;
use super::error::HttpError;
use crate::service::Service;

/// Marks a forwarded request, so a host never forwards it again (no loops).
pub const FORWARDED_HEADER: &str = "novacron-forwarded-by";

/// Long enough for the slowest synchronous call (a graceful stop waits inside an operation,
/// not here).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends a request to host `node`'s API and returns its answer.
pub async fn to_node(
    svc: &Service,
    node: NodeId,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    match try_to_node(svc, node, method, path_and_query, headers, body).await {
        Ok(r) => r,
        Err(f) => HttpError(f.into_error()).into_response(),
    }
}

/// Why a forwarded request got no answer.
pub enum Failed {
    /// The host could not be connected to: the request was never sent, so it changed
    /// nothing there (a caller may try another host).
    Unreachable(ApiError),
    /// Anything else (the host may have acted on it).
    Other(ApiError),
}

impl Failed {
    pub fn into_error(self) -> ApiError {
        match self {
            Failed::Unreachable(e) | Failed::Other(e) => e,
        }
    }
}

/// [`to_node`], telling a host that could not be reached apart from other failures.
pub async fn try_to_node(
    svc: &Service,
    node: NodeId,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Failed> {
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(Failed::Other(ApiError::unavailable(format!(
            "this request was forwarded here, but host {node} owns the resource; the hosts \
             disagree about ownership (a change in flight); retry"
        ))));
    }
    let addr = svc
        .state()
        .read(|s| s.nodes.get(&node.0).map(|n| n.api_address.clone()))
        .ok_or_else(|| Failed::Other(ApiError::not_found("host", node)))?;
    let client = svc.cluster().transport.client();
    let mut req = client
        .request(method, format!("{addr}{path_and_query}"))
        .timeout(FORWARD_TIMEOUT)
        .header(FORWARDED_HEADER, svc.node_id().to_string())
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v);
        }
    }
    let resp = req.send().await.map_err(|e| {
        let error = ApiError::new(
            if e.is_timeout() {
                ErrorCode::Timeout
            } else {
                ErrorCode::Unavailable
            },
            format!("host {node} ({addr}), which owns this resource, did not answer: {e}"),
        );
        if e.is_connect() {
            Failed::Unreachable(error)
        } else {
            Failed::Other(error)
        }
    })?;
    let status = resp.status();
    let mut out = Response::builder().status(status.as_u16());
    for name in [
        header::CONTENT_TYPE,
        header::LOCATION,
        header::WWW_AUTHENTICATE,
        // Where a console read continues: without it a client re-reads from the start.
        header::HeaderName::from_static("x-console-next-offset"),
    ] {
        if let Some(v) = resp.headers().get(name.as_str())
            && let Ok(v) = HeaderValue::from_bytes(v.as_bytes())
        {
            out = out.header(name, v);
        }
    }
    // Forwarded replies are small (the console is read in bounded pieces).
    let bytes = resp.bytes().await.map_err(|e| {
        Failed::Other(ApiError::unavailable(format!(
            "reading host {node}'s answer: {e}"
        )))
    })?;
    out.body(Body::from(bytes)).map_err(|e| {
        Failed::Other(ApiError::internal(format!(
            "building the forwarded answer: {e}"
        )))
    })
}

/// Route layer for `/api/v1/vms/{vm}/...`: runs the request on the VM's host.
pub async fn to_vm_owner(
    State(st): State<AppState>,
    Path(params): Path<std::collections::HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let svc = &st.service;
    // The current owner, not this host's possibly older copy: the VM may have just been created
    // through another host, or have just moved (live migration). Without a quorum, the local
    // copy decides (and the handler reports what it can).
    let owner = match params.get("vm") {
        Some(key) => match svc.get_vm(key).await {
            Ok(vm) => Some(vm.node),
            Err(_) => svc.find_vm(key).ok().map(|vm| vm.node),
        },
        None => None,
    };
    match owner {
        Some(node) if node != svc.node_id() => pass_on(svc, node, req).await,
        // Ours, or unknown here (the handler's linearizable read decides).
        _ => next.run(req).await,
    }
}

/// Route layer for `/api/v1/volumes/{volume}/...`: runs the request on the host that must do
/// the volume's file work (its VM's host, or the host holding a local volume). A detached
/// volume on a shared pool is handled anywhere.
pub async fn to_volume_owner(
    State(st): State<AppState>,
    Path(params): Path<std::collections::HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let svc = &st.service;
    let owner = match params.get("volume") {
        Some(key) => match svc.get_volume(key).await {
            Ok(v) => svc.volume_owner(&v),
            Err(_) => svc.find_volume(key).ok().and_then(|v| svc.volume_owner(&v)),
        },
        None => None,
    };
    match owner {
        Some(node) if node != svc.node_id() => pass_on(svc, node, req).await,
        _ => next.run(req).await,
    }
}

/// Sends the whole request to `node` and returns its answer.
pub async fn pass_on(svc: &Service, node: NodeId, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return HttpError(ApiError::invalid("body", e.to_string())).into_response(),
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    to_node(svc, node, parts.method, &pq, &parts.headers, body).await
}
