//! A typed client for the NovaCron REST API.
//!
//! Invariant: it knows the API's paths and shapes, nothing of the server's internals.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use novacron_types::{
    ApiError, CreateVmRequest, ErrorBody, ErrorCode, Image, ImportImageRequest, Operation, Vm,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{} ({status}): {}", .error.code.as_str(), .error.message)]
    Api { status: u16, error: ApiError },
    #[error("cannot reach {url}")]
    Transport { url: String, source: reqwest::Error },
    #[error("unexpected answer from the server ({status}): {body}")]
    Unexpected { status: u16, body: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => {
                Some(*status)
            }
            ClientError::Transport { .. } => None,
        }
    }

    /// The server's error body, when it sent one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct LoginResponse {
    token: String,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3700))
            // Below the server's shortest header-read timeout (5 s), which also closes idle
            // kept-alive connections: a pooled connection is never reused as it closes.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn with_token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }

    /// Sends a request and returns the raw status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        Ok((status, bytes.to_vec()))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body =
            body.map(serde_json::to_value)
                .transpose()
                .map_err(|e| ClientError::Unexpected {
                    status: 0,
                    body: e.to_string(),
                })?;
        let (status, bytes) = self.raw(method, path, body.as_ref()).await?;
        if (200..300).contains(&status) {
            let bytes = if bytes.is_empty() {
                b"null".to_vec()
            } else {
                bytes
            };
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                status,
                body: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(ClientError::Api {
                status,
                error: b.error,
            }),
            Err(_) => Err(ClientError::Unexpected {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(Method::DELETE, path, None)
            .await
            .map(drop)
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<String, ClientError> {
        let body = serde_json::json!({"username": username, "password": password});
        let r: LoginResponse = self.post("/api/v1/auth/login", &body).await?;
        Ok(r.token)
    }

    /// One page of a list: `path` may carry filters; `after` is the previous page's `next`.
    pub async fn page<T: DeserializeOwned>(
        &self,
        path: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<novacron_types::Page<T>, ClientError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}limit={limit}");
        if let Some(a) = after {
            url.push_str(&format!("&after={}", encode(a)));
        }
        self.get(&url).await
    }

    /// Every item of a list, following `next` from page to page.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .page::<T>(path, novacron_types::page::MAX_LIMIT, after.as_deref())
                .await?;
            all.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(all),
            }
        }
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.list_all("/api/v1/vms").await
    }

    pub async fn get_vm(&self, key: &str) -> Result<Vm, ClientError> {
        self.get(&format!("/api/v1/vms/{}", encode(key))).await
    }

    pub async fn create_vm(&self, req: &CreateVmRequest) -> Result<Vm, ClientError> {
        self.post("/api/v1/vms", req).await
    }

    /// A placement dry run.
    pub async fn place(
        &self,
        req: &novacron_types::PlacementRequest,
    ) -> Result<novacron_types::PlacementReport, ClientError> {
        self.post("/api/v1/placement", req).await
    }

    /// `PATCH /api/v1/vms/{vm}`: labels (merge) and HA.
    pub async fn update_vm(
        &self,
        key: &str,
        req: &novacron_types::UpdateVmRequest,
    ) -> Result<Vm, ClientError> {
        self.call(
            Method::PATCH,
            &format!("/api/v1/vms/{}", encode(key)),
            Some(req),
        )
        .await
    }

    /// The VM's disk I/O as its host collected it; `step`: seconds per bucket at least.
    pub async fn disk_stats(
        &self,
        key: &str,
        step: Option<u64>,
    ) -> Result<novacron_types::DiskIoReport, ClientError> {
        let q = step.map(|s| format!("?step={s}")).unwrap_or_default();
        self.get(&format!("/api/v1/vms/{}/disks/stats{q}", encode(key)))
            .await
    }

    pub async fn delete_vm(&self, key: &str) -> Result<(), ClientError> {
        self.delete(&format!("/api/v1/vms/{}", encode(key))).await
    }

    pub async fn vm_action(&self, key: &str, action: &str) -> Result<Operation, ClientError> {
        self.post(
            &format!("/api/v1/vms/{}/actions/{}", encode(key), encode(action)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Starts a live migration.
    pub async fn migrate_vm(
        &self,
        key: &str,
        req: &novacron_types::MigrateVmRequest,
    ) -> Result<Operation, ClientError> {
        self.post(&format!("/api/v1/vms/{}/actions/migrate", encode(key)), req)
            .await
    }

    /// Cancels a running operation (a live migration).
    pub async fn cancel_operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.call::<(), Operation>(
            Method::DELETE,
            &format!("/api/v1/operations/{}", encode(id)),
            None,
        )
        .await
    }

    pub async fn snapshot_vm(&self, key: &str, name: &str) -> Result<Operation, ClientError> {
        self.post(
            &format!("/api/v1/vms/{}/snapshots", encode(key)),
            &serde_json::json!({"name": name}),
        )
        .await
    }

    pub async fn restore_vm(&self, key: &str, name: &str) -> Result<Operation, ClientError> {
        let path = format!(
            "/api/v1/vms/{}/snapshots/{}/restore",
            encode(key),
            encode(name)
        );
        self.post(&path, &serde_json::json!({})).await
    }

    /// Reads the console from `offset`; returns the text and the offset to continue from.
    pub async fn console(
        &self,
        key: &str,
        offset: Option<u64>,
        tail: Option<u64>,
    ) -> Result<(Vec<u8>, u64), ClientError> {
        let mut path = format!("/api/v1/vms/{}/console", encode(key));
        match (offset, tail) {
            (Some(o), _) => path.push_str(&format!("?offset={o}")),
            (None, Some(t)) => path.push_str(&format!("?tail={t}")),
            _ => {}
        }
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let next = resp
            .headers()
            .get("x-console-next-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        if status != StatusCode::OK {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api {
                    status: status.as_u16(),
                    error: b.error,
                },
                Err(_) => ClientError::Unexpected {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        Ok((bytes.to_vec(), next))
    }

    pub async fn list_pools(&self) -> Result<Vec<novacron_types::StoragePool>, ClientError> {
        self.list_all("/api/v1/pools").await
    }

    pub async fn get_pool(&self, name: &str) -> Result<novacron_types::StoragePool, ClientError> {
        self.get(&format!("/api/v1/pools/{}", encode(name))).await
    }

    pub async fn create_pool(
        &self,
        req: &novacron_types::CreatePoolRequest,
    ) -> Result<novacron_types::StoragePool, ClientError> {
        self.post("/api/v1/pools", req).await
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/api/v1/pools/{}", encode(name)))
            .await
    }

    /// One page of volumes; `query` is the query string without `?` (filters, `limit`,
    /// `after`).
    pub async fn list_volumes(
        &self,
        query: &str,
    ) -> Result<novacron_types::VolumePage, ClientError> {
        self.get(&format!("/api/v1/volumes?{query}")).await
    }

    pub async fn get_volume(&self, key: &str) -> Result<novacron_types::Volume, ClientError> {
        self.get(&format!("/api/v1/volumes/{}", encode(key))).await
    }

    pub async fn create_volume(
        &self,
        req: &novacron_types::CreateVolumeRequest,
    ) -> Result<novacron_types::Volume, ClientError> {
        self.post("/api/v1/volumes", req).await
    }

    pub async fn delete_volume(&self, key: &str) -> Result<(), ClientError> {
        self.delete(&format!("/api/v1/volumes/{}", encode(key)))
            .await
    }

    /// `attach` (body `{"vm": ...}`), `detach`, `resize` (body `{"size_mib": N}`).
    pub async fn volume_action<B: Serialize>(
        &self,
        key: &str,
        action: &str,
        body: &B,
    ) -> Result<novacron_types::Volume, ClientError> {
        self.post(
            &format!("/api/v1/volumes/{}/actions/{action}", encode(key)),
            body,
        )
        .await
    }

    pub async fn snapshot_volume(
        &self,
        key: &str,
        name: &str,
    ) -> Result<novacron_types::Volume, ClientError> {
        self.post(
            &format!("/api/v1/volumes/{}/snapshots", encode(key)),
            &novacron_types::VolumeSnapshotRequest {
                name: name.to_string(),
            },
        )
        .await
    }

    pub async fn delete_volume_snapshot(
        &self,
        key: &str,
        name: &str,
    ) -> Result<novacron_types::Volume, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/api/v1/volumes/{}/snapshots/{}", encode(key), encode(name)),
            None,
        )
        .await
    }

    pub async fn restore_volume_snapshot(
        &self,
        key: &str,
        name: &str,
    ) -> Result<novacron_types::Volume, ClientError> {
        self.post(
            &format!(
                "/api/v1/volumes/{}/snapshots/{}/restore",
                encode(key),
                encode(name)
            ),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn move_volume(
        &self,
        key: &str,
        req: &novacron_types::MoveVolumeRequest,
    ) -> Result<Operation, ClientError> {
        self.post(
            &format!("/api/v1/volumes/{}/actions/move", encode(key)),
            req,
        )
        .await
    }

    pub async fn tiering_policy(&self) -> Result<novacron_types::TieringPolicy, ClientError> {
        self.get("/api/v1/tiering/policy").await
    }

    pub async fn set_tiering_policy(
        &self,
        p: &novacron_types::TieringPolicy,
    ) -> Result<novacron_types::TieringPolicy, ClientError> {
        self.put("/api/v1/tiering/policy", p).await
    }

    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        self.list_all("/api/v1/images").await
    }

    pub async fn import_image(&self, req: &ImportImageRequest) -> Result<Operation, ClientError> {
        self.post("/api/v1/images", req).await
    }

    pub async fn get_operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.get(&format!("/api/v1/operations/{}", encode(id)))
            .await
    }

    /// One long-poll of at most `timeout_s` seconds.
    pub async fn wait_operation(&self, id: &str, timeout_s: u64) -> Result<Operation, ClientError> {
        self.get(&format!(
            "/api/v1/operations/{}/wait?timeout={timeout_s}",
            encode(id)
        ))
        .await
    }

    /// Waits until the operation finishes; a failed or cancelled operation is an error.
    pub async fn wait_success(
        &self,
        op: &Operation,
        timeout: Duration,
    ) -> Result<Operation, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs()
                .max(1);
            let op = self
                .wait_operation(&op.id.to_string(), left.min(60))
                .await?;
            if op.status.is_final() {
                return match op.error.clone() {
                    None if op.status == novacron_types::OperationStatus::Success => Ok(op),
                    Some(error) => Err(ClientError::Api { status: 200, error }),
                    None => Err(ClientError::Api {
                        status: 200,
                        error: ApiError::new(
                            ErrorCode::Internal,
                            format!("operation ended {:?}", op.status),
                        ),
                    }),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Api {
                    status: 200,
                    error: ApiError::new(
                        ErrorCode::Timeout,
                        format!("operation {} still running", op.id),
                    ),
                });
            }
        }
    }
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
