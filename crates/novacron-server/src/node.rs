//! Starting a node: establish its identity (bootstrap a new cluster or join one), open the
//! replicated state, start the hypervisor driver, serve the API, re-adopt running VMs, and run
//! the cluster's background tasks (lease keeper, membership manager) until asked to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use novacron_hypervisor::Hypervisor;
use novacron_hypervisor::accel::{self, AccelSetting};
use novacron_hypervisor::none::NoHypervisor;
use novacron_hypervisor::qemu::{QemuConfig, QemuHypervisor};
use novacron_state::raft::StartMode;
use novacron_state::{CommandV1, RaftSettings, StateHandle};
use novacron_types::{ErrorBody, HostRole, NodeId, NodeInfo, now_millis};

use crate::api::conn::{self, ConnLimits, HostAddrs};
use crate::api::{AppState, router};
use crate::cluster::identity::{self, Identity};
use crate::cluster::{Cluster, ClusterSettings, HttpTransport, host, lease, manager};
use crate::metrics::Metrics;
use crate::readiness::{Phase, Readiness};
use crate::service::{JoinReply, JoinRequest, Service, ServiceSettings};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The URL other hosts and clients use to reach this one (default `http://LISTEN`).
    pub advertise: Option<String>,
    /// The ID of a host that bootstraps a new cluster (joining hosts get one from the cluster).
    pub node_id: NodeId,
    pub node_name: String,
    pub role: HostRole,
    /// Join an existing cluster through this host, with this token.
    pub join: Option<JoinTarget>,
    pub accel: AccelSetting,
    pub qemu_binary: String,
    /// A directory built by `scripts/build-demo-image.sh`, registered as image `demo`.
    pub demo_image: Option<PathBuf>,
    /// The first admin's password on a new data dir; generated and printed when absent.
    pub admin_password: Option<String>,
    pub raft: RaftSettings,
    pub cluster: ClusterSettings,
    pub service: ServiceSettings,
    pub host: HostSettings,
    /// The `novacron` binary, to run the fencing watchdog beside this host (`None`: none, for
    /// nodes inside a test process).
    pub watchdog_exe: Option<PathBuf>,
    /// Caps and timeouts of the API's connections.
    pub http: ConnLimits,
}

/// What this host offers to VMs, recorded in its host record at every start.
#[derive(Clone, Debug)]
pub struct HostSettings {
    /// Labels placement rules can require (`zone=a`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// vCPUs accepted, in percent of the host's CPUs.
    pub cpu_overcommit_pct: u32,
    /// Guest memory accepted, in percent of the memory left after the reserve.
    pub memory_overcommit_pct: u32,
    /// Memory kept for the host itself.
    pub reserved_memory_mib: u64,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            labels: Default::default(),
            cpu_overcommit_pct: 400,
            memory_overcommit_pct: 100,
            reserved_memory_mib: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct JoinTarget {
    /// API address of any member (`http://host:port`).
    pub address: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data dir {path}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] novacron_state::raft::StateError),
    #[error("{0}")]
    Startup(String),
}

