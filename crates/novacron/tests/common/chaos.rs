//! Chaos harness: hosts on their own loopback addresses behind fault-injecting proxies, a client
//! workload that records a history of label reads and writes through different hosts, and the
//! checks made after each scenario.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_chaos::linearizability::{self, Action, Operation, Verdict};
use novacron_chaos::proxy::{Net, Proxy};
use novacron_chaos::seeded::Seeded;
use serde_json::{Value, json};

use super::cluster::fast_args;
use super::{ADMIN_PASSWORD, Node};

pub struct ChaosHost {
    pub id: u32,
    pub ip: IpAddr,
    pub node: Node,
    pub proxy: Proxy,
    /// Where clients reach the host directly (not through its proxy).
    pub direct: String,
    /// Taken out of the cluster: skipped by every check.
    pub removed: bool,
}

pub struct ChaosCluster {
    pub net: Net,
    pub hosts: Vec<ChaosHost>,
    pub extra: Vec<String>,
    /// One session for every host (logins are rate-limited per client address and user).
    token: tokio::sync::Mutex<Option<String>>,
    /// When the test began: the clock of every line of the timeline.
    pub t0: Instant,
}

/// Seconds since `t0`, as the timeline prints them.
pub fn stamp(t0: Instant) -> String {
    format!("+{:.3}s", t0.elapsed().as_secs_f64())
}

/// This test process's open file descriptors.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `127.0.0.(10 + id)`.
pub fn host_ip(id: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8))
}

impl ChaosCluster {
    pub async fn start(n: u32, seed: u64, extra: &[&str]) -> ChaosCluster {
        let mut c = ChaosCluster {
            net: Net::new(seed),
            hosts: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            token: tokio::sync::Mutex::new(None),
            t0: Instant::now(),
        };
        for _ in 0..n {
            c.add_host("full").await;
        }
        c.wait_all_online(Duration::from_secs(30)).await;
        c
    }

    /// Starts one more host (the first bootstraps; the others join through host 1).
    pub async fn add_host(&mut self, role: &str) -> u32 {
        let id = self.hosts.len() as u32 + 1;
        let ip = host_ip(id);
        self.net.register_host(id, ip);
        let proxy = self.net.proxy(id, ip).await.expect("proxy");
        let port = free_port(ip);
        let listen = format!("{ip}:{port}");
        proxy.set_upstream(listen.parse().expect("addr"));
        let mut args = fast_args();
        args.extend(self.extra.iter().cloned());
        args.extend([
            "--advertise".into(),
            format!("http://{}", proxy.addr),
            "--node-name".into(),
            format!("host-{id}"),
            "--role".into(),
            role.into(),
        ]);
        if id > 1 {
            let admin = self.admin(1).await;
            let t: Value = admin
                .post(
                    "/api/v1/cluster/tokens",
                    &json!({ "role": role, "ttl_seconds": 300 }),
                )
                .await
                .expect("join token");
            args.extend([
                "--join".into(),
                self.hosts[0].node.url.clone(),
                "--token".into(),
                t["token"].as_str().expect("token").into(),
            ]);
        }
        let node = tokio::task::spawn_blocking(move || Node::start_listening(&listen, args))
            .await
            .expect("start host");
        let direct = format!("http://{}", node.bound());
        self.hosts.push(ChaosHost {
            id,
            ip,
            node,
            proxy,
            direct,
            removed: false,
        });
        id
    }

    /// A line of the timeline: faults, heals, leader changes, with the time since the start.
    pub fn log(&self, what: impl std::fmt::Display) {
        eprintln!("[chaos {}] {what}", stamp(self.t0));
    }

    /// Every host's own view (role, term, vote, log, lease, isolation, fencing) and this
    /// process's descriptors: what a failed wait prints.
    pub async fn dump(&self) {
        self.log(format!("test process: {} open descriptors", open_fds()));
        for h in &self.hosts {
            if !h.node.is_running() {
                self.log(format!("host {}: not running", h.id));
                continue;
            }
            match self.local_status(h.id).await {
                Some(s) => {
                    let l = &s["local"];
                    self.log(format!(
                        "host {}: {} term {} vote {} last log {} applied {} lease left {} ms \
                         isolated {} fenced {} leader {} quorum {}",
                        h.id,
                        l["raft_role"],
                        l["term"],
                        l["vote"],
                        l["last_log_index"],
                        l["applied_index"],
                        l["lease_left_ms"],
                        l["isolated"],
                        l["fenced"].as_array().map(Vec::len).unwrap_or(0),
                        s["leader"]["id"],
                        s["quorum"]
                    ));
                }
                None => self.log(format!("host {}: no answer", h.id)),
            }
        }
    }

