//! Cluster benchmark (run by `scripts/bench-cluster.sh`, release build): a 3-member NovaCron
//! cluster and a 3-member etcd cluster on loopback, both with durable (fsynced) writes, driven by
//! the same load generator.
//!
//!  1. Write throughput and p50/p99 latency at 1, 16 and 64 concurrent clients. NovaCron: a VM
//!     label set with `PATCH /api/v1/vms/{vm}` (one Raft entry); etcd: `POST /v3/kv/put`
//!     through its HTTP JSON gateway. Clients are spread over the three members of each.
//!  2. Leader failover: `kill -9` of the leader, then the time until a write through a
//!     surviving member is acknowledged; the killed member is restarted and caught up between
//!     kills. Both systems run with their default timings.
//!
//! Usage: cluster_bench [--seconds S] [--kills K] [--novacron PATH] [--etcd PATH]
//!                      [--demo-image DIR] [--clients 1,16,64]

#[path = "bench_util/mod.rs"]
mod bench_util;

use bench_util::{arg, free_port, percentile};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const PASSWORD: &str = "bench-password";

/// The processes of one system's members; all killed when dropped.
struct Members(Vec<Option<Child>>);

impl Members {
    fn new() -> Self {
        Self(vec![None, None, None])
    }

    fn set(&mut self, i: usize, child: Child) {
        self.0[i] = Some(child);
    }

    /// `kill -9`, and reaps it.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill(i);
        }
    }
}