/// How long a graceful stop waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs a node until `shutdown` resolves. QEMU processes keep running after it returns.
///
/// The API is served from the start (a joining host must answer the leader to catch up), but
/// `/readyz` says ready, and the "listening on" line is printed, only once the host has caught
/// up, recorded the bootstrap and re-adopted its VMs (see [`crate::readiness`]).
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let dirs = ["raft", "vms", "images"].map(|d| cfg.data_dir.join(d));
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|source| NodeError::DataDir {
            path: d.display().to_string(),
            source,
        })?;
    }
    let [raft_dir, vms_dir, images_dir] = dirs;
    // Imports a crash cut short: never recorded, so nothing refers to them.
    for left in novacron_hypervisor::durable::remove_partials(&images_dir) {
        tracing::info!(path = %left.display(), "removed an image copy a crash cut short");
    }
    cfg.cluster.validate().map_err(NodeError::Startup)?;
    cfg.http.validate().map_err(NodeError::Startup)?;
    let fd_limit = conn::raise_nofile_limit();
    let http_limits = cfg.http.within_fd_limit(fd_limit);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| NodeError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let api_address = cfg
        .advertise
        .clone()
        .map(|a| a.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("http://{local}"));

    let (identity, mode) = establish_identity(&cfg, &api_address).await?;
    let node_id = NodeId(identity.node_id);
    // Outgoing host-to-host connections leave from the listen address, so peers (and fault
    // injectors in tests) can tell hosts apart.
    let local_ip = (!local.ip().is_unspecified()).then_some(local.ip());
    let transport = HttpTransport::new(identity.cluster_secret.clone(), local_ip);
    let state = StateHandle::open(
        &raft_dir,
        node_id,
        api_address.clone(),
        &cfg.raft,
        Arc::new(transport.clone()),
        mode,
    )
    .await?;

    let (hv, accel_name): (Arc<dyn Hypervisor>, &str) = match identity.role {
        HostRole::Witness => (Arc::new(NoHypervisor::default()), "none"),
        HostRole::Full => {
            let probe_kernel = cfg
                .demo_image
                .as_ref()
                .map(|d| d.join("vmlinuz"))
                .filter(|p| p.exists());
            let accel = accel::resolve(cfg.accel, &cfg.qemu_binary, probe_kernel.as_deref()).await;
            let hv = QemuHypervisor::new(QemuConfig {
                vms_root: vms_dir,
                qemu_binary: cfg.qemu_binary.clone(),
                accel,
                start_timeout: Duration::from_secs(30),
                console_max_bytes: cfg.service.console_max_bytes,
            })
            .await
            .map_err(|e| NodeError::Startup(e.to_string()))?;
            (Arc::new(hv), accel.as_str())
        }
    };
    let cluster = Arc::new(Cluster::new(
        &identity,
        api_address.clone(),
        cfg.cluster.clone(),
        transport,
        state.clone(),
    ));
    let metrics = Arc::new(Metrics::new());
    let service = Service::new(
        state.clone(),
        cluster.clone(),
        hv.clone(),
        cfg.data_dir.clone(),
        images_dir,
        metrics.clone(),
        cfg.service.clone(),
    );

    // Serve before waiting for Raft: a joining host must answer the leader to catch up.
    let readiness = Readiness::default();
    let app = router(AppState::new(service.clone(), readiness.clone()));
    let hosts = HostAddrs::default();
    tokio::spawn(track_host_addresses(
        state.clone(),
        hosts.clone(),
        cfg.join.as_ref().map(|j| j.address.clone()),
    ));
    let stopping = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.set(Phase::Stopping);
    };
    let server = tokio::spawn(conn::serve(
        listener,
        app,
        http_limits,
        hosts,
        metrics.clone(),
        shutdown,
        DRAIN,
    ));
    let ready_timeout = if mode == StartMode::Join {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    };
    state
        .wait_ready(ready_timeout)
        .await
        .map_err(|e| NodeError::Startup(e.message))?;
    readiness.set(Phase::CatchingUp);
    catch_up(&state, ready_timeout).await?;
    readiness.set(Phase::Bootstrapping);

    // Observed state: every change the driver reports is recorded in the replicated state.
    let mut changes = hv.subscribe();
    let observer = service.clone();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(change) => observer.on_state_change(change).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("missed {n} VM state changes; re-reading every VM");
                    observer.readopt_vms().await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    if let Some(password) = service
        .bootstrap(cfg.admin_password.clone())
        .await
        .map_err(|e| NodeError::Startup(e.message))?
    {
        println!("novacron: created user 'admin' with generated password: {password}");
        println!(
            "novacron: (shown once; set NOVACRON_ADMIN_PASSWORD on a new data dir to choose it)"
        );
    }
    let info = hv.info();
    let registered_at = state
        .read(|s| s.nodes.get(&node_id.0).map(|n| n.registered_at))
        .unwrap_or_else(now_millis);
    let node = NodeInfo {
        id: node_id,
        name: cfg.node_name.clone(),
        api_address: api_address.clone(),
        qemu_version: info.qemu_version,
        accelerator: info.accelerator,
        cpus: host::cpus(),
        memory_mib: host::meminfo().0,
        registered_at,
        labels: cfg.host.labels.clone(),
        role: identity.role,
        cpu_overcommit_pct: cfg.host.cpu_overcommit_pct,
        memory_overcommit_pct: cfg.host.memory_overcommit_pct,
        reserved_memory_mib: cfg.host.reserved_memory_mib,
        // Kept from the stored record by `apply`.
        maintenance: false,
    };
    state
        .propose(CommandV1::RegisterNode { node })
        .await
        .map_err(|e| NodeError::Startup(e.message))?;
    if let Some(dir) = cfg
        .demo_image
        .as_ref()
        .filter(|_| identity.role == HostRole::Full)
    {
        if dir.join("image.json").exists() {
            service
                .register_demo_image(dir)
                .await
                .map_err(|e| NodeError::Startup(e.message))?;
        } else {
            tracing::warn!(dir = %dir.display(), "no demo image there; run scripts/build-demo-image.sh");
        }
    }
    service.fail_interrupted_operations().await;
    // Finished operations are pruned by age and by count, so the state stays bounded.
    let pruner = service.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            // One host prunes: the leader (others would only be told they are not).
            if pruner.state().metrics().role == "leader" {
                pruner.prune_operations().await;
            }
        }
    });
    service.readopt_vms().await;
    // Needs the re-adopted QEMUs; may wait on other hosts, so it does not hold up the start.
    let cleaner = service.clone();
    tokio::spawn(async move { cleaner.clean_up_after_restart().await });
    let mover = service.clone();
    tokio::spawn(async move { mover.recover_volume_moves().await });
    let watchdog = crate::watchdog::Watchdog::new(
        cfg.data_dir.clone(),
        cfg.watchdog_exe
            .clone()
            .filter(|_| identity.role == HostRole::Full),
    );
    tokio::spawn(lease::run(
        service.cluster().clone(),
        service.hypervisor().clone(),
        Arc::new(service.clone()),
        watchdog.clone(),
    ));
    tokio::spawn(crate::service::ha::run(service.clone()));
    if identity.role == HostRole::Full {
        tokio::spawn(crate::service::stats::run(service.clone()));
        tokio::spawn(crate::service::volumes::watch_pressure(service.clone()));
        tokio::spawn(crate::service::tiering::run(service.clone()));
    }
    tokio::spawn(manager::run(cluster.clone()));

    readiness.set(Phase::Ready);
    // A stop asked for during start-up wins: no "listening" line for a host on its way out.
    if readiness.phase() == Phase::Ready {
        println!(
            "novacron: node {node_id} listening on {api_address} (bound {local}, accelerator {accel_name}, role {})",
            identity.role.as_str()
        );
        tracing::info!(%api_address, "ready");
    }
    server
        .await
        .map_err(|e| NodeError::Startup(format!("HTTP server task: {e}")))?;
    hv.detach_all().await;
    // The last word to the fencing watchdog: it exits now unless a VM here needs fencing.
    watchdog.stop().await;
    state.shutdown().await;
    Ok(())
}