    /// New host-to-host connections every host has accepted so far, summed (from /metrics).
    pub async fn internal_connections(&self) -> u64 {
        let Some(token) = self.token().await else {
            return 0;
        };
        let http = reqwest::Client::new();
        let mut total = 0;
        for h in self.active() {
            let Ok(r) = http
                .get(format!("{}/metrics", h.direct))
                .bearer_auth(&token)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let text = r.text().await.unwrap_or_default();
            total += text
                .lines()
                .find(|l| l.starts_with("novacron_http_connections_total{api=\"internal\"}"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
        total
    }

    pub fn host(&self, id: u32) -> &ChaosHost {
        &self.hosts[(id - 1) as usize]
    }

    pub fn host_mut(&mut self, id: u32) -> &mut ChaosHost {
        &mut self.hosts[(id - 1) as usize]
    }

    /// Hosts still in the cluster.
    pub fn ids(&self) -> Vec<u32> {
        self.active().map(|h| h.id).collect()
    }

    pub fn active(&self) -> impl Iterator<Item = &ChaosHost> {
        self.hosts.iter().filter(|h| !h.removed)
    }

    /// The admin session (any host's JWT works on every host), logged in once.
    async fn token(&self) -> Option<String> {
        let mut t = self.token.lock().await;
        if t.is_none() {
            for h in &self.hosts {
                if let Some(tok) = session_token(&h.direct).await {
                    *t = Some(tok);
                    break;
                }
            }
        }
        t.clone()
    }

    /// A client talking to host `id` directly.
    pub async fn admin(&self, id: u32) -> novacron_client::Client {
        let token = self.token().await.expect("login");
        novacron_client::Client::new(&self.host(id).direct, Some(token))
    }

    /// Status from host `id`'s own point of view (never forwarded).
    pub async fn local_status(&self, id: u32) -> Option<Value> {
        let c = reqwest::Client::new();
        let token = self.token().await?;
        c.get(format!(
            "{}/api/v1/cluster?consistency=stale",
            self.host(id).direct
        ))
        .bearer_auth(token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
    }

    pub async fn leader(&self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            for h in self.active() {
                if !h.node.is_running() {
                    continue;
                }
                if let Some(s) = self.local_status(h.id).await
                    && s["local"]["raft_role"] == "leader"
                    && s["quorum"] == true
                {
                    return h.id;
                }
            }
            if Instant::now() >= deadline {
                self.log(format!("no leader with a quorum after {timeout:?}"));
                self.dump().await;
                panic!("no leader with a quorum");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_all_online(&self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let want = self.active().count();
        loop {
            let leader = self.leader(timeout).await;
            if let Some(s) = self.local_status(leader).await {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                if members.len() == want
                    && members.iter().all(|m| {
                        m["health"] == "online" && m["lag"].as_u64().is_some_and(|l| l < 5)
                    })
                {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not settle: {}",
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Logs in and returns a session token (valid on every host).
pub async fn session_token(base: &str) -> Option<String> {
    let r: Value = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "username": "admin", "password": ADMIN_PASSWORD }))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    r["token"].as_str().map(str::to_string)
}

/// What the workload records, and what the sampler sees of leaders.
#[derive(Default)]
pub struct Recorder {
    pub ops: Mutex<Vec<Operation>>,
    /// term -> leaders seen for it
    pub leaders: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
    pub acked_writes: AtomicU64,
    /// Writes with an unknown outcome (timeouts, 504).
    pub failed_writes: AtomicU64,
    /// Writes refused before anything was changed (503, refused connections).
    pub refused_writes: AtomicU64,
    pub reads: AtomicU64,
}

pub struct Workload {
    pub recorder: Arc<Recorder>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    start: Instant,
}

/// The registers: `labels[k]` of a few VMs.
pub fn keys() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for vm in ["reg-a", "reg-b"] {
        for k in ["k0", "k1", "k2"] {
            v.push((vm.to_string(), k.to_string()));
        }
    }
    v
}

impl Workload {
    /// Creates the register VMs (stopped; they never boot) and starts `clients` clients, client
    /// `i` talking to host `i % hosts + 1` directly.
    pub async fn start(cluster: &ChaosCluster, clients: usize, seed: u64) -> Workload {
        Self::start_with(cluster, clients, seed, false).await
    }

    /// `stale_reads`: read with `consistency=stale` (a negative control: such histories need
    /// not be linearizable, and the checker must notice).
    pub async fn start_with(
        cluster: &ChaosCluster,
        clients: usize,
        seed: u64,
        stale_reads: bool,
    ) -> Workload {
        let admin = cluster.admin(1).await;
        for vm in ["reg-a", "reg-b"] {
            admin
                .create_vm(&super::demo_vm(vm))
                .await
                .expect("create a register VM");
        }
        let token = cluster.token().await.expect("token");
        let recorder = Arc::new(Recorder::default());
        let (stop, _) = tokio::sync::watch::channel(false);
        let start = Instant::now();
        let counter = Arc::new(AtomicU64::new(1));
        let mut tasks = Vec::new();
        let bases: Vec<String> = cluster.active().map(|h| h.direct.clone()).collect();
        for i in 0..clients {
            let base = bases[i % bases.len()].clone();
            let rec = recorder.clone();
            let token = token.clone();
            let counter = counter.clone();
            let mut stop_rx = stop.subscribe();
            let mut rng = Seeded::new(seed.wrapping_mul(1000).wrapping_add(i as u64));
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .build()
                    .expect("client");
                let keys = keys();
                while !*stop_rx.borrow() {
                    let (vm, label) = rng.pick(&keys).clone();
                    let key = format!("{vm}/{label}");
                    let invoked = start.elapsed().as_micros() as u64;
                    if rng.below(2) == 0 {
                        let value = counter.fetch_add(1, Ordering::SeqCst);
                        let r = http
                            .patch(format!("{base}/api/v1/vms/{vm}"))
                            .bearer_auth(&token)
                            .json(&json!({ "labels": { label.clone(): value.to_string() } }))
                            .send()
                            .await;
                        // 2xx: done. 503 (or a refused connection): not made. Anything
                        // else (504, a timeout, a reset): it may or may not have happened.
                        let outcome = match &r {
                            Ok(resp) if resp.status().is_success() => {
                                Some(Some(start.elapsed().as_micros() as u64))
                            }
                            Ok(resp) if resp.status().as_u16() == 503 => None,
                            Ok(resp) if resp.status().is_client_error() => None,
                            Err(e) if e.is_connect() => None,
                            _ => Some(None),
                        };
                        let Some(completed) = outcome else {
                            rec.refused_writes.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        if completed.is_some() {
                            rec.acked_writes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            rec.failed_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        rec.ops.lock().expect("ops").push(Operation {
                            key,
                            action: Action::Write { value },
                            invoked,
                            completed,
                        });
                    } else {
                        let query = if stale_reads {
                            "?consistency=stale"
                        } else {
                            ""
                        };
                        let r = http
                            .get(format!("{base}/api/v1/vms/{vm}{query}"))
                            .bearer_auth(&token)
                            .send()
                            .await;
                        if let Ok(resp) = r
                            && resp.status().is_success()
                            && let Ok(v) = resp.json::<Value>().await
                        {
                            let done = start.elapsed().as_micros() as u64;
                            let value = v["labels"][&label].as_str().and_then(|s| s.parse().ok());
                            rec.reads.fetch_add(1, Ordering::Relaxed);
                            rec.ops.lock().expect("ops").push(Operation {
                                key,
                                action: Action::Read { value },
                                invoked,
                                completed: Some(done),
                            });
                        }
                    }
                    let pause = Duration::from_millis(rng.below(15));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop_rx.changed() => {}
                    }
                }
            }));
        }
        // Leader sampler: every host's own (term, leader), ten times a second; each new term's
        // leader goes on the timeline.
        let rec = recorder.clone();
        let mut stop_rx = stop.subscribe();
        let token2 = token.clone();
        let t0 = cluster.t0;
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .expect("client");
            while !*stop_rx.borrow() {
                for base in &bases {
                    if let Ok(r) = http
                        .get(format!("{base}/api/v1/cluster?consistency=stale"))
                        .bearer_auth(&token2)
                        .send()
                        .await
                        && let Ok(s) = r.json::<Value>().await
                        && let (Some(term), Some(leader)) =
                            (s["term"].as_u64(), s["leader"]["id"].as_u64())
                    {
                        let new = rec
                            .leaders
                            .lock()
                            .expect("leaders")
                            .entry(term)
                            .or_default()
                            .insert(leader);
                        if new {
                            eprintln!(
                                "[chaos {}] leader: host {leader} in term {term} (as {base} sees it)",
                                stamp(t0)
                            );
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
        }));
        Workload {
            recorder,
            stop,
            tasks,
            start,
        }
    }

    /// Microseconds since the workload started: the history's clock.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Adds an operation made outside the workload's clients to the history.
    pub fn record(&self, op: Operation) {
        self.recorder.ops.lock().expect("ops").push(op);
    }

    /// Stops the clients, then reads every register through every host (linearizably) and
    /// adds those reads to the history.
    pub async fn finish(self, cluster: &ChaosCluster) -> Arc<Recorder> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for h in cluster.active() {
            let c = cluster.admin(h.id).await;
            for (vm, label) in keys() {
                let invoked = self.start.elapsed().as_micros() as u64;
                let v = c.get_vm(&vm).await.expect("final read");
                let completed = self.start.elapsed().as_micros() as u64;
                self.recorder.ops.lock().expect("ops").push(Operation {
                    key: format!("{vm}/{label}"),
                    action: Action::Read {
                        value: v.labels.get(&label).and_then(|s| s.parse().ok()),
                    },
                    invoked,
                    completed: Some(completed),
                });
            }
        }
        self.recorder
    }
}

/// The linearizability verdict on what was recorded.
pub fn verdict(rec: &Recorder) -> Verdict {
    linearizability::check(&rec.ops.lock().expect("ops"), 5_000_000)
}

/// The checks made after every scenario.
pub async fn check_invariants(cluster: &ChaosCluster, rec: &Recorder, scenario: &str) {
    let ops = rec.ops.lock().expect("ops").clone();
    let acked = rec.acked_writes.load(Ordering::Relaxed);
    eprintln!(
        "[{scenario}] history: {} operations ({acked} acknowledged writes, {} unknown, {} refused, {} reads)",
        ops.len(),
        rec.failed_writes.load(Ordering::Relaxed),
        rec.refused_writes.load(Ordering::Relaxed),
        rec.reads.load(Ordering::Relaxed)
    );
    assert!(acked > 0, "[{scenario}] no write ever succeeded");
    // Linearizable, which includes: no acknowledged write lost (the final reads on every host
    // must see the last write or a later one).
    match verdict(rec) {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable { key, operations } => {
            panic!("[{scenario}] history of {key} is not linearizable: {operations:#?}")
        }
        Verdict::Unknown { key } => panic!("[{scenario}] checker gave up on {key}"),
    }
    // One leader per term.
    for (term, leaders) in rec.leaders.lock().expect("leaders").iter() {
        assert!(
            leaders.len() <= 1,
            "[{scenario}] term {term} had two leaders: {leaders:?}"
        );
    }
    // Every host has the same VMs with the same owners, and no VM has a QEMU on two hosts.
    let mut views = Vec::new();
    for h in cluster.active() {
        let c = cluster.admin(h.id).await;
        let vms = c.list_vms().await.expect("list");
        views.push(
            vms.into_iter()
                .map(|v| (v.id, v.node))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    for v in &views[1..] {
        assert_eq!(
            v, &views[0],
            "[{scenario}] hosts disagree about VM ownership"
        );
    }
    let mut running: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for h in cluster.active() {
        for entry in std::fs::read_dir(h.node.data_dir().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let pid: Option<i32> = std::fs::read_to_string(entry.path().join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
                running
                    .entry(entry.file_name().to_string_lossy().into_owned())
                    .or_default()
                    .push(h.id);
            }
        }
    }
    for (vm, hosts) in running {
        assert!(
            hosts.len() <= 1,
            "[{scenario}] VM {vm} runs on hosts {hosts:?}"
        );
    }
}
