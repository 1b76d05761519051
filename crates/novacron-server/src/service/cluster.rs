//! Cluster membership as the API sees it: join tokens, joining, status, removal, leadership.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use novacron_state::CommandV1;
use novacron_types::{ApiError, ErrorCode, HostRole, JoinToken, NodeId, NodeInfo, now_millis};

use super::Service;
use crate::auth::{Principal, sha256_hex};
use crate::cluster::status::{ClusterStatus, LeaderRef};

/// `POST /api/v1/cluster/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// The role of the host that will use it (default `full`).
    #[serde(default)]
    pub role: Option<HostRole>,
    /// Seconds until it expires (default 3600, at most 7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenCreated {
    /// Pass to `novacron serve --join ADDR --token TOKEN`. Shown once; works once.
    pub token: String,
    pub id: String,
    pub role: HostRole,
    pub expires_at: i64,
}

/// `POST /api/v1/cluster/join`, sent by a new host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// `ncj1-ID-SECRET`, from `novacron cluster token`.
    #[schema(pattern = r"^ncj1-[^-]+-.+$", max_length = 256)]
    pub token: String,
    #[schema(
        pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Where the other hosts reach the new one (`http://host:port`).
    #[schema(
        pattern = r"^https?://[^/?#@\s\u0000-\u001f\u007f]+/?$",
        max_length = 256
    )]
    pub api_address: String,
    #[serde(default)]
    pub role: HostRole,
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000-\u001f\u007f]*$", max_length = 128)]
    pub qemu_version: String,
    #[serde(default)]
    #[schema(pattern = r"^[^\u0000-\u001f\u007f]*$", max_length = 16)]
    pub accelerator: String,
    #[serde(default)]
    #[schema(maximum = 65536)]
    pub cpus: u32,
    #[serde(default)]
    #[schema(maximum = 4294967296u64)]
    pub memory_mib: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinReply {
    pub node_id: NodeId,
    /// The secret hosts authenticate each other with.
    pub cluster_secret: String,
    pub leader: Option<LeaderRef>,
}

const TOKEN_PREFIX: &str = "ncj1";

fn parse_join_token(token: &str) -> Option<(&str, &str)> {
    let mut parts = token.trim().splitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
            Some((id, secret))
        }
        _ => None,
    }
}

/// The longest `api_address` a host may give (a URL).
const MAX_ADDRESS_LEN: usize = 256;

/// A join request's fields, each capped: they end up in every host's records.
fn check_join_fields(req: &JoinRequest) -> Result<(), ApiError> {
    novacron_types::validate::name("name", &req.name)?;
    let addr = req.api_address.trim_end_matches('/');
    if addr.len() > MAX_ADDRESS_LEN {
        return Err(ApiError::invalid(
            "api_address",
            format!("api_address is longer than {MAX_ADDRESS_LEN} characters"),
        ));
    }
    let rest = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"));
    let host_port = rest.unwrap_or_default();
    if rest.is_none()
        || host_port.is_empty()
        || host_port.contains(['/', '?', '#', '@', ' '])
        || host_port.chars().any(|c| c.is_control())
    {
        return Err(ApiError::invalid(
            "api_address",
            "api_address must be an http:// or https:// URL of a host and port, like \
             http://10.0.0.2:8080",
        ));
    }
    for (field, value, max) in [
        ("qemu_version", &req.qemu_version, 128),
        ("accelerator", &req.accelerator, 16),
    ] {
        if value.len() > max || value.chars().any(|c| c.is_control()) {
            return Err(ApiError::invalid(
                field,
                format!("{field} must be at most {max} printable characters"),
            ));
        }
    }
    if req.cpus > 65_536 {
        return Err(ApiError::invalid("cpus", "cpus must be at most 65536"));
    }
    if req.memory_mib > 1 << 32 {
        return Err(ApiError::invalid(
            "memory_mib",
            "memory_mib must be at most 4294967296 (4 PiB)",
        ));
    }
    Ok(())
}

