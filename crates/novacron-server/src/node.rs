//! Starting a node: open the replicated state, bootstrap a new cluster, start the hypervisor
//! driver, re-adopt running VMs, and serve the API until asked to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use novacron_hypervisor::Hypervisor;
use novacron_hypervisor::accel::{self, AccelSetting};
use novacron_hypervisor::qemu::{QemuConfig, QemuHypervisor};
use novacron_state::{CommandV1, RaftSettings, StateHandle};
use novacron_types::{NodeId, NodeInfo, now_millis};

use crate::api::{AppState, router};
use crate::metrics::Metrics;
use crate::service::{Service, ServiceSettings};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub node_id: NodeId,
    pub node_name: String,
    pub accel: AccelSetting,
    pub qemu_binary: String,
    /// A directory built by `scripts/build-demo-image.sh`, registered as image `demo`.
    pub demo_image: Option<PathBuf>,
    /// The first admin's password on a new data dir; generated and printed when absent.
    pub admin_password: Option<String>,
    pub raft: RaftSettings,
    pub service: ServiceSettings,
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

/// Runs a node until `shutdown` resolves. QEMU processes keep running after it returns.
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
    let api_address = format!("http://{local}");

    let state = StateHandle::open(&raft_dir, cfg.node_id, api_address.clone(), &cfg.raft).await?;
    state
        .wait_ready(Duration::from_secs(30))
        .await
        .map_err(|e| NodeError::Startup(e.message))?;

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
    })
    .await
    .map_err(|e| NodeError::Startup(e.to_string()))?;
    let hv: Arc<dyn Hypervisor> = Arc::new(hv);
    let metrics = Arc::new(Metrics::new());
    let service = Service::new(
        state.clone(),
        hv.clone(),
        images_dir,
        metrics,
        cfg.service.clone(),
    );

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
    let node = NodeInfo {
        id: cfg.node_id,
        name: cfg.node_name.clone(),
        api_address: api_address.clone(),
        qemu_version: info.qemu_version,
        accelerator: info.accelerator,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_mib: host_memory_mib(),
        registered_at: now_millis(),
        labels: Default::default(),
    };
    state
        .propose(CommandV1::RegisterNode { node })
        .await
        .map_err(|e| NodeError::Startup(e.message))?;
    if let Some(dir) = &cfg.demo_image {
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
    // Finished operations are kept for a week, then pruned, so the state stays bounded.
    let pruner = service.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            // One host prunes: the leader (others would only be told they are not).
            if pruner.state().metrics().role == "leader" {
                pruner
                    .prune_operations(Duration::from_secs(7 * 24 * 3600))
                    .await;
            }
        }
    });
    service.readopt_vms().await;

    println!(
        "novacron: node {} listening on {api_address} (accelerator {})",
        cfg.node_id,
        accel.as_str()
    );
    tracing::info!(%api_address, "serving");
    let app = router(AppState::new(service.clone()));
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    hv.detach_all().await;
    state.shutdown().await;
    served.map_err(|e| NodeError::Startup(format!("HTTP server: {e}")))
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
