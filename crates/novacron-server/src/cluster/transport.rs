//! Host-to-host HTTP: the Raft transport, forwarded writes and read-index requests, and the
//! cluster's own calls (heartbeats, pings). Every request carries the cluster secret.

use std::time::Duration;

use base64::Engine as _;
use novacron_state::TypeConfig;
use novacron_state::network::{
    ForwardedWrite, ForwardedWriteReply, RaftReply, RaftRequest, Transport, TransportError,
};
use novacron_state::raft::NodeAddr;
use novacron_types::ErrorBody;
use openraft::raft::SnapshotResponse;
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Header carrying the shared cluster secret on every host-to-host request.
pub const SECRET_HEADER: &str = "novacron-cluster-secret";
/// Header carrying a snapshot's vote and metadata (URL-safe base64 of JSON).
pub const SNAPSHOT_HEADER: &str = "novacron-snapshot";
/// Snapshots go out in chunks of this size.
const SNAPSHOT_CHUNK: usize = 256 * 1024;

/// A snapshot's header: who sends it and what it covers.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotHeader {
    pub vote: VoteOf<TypeConfig>,
    pub meta: SnapshotMetaOf<TypeConfig>,
}

#[derive(Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    secret: String,
}

impl HttpTransport {
    /// `local_ip`: the address outgoing connections leave from (the listen address), so peers
    /// see which host is calling.
    pub fn new(secret: String, local_ip: Option<std::net::IpAddr>) -> Self {
        // HTTP/2 with prior knowledge: one multiplexed connection per peer. A call that times
        // out cancels its own stream, not the connection, so faults do not turn into a storm of
        // new connections; a peer that stops answering pings is dropped within 3 s.
        let client = reqwest::Client::builder()
            .local_address(local_ip)
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_prior_knowledge()
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .http2_keep_alive_timeout(Duration::from_secs(2))
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self { client, secret }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// POSTs `body` as JSON to `addr` + `path` and decodes the JSON answer.
    pub async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, TransportError> {
        let req = self
            .client
            .post(format!("{addr}{path}"))
            .header(SECRET_HEADER, &self.secret)
            .timeout(timeout)
            .json(body);
        self.finish(addr, req, timeout).await
    }

    pub async fn get<R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<R, TransportError> {
        let req = self
            .client
            .get(format!("{addr}{path}"))
            .header(SECRET_HEADER, &self.secret)
            .timeout(timeout);
        self.finish(addr, req, timeout).await
    }

    /// GETs `addr` + `path` and returns the response to read as a stream (a large body); an
    /// error status is an error.
    pub async fn get_stream(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<reqwest::Response, TransportError> {
        let resp = self
            .client
            .get(format!("{addr}{path}"))
            .header(SECRET_HEADER, &self.secret)
            .send()
            .await
            .map_err(|e| send_error(addr, e, Duration::ZERO))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(remote_error(addr, status.as_u16(), &bytes));
        }
        Ok(resp)
    }

    async fn finish<R: DeserializeOwned>(
        &self,
        addr: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<R, TransportError> {
        let resp = req.send().await.map_err(|e| send_error(addr, e, timeout))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| send_error(addr, e, timeout))?;
        if !status.is_success() {
            return Err(remote_error(addr, status.as_u16(), &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| TransportError::Remote {
            addr: addr.to_string(),
            status: status.as_u16(),
            message: format!("undecodable answer: {e}"),
        })
    }
}

/// A peer's error answer: its JSON error's message, or the body as text.
fn remote_error(addr: &str, status: u16, body: &[u8]) -> TransportError {
    TransportError::Remote {
        addr: addr.to_string(),
        status,
        message: serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned()),
    }
}

fn send_error(addr: &str, e: reqwest::Error, timeout: Duration) -> TransportError {
    if e.is_connect() {
        TransportError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    } else if e.is_timeout() {
        TransportError::Timeout {
            addr: addr.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        }
    } else {
        // Reset mid-request and the like: it may have been delivered.
        TransportError::Timeout {
            addr: addr.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        }
    }
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn raft(
        &self,
        target: &NodeAddr,
        req: RaftRequest,
        timeout: Duration,
    ) -> Result<RaftReply, TransportError> {
        self.call(&target.api_addr, "/internal/v1/raft", &req, timeout)
            .await
    }

    async fn snapshot(
        &self,
        target: &NodeAddr,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMetaOf<TypeConfig>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        let header = serde_json::to_vec(&SnapshotHeader { vote, meta }).map_err(|e| {
            TransportError::Unreachable {
                addr: target.api_addr.clone(),
                reason: format!("encoding the snapshot header: {e}"),
            }
        })?;
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header);
        // Streamed in chunks: neither side needs a second copy of a large snapshot in flight.
        let chunks: Vec<bytes::Bytes> = bytes::Bytes::from(data)
            .chunks(SNAPSHOT_CHUNK)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        let body = reqwest::Body::wrap_stream(futures::stream::iter(
            chunks.into_iter().map(Ok::<_, std::io::Error>),
        ));
        let req = self
            .client
            .post(format!("{}/internal/v1/raft/snapshot", target.api_addr))
            .header(SECRET_HEADER, &self.secret)
            .header(SNAPSHOT_HEADER, header)
            .timeout(timeout)
            .body(body);
        self.finish(&target.api_addr, req, timeout).await
    }

    async fn forward_write(
        &self,
        leader: &NodeAddr,
        req: ForwardedWrite,
        timeout: Duration,
    ) -> Result<ForwardedWriteReply, TransportError> {
        self.call(&leader.api_addr, "/internal/v1/write", &req, timeout)
            .await
    }

    async fn read_index(
        &self,
        leader: &NodeAddr,
        timeout: Duration,
    ) -> Result<u64, TransportError> {
        self.get(&leader.api_addr, "/internal/v1/read-index", timeout)
            .await
    }
}