impl Service {
    pub async fn create_join_token(
        &self,
        req: JoinTokenRequest,
        who: &Principal,
    ) -> Result<JoinTokenCreated, ApiError> {
        let ttl = req.ttl_seconds.unwrap_or(3600);
        if !(1..=7 * 24 * 3600).contains(&ttl) {
            return Err(ApiError::invalid(
                "ttl_seconds",
                "ttl_seconds must be between 1 and 604800 (7 days)",
            ));
        }
        let role = req.role.unwrap_or_default();
        let id = crate::cluster::identity::new_secret()[..16].to_string();
        let secret = crate::cluster::identity::new_secret();
        let now = now_millis();
        let token = JoinToken {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            role,
            created_by: who.username.clone(),
            created_at: now,
            expires_at: now + (ttl as i64) * 1000,
            used_by: None,
        };
        let expires_at = token.expires_at;
        self.inner
            .state
            .propose(CommandV1::CreateJoinToken { token })
            .await?;
        Ok(JoinTokenCreated {
            token: format!("{TOKEN_PREFIX}-{id}-{secret}"),
            id,
            role,
            expires_at,
        })
    }

    /// A new host asks to join: use up its token and give it an ID and the cluster secret. The
    /// leader adds it to Raft as a learner once it sees the record.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinReply, ApiError> {
        let (id, secret) = parse_join_token(&req.token).ok_or_else(|| {
            ApiError::invalid(
                "token",
                "not a join token (expected ncj1-...); make one with `novacron cluster token`",
            )
        })?;
        check_join_fields(&req)?;
        let addr = req.api_address.trim_end_matches('/').to_string();
        let hash = sha256_hex(secret);
        // The token is checked here before anything is proposed: a wrong guess must not add an
        // entry to every host's log. `apply` checks it again (two joins may race for it).
        self.check_join_token(id, &hash, req.role).await?;
        // IDs are never reused: take one above every ID ever seen. Two joins racing for the same
        // ID are told apart by `apply`; the loser retries with the next.
        for _ in 0..5 {
            let next = self
                .inner
                .state
                .read_linearizable(|s| {
                    s.nodes
                        .keys()
                        .chain(s.meta.removed_nodes.iter())
                        .copied()
                        .max()
                        .unwrap_or(0)
                        + 1
                })
                .await?;
            let next = next.max(self.state().membership().nodes.keys().max().unwrap_or(&0) + 1);
            let node = NodeInfo {
                id: NodeId(next),
                name: req.name.clone(),
                api_address: addr.clone(),
                qemu_version: req.qemu_version.clone(),
                accelerator: req.accelerator.clone(),
                cpus: req.cpus,
                memory_mib: req.memory_mib,
                registered_at: now_millis(),
                labels: Default::default(),
                role: req.role,
                // The host records its own settings when it starts.
                cpu_overcommit_pct: 400,
                memory_overcommit_pct: 100,
                reserved_memory_mib: 0,
                maintenance: false,
            };
            match self
                .inner
                .state
                .propose(CommandV1::JoinNode {
                    token_id: id.to_string(),
                    secret_sha256: hash.clone(),
                    node,
                    at: now_millis(),
                })
                .await
            {
                Ok(()) => {
                    tracing::info!(node = next, name = %req.name, %addr, "host joined");
                    return Ok(JoinReply {
                        node_id: NodeId(next),
                        cluster_secret: self.cluster().secret().to_string(),
                        leader: self.cluster().status().leader,
                    });
                }
                Err(e) if e.code == ErrorCode::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::unavailable(
            "could not allocate a host ID (too many joins at once); retry",
        ))
    }

