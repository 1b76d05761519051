//! Multi-host harness: real `novacron serve` processes joined into one cluster with short
//! timings, and helpers that read `GET /api/v1/cluster`.

use std::time::{Duration, Instant};

use novacron_client::Client;
use serde_json::Value;

use super::Node;

/// Timings short enough for tests, long enough that a busy CI machine does not make hosts look
/// dead: heartbeats every 200 ms, offline after 2 s, 3 s leases (isolated after 2 s).
pub fn fast_args() -> Vec<String> {
    [
        "--heartbeat-ms",
        "200",
        "--offline-after-ms",
        "2000",
        "--lease-ms",
        "3000",
        "--election-timeout-ms",
        "150",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub struct TestCluster {
    pub nodes: Vec<Node>,
}

impl TestCluster {
    /// `roles`: `"full"` or `"witness"` per host; the first bootstraps, the rest join through it.
    pub async fn start(roles: &[&str], extra: &[&str]) -> TestCluster {
        Self::start_each(roles, extra, &[]).await
    }

    /// [`TestCluster::start`] with more arguments for some hosts: `per_host[i]` for host `i`.
    pub async fn start_each(roles: &[&str], extra: &[&str], per_host: &[&[&str]]) -> TestCluster {
        let own = |i: usize| -> Vec<String> {
            per_host
                .get(i)
                .map(|a| a.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default()
        };
        let mut base = fast_args();
        base.extend(extra.iter().map(|s| s.to_string()));
        let mut first = base.clone();
        first.extend([
            "--node-name".into(),
            "host-1".into(),
            "--role".into(),
            roles[0].into(),
        ]);
        first.extend(own(0));
        let seed = Node::start_with(first);
        let admin = seed.admin().await;
        let mut nodes = vec![seed];
        for (i, role) in roles.iter().enumerate().skip(1) {
            let token: Value = admin
                .post(
                    "/api/v1/cluster/tokens",
                    &serde_json::json!({ "role": role, "ttl_seconds": 120 }),
                )
                .await
                .expect("join token");
            let mut args = base.clone();
            args.extend([
                "--node-name".into(),
                format!("host-{}", i + 1),
                "--role".into(),
                role.to_string(),
                "--join".into(),
                nodes[0].url.clone(),
                "--token".into(),
                token["token"].as_str().expect("token").to_string(),
            ]);
            args.extend(own(i));
            nodes.push(Node::start_with(args));
        }
        let c = TestCluster { nodes };
        let want_voters = roles.len().min(3);
        c.wait_status(
            0,
            Duration::from_secs(30),
            "every host online and voting",
            |s| {
                members(s).len() == roles.len()
                    && members(s).iter().all(|m| m["health"] == "online")
                    && s["voters"].as_u64() == Some(want_voters as u64)
            },
        )
        .await;
        c
    }

    pub async fn admin(&self, i: usize) -> Client {
        self.nodes[i].admin().await
    }

    /// Polls `GET /api/v1/cluster` through host `via` until `pred` holds.
    pub async fn wait_status(
        &self,
        via: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let c = self.admin(via).await;
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(s) = c.get::<Value>("/api/v1/cluster").await {
                if pred(&s) {
                    return s;
                }
                last = s;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached: {what}; last status via host {}: {}",
                via + 1,
                serde_json::to_string_pretty(&last).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Index (into `nodes`) of the current leader, as host `via` reports it.
    pub async fn leader_index(&self, via: usize) -> usize {
        let s = self
            .wait_status(via, Duration::from_secs(15), "a leader", |s| {
                s["leader"].is_object() && s["quorum"] == true
            })
            .await;
        let url = s["leader"]["api_address"].as_str().expect("leader address");
        self.nodes
            .iter()
            .position(|n| n.url == url)
            .expect("leader is one of ours")
    }
}

pub fn members(s: &Value) -> Vec<Value> {
    s["members"].as_array().cloned().unwrap_or_default()
}

pub fn member(s: &Value, id: u64) -> Value {
    members(s)
        .into_iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .unwrap_or(Value::Null)
}

/// Host ID of a node, from its healthz.
pub async fn host_id(node: &Node) -> u64 {
    let v: Value = Client::new(&node.url, None)
        .get("/healthz")
        .await
        .expect("healthz");
    v["node"].as_u64().expect("node id")
}