/// Applies the log up to the leader's commit index as it is now: a linearizable read waits for
/// exactly that. Retried while no leader answers (an election at start-up).
async fn catch_up(state: &StateHandle, within: Duration) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match state.read_linearizable(|_| ()).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("catching up with the leader: {}", e.message);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(NodeError::Startup(format!(
                    "could not catch up with the leader within {}s: {}",
                    within.as_secs(),
                    e.message
                )));
            }
        }
    }
}

/// Keeps the set of the cluster's host addresses current for the connection caps (hosts are
/// exempt from the public ones): the host records, the Raft members and, until it has caught
/// up, the host this one joined through. Names are resolved again every 30 s (DNS changes, or
/// a failure at boot).
async fn track_host_addresses(
    state: StateHandle,
    hosts: HostAddrs,
    joined_through: Option<String>,
) {
    let mut known: Vec<String> = Vec::new();
    let mut resolved_at: Option<tokio::time::Instant> = None;
    loop {
        let mut addrs: Vec<String> =
            state.read(|s| s.nodes.values().map(|n| n.api_address.clone()).collect());
        addrs.extend(
            state
                .membership()
                .nodes
                .values()
                .map(|a| a.api_addr.clone()),
        );
        addrs.extend(joined_through.clone());
        addrs.sort();
        addrs.dedup();
        let stale = resolved_at.is_none_or(|t| t.elapsed() > Duration::from_secs(30));
        if addrs != known || stale {
            hosts.set(conn::resolve_hosts(addrs.clone()).await);
            known = addrs;
            resolved_at = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads this host's identity, or makes one: by bootstrapping a new cluster, or by joining one
/// with a token.
async fn establish_identity(
    cfg: &NodeConfig,
    api_address: &str,
) -> Result<(Identity, StartMode), NodeError> {
    let existing = Identity::load(&cfg.data_dir).map_err(NodeError::Startup)?;
    if let Some(id) = existing {
        if cfg.join.is_some() {
            tracing::warn!(
                node = id.node_id,
                "this data dir already belongs to a cluster; ignoring --join"
            );
        }
        let mode = if id.joined {
            StartMode::Join
        } else {
            StartMode::Bootstrap
        };
        return Ok((id, mode));
    }
    let id = match &cfg.join {
        Some(target) => {
            let reply = request_join(cfg, target, api_address).await?;
            tracing::info!(node = %reply.node_id, "joined the cluster");
            Identity::joined(reply.node_id.0, cfg.role, reply.cluster_secret)
        }
        None => Identity::new(cfg.node_id.0, cfg.role, identity::new_secret()),
    };
    id.save(&cfg.data_dir).map_err(NodeError::Startup)?;
    let mode = if id.joined {
        StartMode::Join
    } else {
        StartMode::Bootstrap
    };
    Ok((id, mode))
}

async fn request_join(
    cfg: &NodeConfig,
    target: &JoinTarget,
    api_address: &str,
) -> Result<JoinReply, NodeError> {
    let req = JoinRequest {
        token: target.token.clone(),
        name: cfg.node_name.clone(),
        api_address: api_address.to_string(),
        role: cfg.role,
        qemu_version: String::new(),
        accelerator: String::new(),
        cpus: host::cpus(),
        memory_mib: host::meminfo().0,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| NodeError::Startup(e.to_string()))?;
    let url = format!(
        "{}/api/v1/cluster/join",
        target.address.trim_end_matches('/')
    );
    // The host we join through may still be starting: retry connection failures for a while.
    let mut attempts = 0;
    let resp = loop {
        match client.post(&url).json(&req).send().await {
            Ok(r) => break r,
            Err(e) if e.is_connect() && attempts < 30 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(NodeError::Startup(format!(
                    "cannot reach {} to join: {e}",
                    target.address
                )));
            }
        }
    };
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        let msg = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(NodeError::Startup(format!(
            "joining through {} failed: {msg}",
            target.address
        )));
    }
    serde_json::from_slice(&body).map_err(|e| NodeError::Startup(format!("join reply: {e}")))
}