    /// The join token must exist, match, be unused and unexpired, and be for this role. This
    /// host's copy decides when it knows the token; a token it does not know (made a moment ago
    /// through another host) is looked up again with a linearizable read.
    async fn check_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        role: HostRole,
    ) -> Result<(), ApiError> {
        let lookup = |s: &novacron_state::ClusterState| s.meta.join_tokens.get(id).cloned();
        let token = match self.inner.state.read(lookup) {
            Some(t) => Some(t),
            None => self.inner.state.read_linearizable(lookup).await?,
        };
        let valid = token.as_ref().is_some_and(|t| {
            crate::auth::constant_time_eq(&t.secret_sha256, secret_sha256)
                && t.used_by.is_none()
                && t.expires_at > now_millis()
        });
        let Some(token) = token.filter(|_| valid) else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "the join token is invalid, expired or already used; make a new one with \
                 `novacron cluster token`",
            ));
        };
        if token.role != role {
            return Err(ApiError::invalid(
                "role",
                format!(
                    "this token is for a {} host, not a {} host",
                    token.role.as_str(),
                    role.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// The cluster as the leader sees it; `stale` answers from this host alone.
    pub async fn cluster_status(&self, stale: bool) -> Result<ClusterStatus, ApiError> {
        let c = self.cluster();
        let local = c.status();
        if stale || local.leader.as_ref().is_some_and(|l| l.id == c.node) {
            return Ok(local);
        }
        let Some((_, addr)) = self.state().leader() else {
            return Ok(local);
        };
        match c
            .transport
            .get::<ClusterStatus>(
                &addr.api_addr,
                "/internal/v1/cluster",
                Duration::from_secs(2),
            )
            .await
        {
            Ok(mut s) => {
                s.local = c.local_status();
                Ok(s)
            }
            Err(e) => {
                tracing::debug!("cluster status from the leader: {e}");
                Ok(local)
            }
        }
    }

    /// Removes a host. Without `force` the host must be online and own no VMs; `force` is for
    /// a dead host (its VMs are marked `unknown`).
    pub async fn remove_node(&self, id: u64, force: bool) -> Result<(), ApiError> {
        let status = self.cluster_status(false).await?;
        let member = status
            .members
            .iter()
            .find(|m| m.id.0 == id)
            .ok_or_else(|| ApiError::not_found("host", id))?;
        if !force && member.health != "online" && member.health != "joining" {
            return Err(ApiError::conflict(format!(
                "host {id} is {}; use --force to remove a host that is down",
                member.health
            )));
        }
        let voters_after = status
            .members
            .iter()
            .filter(|m| m.voting && m.id.0 != id)
            .count();
        if member.voting && voters_after == 0 {
            return Err(ApiError::conflict("cannot remove the only voter"));
        }
        self.inner
            .state
            .propose(CommandV1::RemoveNode {
                id: NodeId(id),
                force,
                at: now_millis(),
            })
            .await
    }

    /// Hands Raft leadership to `to` (or to the healthiest other voter).
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<LeaderRef, ApiError> {
        let status = self.cluster_status(false).await?;
        let leader = status
            .leader
            .clone()
            .ok_or_else(|| ApiError::unavailable("there is no leader to transfer from"))?;
        let target = match to {
            Some(t) => {
                let m = status
                    .members
                    .iter()
                    .find(|m| m.id.0 == t)
                    .ok_or_else(|| ApiError::not_found("host", t))?;
                if !m.voting {
                    return Err(ApiError::invalid(
                        "to",
                        format!("host {t} does not vote; only voters can lead"),
                    ));
                }
                t
            }
            None => status
                .members
                .iter()
                .filter(|m| m.voting && m.id != leader.id && m.health == "online")
                .min_by_key(|m| m.lag.unwrap_or(u64::MAX))
                .map(|m| m.id.0)
                .ok_or_else(|| ApiError::conflict("no other healthy voter to take over"))?,
        };
        if target == leader.id.0 {
            return Ok(leader);
        }
        if leader.id == self.node_id() {
            self.state().transfer_leader(target).await?;
        } else {
            self.cluster()
                .transport
                .call::<_, serde_json::Value>(
                    &leader.api_address,
                    "/internal/v1/transfer-leader",
                    &serde_json::json!({ "to": target }),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
        }
        // Wait until the cluster agrees on the new leader.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((id, addr)) = self.state().leader()
                && id == target
            {
                return Ok(LeaderRef {
                    id: NodeId(id),
                    api_address: addr.api_addr,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!("host {target} did not take over leadership within 10 s"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse() {
        assert_eq!(parse_join_token("ncj1-abc-def"), Some(("abc", "def")));
        assert_eq!(
            parse_join_token(" ncj1-abc-d-e-f\n"),
            Some(("abc", "d-e-f"))
        );
        assert_eq!(parse_join_token("ncj1--def"), None);
        assert_eq!(parse_join_token("nct1-abc-def"), None);
        assert_eq!(parse_join_token("garbage"), None);
    }
}