fn loopback_urls(ports: &[u16]) -> Vec<String> {
    ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The systems under test

trait System {
    fn name(&self) -> &'static str;
    /// Members' client URLs.
    fn urls(&self) -> Vec<String>;
    /// One write through member `member`, with `i` making keys and values distinct.
    fn write(
        &self,
        http: &reqwest::Client,
        member: usize,
        i: u64,
    ) -> impl std::future::Future<Output = bool> + Send;
    /// Index of the current leader.
    fn leader(&self, http: &reqwest::Client) -> impl std::future::Future<Output = usize> + Send;
    fn kill(&mut self, member: usize);
    /// Starts a killed member again and waits until the cluster is whole.
    fn restart(&mut self, member: usize) -> impl std::future::Future<Output = ()> + Send;
}

struct NovaCron {
    bin: PathBuf,
    dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    children: Members,
    token: String,
    demo: PathBuf,
}

impl NovaCron {
    fn spawn(&self, i: usize, join: Option<(&str, &str)>) -> Child {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.dirs[i])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--accel", "tcg", "--node-name", &format!("bench-{}", i + 1)])
            .arg("--demo-image")
            .arg(&self.demo)
            .env("NOVACRON_ADMIN_PASSWORD", PASSWORD)
            .env("NOVACRON_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((addr, token)) = join {
            cmd.args(["--join", addr, "--token", token]);
        }
        cmd.spawn().expect("spawn novacron")
    }

    async fn start(bin: PathBuf, demo: PathBuf, base: &Path) -> NovaCron {
        let mut n = NovaCron {
            bin,
            dirs: (1..=3)
                .map(|i| base.join(format!("novacron-{i}")))
                .collect(),
            ports: (0..3).map(|_| free_port()).collect(),
            children: Members::new(),
            token: String::new(),
            demo,
        };
        let http = reqwest::Client::new();
        n.children.set(0, n.spawn(0, None));
        let url0 = n.urls()[0].clone();
        n.token = wait_login(&http, &url0).await;
        for i in 1..3 {
            let t: Value = http
                .post(format!("{url0}/api/v1/cluster/tokens"))
                .bearer_auth(&n.token)
                .json(&json!({}))
                .send()
                .await
                .expect("token")
                .json()
                .await
                .expect("token json");
            let token = t["token"].as_str().expect("token").to_string();
            n.children.set(i, n.spawn(i, Some((&url0, &token))));
        }
        n.wait_whole(&http).await;
        let r = http
            .post(format!("{url0}/api/v1/vms"))
            .bearer_auth(&n.token)
            .json(&json!({ "name": "bench", "image": "demo", "vcpus": 1, "memory_mib": 64 }))
            .send()
            .await
            .expect("create VM");
        assert!(r.status().is_success(), "create VM: {}", r.status());
        n
    }

    async fn wait_whole(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for u in self.urls() {
                if let Ok(r) = http
                    .get(format!("{u}/api/v1/cluster"))
                    .bearer_auth(&self.token)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    && let Ok(s) = r.json::<Value>().await
                {
                    let ms = s["members"].as_array().cloned().unwrap_or_default();
                    if ms.len() == 3
                        && s["voters"] == 3
                        && ms.iter().all(|m| {
                            m["health"] == "online" && m["lag"].as_u64().is_some_and(|l| l < 3)
                        })
                    {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "NovaCron cluster never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl NovaCron {
    /// Connections every host has accepted from other hosts so far (`/internal/v1`), summed.
    async fn internal_connections(&self, http: &reqwest::Client) -> u64 {
        let mut total = 0;
        for u in self.urls() {
            let text = http
                .get(format!("{u}/metrics"))
                .bearer_auth(&self.token)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics text");
            total += text
                .lines()
                .find(|l| l.starts_with("novacron_http_connections_total{api=\"internal\"}"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
        total
    }
}

async fn wait_login(http: &reqwest::Client, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http
            .post(format!("{url}/api/v1/auth/login"))
            .json(&json!({ "username": "admin", "password": PASSWORD }))
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
            && let Some(t) = v["token"].as_str()
        {
            return t.to_string();
        }
        assert!(Instant::now() < deadline, "NovaCron did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl System for NovaCron {
    fn name(&self) -> &'static str {
        "NovaCron"
    }
    fn urls(&self) -> Vec<String> {
        loopback_urls(&self.ports)
    }
    async fn write(&self, http: &reqwest::Client, member: usize, i: u64) -> bool {
        let url = &self.urls()[member];
        http.patch(format!("{url}/api/v1/vms/bench"))
            .bearer_auth(&self.token)
            .json(&json!({ "labels": { format!("k{}", i % 16): i.to_string() } }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
    async fn leader(&self, http: &reqwest::Client) -> usize {
        loop {
            for (i, u) in self.urls().iter().enumerate() {
                if let Ok(r) = http
                    .get(format!("{u}/api/v1/cluster?consistency=stale"))
                    .bearer_auth(&self.token)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    && let Ok(s) = r.json::<Value>().await
                    && s["local"]["raft_role"] == "leader"
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fn kill(&mut self, member: usize) {
        self.children.kill(member);
    }
    async fn restart(&mut self, member: usize) {
        self.children.set(member, self.spawn(member, None));
        self.wait_whole(&reqwest::Client::new()).await;
    }
}

struct Etcd {
    bin: String,
    dirs: Vec<PathBuf>,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    children: Members,
}

impl Etcd {
    fn spawn(&self, i: usize) -> Child {
        let initial: Vec<String> = (0..3)
            .map(|j| format!("e{}=http://127.0.0.1:{}", j + 1, self.peer_ports[j]))
            .collect();
        Command::new(&self.bin)
            .args(["--name", &format!("e{}", i + 1)])
            .arg("--data-dir")
            .arg(&self.dirs[i])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", self.client_ports[i]),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", self.client_ports[i]),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_ports[i]),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_ports[i]),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "novacron-bench",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd")
    }

    async fn start(bin: String, base: &Path) -> Etcd {
        let mut e = Etcd {
            bin,
            dirs: (1..=3).map(|i| base.join(format!("etcd-{i}"))).collect(),
            client_ports: (0..3).map(|_| free_port()).collect(),
            peer_ports: (0..3).map(|_| free_port()).collect(),
            children: Members::new(),
        };
        for i in 0..3 {
            e.children.set(i, e.spawn(i));
        }
        e.wait_whole(&reqwest::Client::new()).await;
        e
    }

    async fn status(&self, http: &reqwest::Client, i: usize) -> Option<Value> {
        http.post(format!("{}/v3/maintenance/status", self.urls()[i]))
            .json(&json!({}))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    async fn wait_whole(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ok = 0;
            let mut indexes = Vec::new();
            for i in 0..3 {
                if let Some(s) = self.status(http, i).await
                    && s["leader"].as_str().is_some_and(|l| l != "0")
                {
                    ok += 1;
                    indexes.push(
                        s["raftIndex"]
                            .as_str()
                            .unwrap_or("0")
                            .parse::<u64>()
                            .unwrap_or(0),
                    );
                }
            }
            let caught_up = indexes
                .iter()
                .max()
                .zip(indexes.iter().min())
                .is_some_and(|(a, b)| a - b < 3);
            if ok == 3 && caught_up {
                return;
            }
            assert!(Instant::now() < deadline, "etcd cluster never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl System for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn urls(&self) -> Vec<String> {
        loopback_urls(&self.client_ports)
    }
    async fn write(&self, http: &reqwest::Client, member: usize, i: u64) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let url = &self.urls()[member];
        http.post(format!("{url}/v3/kv/put"))
            .json(&json!({
                "key": b64.encode(format!("k{}", i % 16)),
                "value": b64.encode(i.to_string()),
            }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
    async fn leader(&self, http: &reqwest::Client) -> usize {
        loop {
            for i in 0..3 {
                if let Some(s) = self.status(http, i).await
                    && s["leader"].is_string()
                    && s["leader"] == s["header"]["member_id"]
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fn kill(&mut self, member: usize) {
        self.children.kill(member);
    }
    async fn restart(&mut self, member: usize) {
        self.children.set(member, self.spawn(member));
        self.wait_whole(&reqwest::Client::new()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator (the same for both)

struct Throughput {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn load<S: System + Send + Sync + 'static>(
    sys: &Arc<S>,
    clients: usize,
    seconds: u64,
) -> Throughput {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let end = start + warmup + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sys = sys.clone();
        let http = http.clone();
        let counter = counter.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let ok = sys.write(&http, c % 3, i).await;
                if t >= start + warmup {
                    if ok {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Throughput {
        ops_per_s: all.len() as f64 / seconds as f64,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Kill the leader `kills` times; each time, the time until a write through a survivor is
/// acknowledged.
async fn failover<S: System + Sync>(sys: &mut S, kills: usize) -> Vec<f64> {
    // Short timeouts, so a request stuck in an election is retried at once (resolution 100 ms).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let mut out = Vec::new();
    for k in 0..kills {
        let leader = sys.leader(&http).await;
        let survivor = (leader + 1) % 3;
        // Warm the connection to the survivor so the measurement is not a TCP handshake.
        let _ = sys.write(&http, survivor, k as u64).await;
        sys.kill(leader);
        let t = Instant::now();
        let mut i = 1_000_000 + k as u64 * 1000;
        while !sys.write(&http, survivor, i).await {
            i += 1;
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{}: no write for 30 s after killing the leader",
                sys.name()
            );
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!("  {} kill {}: {ms:.0} ms", sys.name(), k + 1);
        out.push(ms);
        sys.restart(leader).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

#[tokio::main]
async fn main() {
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(10);
    let kills: usize = arg("--kills").and_then(|s| s.parse().ok()).unwrap_or(20);
    let clients: Vec<usize> = arg("--clients")
        .unwrap_or_else(|| "1,16,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let novacron_bin = arg("--novacron")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/novacron"));
    let etcd_bin = arg("--etcd").unwrap_or_else(|| "etcd".into());
    let demo = arg("--demo-image")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".novacron/demo-image"));
    let demo = std::path::absolute(&demo).unwrap_or(demo);
    let base = tempfile::Builder::new()
        .prefix("nc-cluster-bench")
        .tempdir()
        .expect("tempdir");
    let version = Command::new(&etcd_bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| panic!("cannot run {etcd_bin}: {e} (install etcd-server)"));
    println!(
        "Cluster benchmark: 3 members each on 127.0.0.1, durable writes, {seconds} s per level"
    );
    println!("  NovaCron: {} ; etcd: {version}", novacron_bin.display());

    let nc = Arc::new(NovaCron::start(novacron_bin.clone(), demo, base.path()).await);
    let etcd = Arc::new(Etcd::start(etcd_bin, base.path()).await);

    // New host-to-host connections a second per host: they should be reused, not reopened.
    let probe = reqwest::Client::new();
    let idle_from = nc.internal_connections(&probe).await;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let idle = (nc.internal_connections(&probe).await - idle_from) as f64 / seconds as f64 / 3.0;
    println!();
    println!("(a) write throughput and latency");
    println!("  idle cluster: {idle:.2} new host-to-host connections/s per host");
    println!(
        "  {:>7}  {:>12} {:>9} {:>9} {:>10}  {:>12} {:>9} {:>9}  {:>8}",
        "clients",
        "NovaCron/s",
        "p50 ms",
        "p99 ms",
        "conns/s/h",
        "etcd/s",
        "p50 ms",
        "p99 ms",
        "ratio"
    );
    for &c in &clients {
        let before = nc.internal_connections(&probe).await;
        let n = load(&nc, c, seconds).await;
        // The load ran for its warm-up second too.
        let conns =
            (nc.internal_connections(&probe).await - before) as f64 / (seconds + 1) as f64 / 3.0;
        let e = load(&etcd, c, seconds).await;
        println!(
            "  {:>7}  {:>12.0} {:>9.2} {:>9.2} {:>10.2}  {:>12.0} {:>9.2} {:>9.2}  {:>8.2}",
            c,
            n.ops_per_s,
            n.p50_ms,
            n.p99_ms,
            conns,
            e.ops_per_s,
            e.p50_ms,
            e.p99_ms,
            n.ops_per_s / e.ops_per_s
        );
        if n.errors + e.errors > 0 {
            println!(
                "           (errors: NovaCron {}, etcd {})",
                n.errors, e.errors
            );
        }
    }

    println!();
    println!(
        "(b) leader failover: kill -9 of the leader to the next acknowledged write ({kills} kills each)"
    );
    let mut nc = Arc::try_unwrap(nc).unwrap_or_else(|_| panic!("NovaCron still shared"));
    let mut etcd = Arc::try_unwrap(etcd).unwrap_or_else(|_| panic!("etcd still shared"));
    let n = failover(&mut nc, kills).await;
    let e = failover(&mut etcd, kills).await;
    let (n50, n99) = (percentile(&n, 0.5), percentile(&n, 0.99));
    let (e50, e99) = (percentile(&e, 0.5), percentile(&e, 0.99));
    println!(
        "  NovaCron: p50 {n50:.0} ms, p99 {n99:.0} ms, max {:.0} ms",
        n.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  etcd:     p50 {e50:.0} ms, p99 {e99:.0} ms, max {:.0} ms",
        e.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  ratio NovaCron/etcd: p50 {:.2}, p99 {:.2}",
        n50 / e50,
        n99 / e99
    );
    println!();
    println!(
        "Goals: failover p99 < 400 ms: {}; throughput at 64 clients >= etcd's: see ratio above",
        if n99 < 400.0 { "met" } else { "NOT met" }
    );
}
