//! `novacron serve`: flags, environment and an optional TOML file, merged in that order of
//! precedence, into a node configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;

use novacron_hypervisor::accel::AccelSetting;
use novacron_server::api::conn::ConnLimits;
use novacron_server::cluster::ClusterSettings;
use novacron_server::node::{self, HostSettings, JoinTarget, NodeConfig};
use novacron_server::service::ServiceSettings;
use novacron_state::RaftSettings;
use novacron_types::{HostRole, NodeId, PlacementStrategy};

#[derive(Parser, Debug, Clone)]
pub struct ServeArgs {
    /// Where the node keeps its state, VM disks and images.
    #[arg(long, env = "NOVACRON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the API (port 0 picks a free port; the chosen one is printed).
    #[arg(long, env = "NOVACRON_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A TOML file with the same settings (flags and environment win).
    #[arg(long, env = "NOVACRON_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// kvm, tcg or auto (auto boots a probe guest under KVM before trusting it).
    #[arg(long, env = "NOVACRON_ACCEL")]
    pub accel: Option<String>,
    #[arg(long, env = "NOVACRON_QEMU")]
    pub qemu: Option<String>,
    /// Directory of the demo image (built by scripts/build-demo-image.sh).
    #[arg(long, env = "NOVACRON_DEMO_IMAGE")]
    pub demo_image: Option<PathBuf>,
    /// ID of a host that bootstraps a new cluster (joining hosts are given one).
    #[arg(long, env = "NOVACRON_NODE_ID")]
    pub node_id: Option<u64>,
    /// URL other hosts and clients use for this host (default: http://LISTEN).
    #[arg(long, env = "NOVACRON_ADVERTISE")]
    pub advertise: Option<String>,
    /// Join an existing cluster through this member's API address (needs --token).
    #[arg(long, env = "NOVACRON_JOIN", requires = "token")]
    pub join: Option<String>,
    /// One-time join token from `novacron cluster token`.
    #[arg(long, env = "NOVACRON_JOIN_TOKEN")]
    pub token: Option<String>,
    /// full (runs VMs) or witness (only votes and keeps the Raft log).
    #[arg(long, env = "NOVACRON_ROLE")]
    pub role: Option<String>,
    /// Voters the cluster aims for (3 or 5).
    #[arg(long, env = "NOVACRON_TARGET_VOTERS")]
    pub target_voters: Option<usize>,
    /// Lease length in milliseconds: a host that cannot renew its lease fences itself first.
    #[arg(long, env = "NOVACRON_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Heartbeat (lease renewal) interval in milliseconds.
    #[arg(long, env = "NOVACRON_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A host not heard from for this many milliseconds is offline.
    #[arg(long, env = "NOVACRON_OFFLINE_AFTER_MS")]
    pub offline_after_ms: Option<u64>,
    /// What an isolated host does to its VMs: pause, stop or none.
    #[arg(long, env = "NOVACRON_FENCING")]
    pub fencing: Option<String>,
    /// Raft election timeout (minimum, ms); the maximum is twice this.
    #[arg(long, env = "NOVACRON_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    #[arg(long, env = "NOVACRON_NODE_NAME")]
    pub node_name: Option<String>,
    /// A label of this host that placement rules can require, KEY=VALUE (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// vCPUs this host accepts per CPU (default 4).
    #[arg(long, env = "NOVACRON_CPU_OVERCOMMIT")]
    pub cpu_overcommit: Option<f64>,
    /// Guest memory this host accepts per MiB after the reserve (default 1: no overcommit).
    #[arg(long, env = "NOVACRON_MEMORY_OVERCOMMIT")]
    pub memory_overcommit: Option<f64>,
    /// Memory kept for the host itself, in MiB (default 0).
    #[arg(long, env = "NOVACRON_RESERVED_MEMORY_MIB")]
    pub reserved_memory_mib: Option<u64>,
    /// How this host places VMs when a request names no host: spread or pack.
    #[arg(long, env = "NOVACRON_PLACEMENT")]
    pub placement: Option<String>,
    /// Default RAM bandwidth cap of live migrations from this host, MiB/s (default 1024).
    #[arg(long, env = "NOVACRON_MIGRATION_BANDWIDTH_MIB")]
    pub migration_bandwidth_mib: Option<u64>,
    /// Default planned switch-over pause of live migrations, ms (default 300).
    #[arg(long, env = "NOVACRON_MIGRATION_DOWNTIME_MS")]
    pub migration_downtime_ms: Option<u64>,
    /// Default seconds a live migration may take before its timeout action (default 600).
    #[arg(long, env = "NOVACRON_MIGRATION_TIMEOUT")]
    pub migration_timeout: Option<u64>,
    /// Live migrations this host sends at once (default 2).
    #[arg(long, env = "NOVACRON_MAX_OUTGOING_MIGRATIONS")]
    pub max_outgoing_migrations: Option<usize>,
    /// Live migrations this host receives at once (default 2).
    #[arg(long, env = "NOVACRON_MAX_INCOMING_MIGRATIONS")]
    pub max_incoming_migrations: Option<usize>,
    /// Seconds a graceful stop waits for the guest before forcing it off.
    #[arg(long, env = "NOVACRON_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Seconds between two samples of every running VM's disk I/O counters (default 10).
    #[arg(long, env = "NOVACRON_STATS_INTERVAL")]
    pub stats_interval: Option<u64>,
    /// Raft: build a snapshot after this many log entries.
    #[arg(long, env = "NOVACRON_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// API connections from outside the cluster, over all clients (default 4096).
    #[arg(long, env = "NOVACRON_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// API connections from one client address outside the cluster (default 256).
    #[arg(long, env = "NOVACRON_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a connection may take to send its request headers, and may stay idle between
    /// two requests, before it is closed (default 15).
    #[arg(long, env = "NOVACRON_HEADER_TIMEOUT")]
    pub header_timeout: Option<u64>,
    /// A VM's console log is rotated to console.log.1 past this size, in MiB (default 4).
    #[arg(long, env = "NOVACRON_CONSOLE_LOG_MAX_MIB")]
    pub console_log_max_mib: Option<u64>,
    /// Days finished operations are kept (default 7).
    #[arg(long, env = "NOVACRON_OPERATIONS_RETENTION_DAYS")]
    pub operations_retention_days: Option<u64>,
    /// Finished operations kept at most; the oldest go first (default 10000).
    #[arg(long, env = "NOVACRON_OPERATIONS_MAX")]
    pub operations_max: Option<u64>,
    /// How much to log: a level (error, warn, info, debug, trace) for NovaCron's own messages,
    /// with libraries kept at warn; or a full filter in tracing's syntax
    /// (`info,openraft=debug`). RUST_LOG, when set, wins.
    #[arg(
        long = "log-level",
        visible_alias = "log",
        env = "NOVACRON_LOG",
        default_value = "info"
    )]
    pub log: String,
    /// Logs as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    accel: Option<String>,
    qemu: Option<String>,
    demo_image: Option<PathBuf>,
    node_id: Option<u64>,
    node_name: Option<String>,
    shutdown_timeout: Option<u64>,
    stats_interval: Option<u64>,
    snapshot_every: Option<u64>,
    advertise: Option<String>,
    role: Option<String>,
    target_voters: Option<usize>,
    lease_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    offline_after_ms: Option<u64>,
    fencing: Option<String>,
    election_timeout_ms: Option<u64>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    cpu_overcommit: Option<f64>,
    memory_overcommit: Option<f64>,
    reserved_memory_mib: Option<u64>,
    placement: Option<String>,
    migration_bandwidth_mib: Option<u64>,
    migration_downtime_ms: Option<u64>,
    migration_timeout: Option<u64>,
    max_outgoing_migrations: Option<usize>,
    max_incoming_migrations: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    header_timeout: Option<u64>,
    console_log_max_mib: Option<u64>,
    operations_retention_days: Option<u64>,
    operations_max: Option<u64>,
}

/// `2.5` → 250 (percent), for ratios between 0.1 and 100.
fn ratio_pct(flag: &str, r: f64) -> anyhow::Result<u32> {
    if !(0.1..=100.0).contains(&r) {
        anyhow::bail!("--{flag} must be between 0.1 and 100 (got {r})");
    }
    Ok((r * 100.0).round() as u32)
}

fn config(args: ServeArgs) -> anyhow::Result<NodeConfig> {
    let file: ServeFile = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => ServeFile::default(),
    };
    let accel: AccelSetting = args
        .accel
        .or(file.accel)
        .unwrap_or_else(|| "auto".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let node_id = args.node_id.or(file.node_id).unwrap_or(1);
    if node_id == 0 {
        anyhow::bail!("--node-id must be at least 1");
    }
    let mut raft = RaftSettings::default();
    if let Some(n) = args.snapshot_every.or(file.snapshot_every) {
        if n == 0 {
            anyhow::bail!("--snapshot-every must be at least 1");
        }
        raft.snapshot_every = n;
    }
    if let Some(ms) = args.election_timeout_ms.or(file.election_timeout_ms) {
        if ms < 20 {
            anyhow::bail!("--election-timeout-ms must be at least 20");
        }
        raft.election_timeout_min_ms = ms;
        raft.election_timeout_max_ms = ms * 2;
        raft.heartbeat_ms = raft.heartbeat_ms.min(ms / 3).max(5);
    }
    let mut cluster = ClusterSettings::default();
    if let Some(n) = args.target_voters.or(file.target_voters) {
        cluster.target_voters = n;
    }
    if let Some(ms) = args.lease_ms.or(file.lease_ms) {
        cluster.lease = Duration::from_millis(ms);
        cluster.fence_budget = cluster.lease / 3;
        cluster.ha_margin = cluster.lease / 3;
    }
    if let Some(ms) = args.heartbeat_ms.or(file.heartbeat_ms) {
        cluster.heartbeat = Duration::from_millis(ms);
    }
    if let Some(ms) = args.offline_after_ms.or(file.offline_after_ms) {
        cluster.offline_after = Duration::from_millis(ms);
    }
    if let Some(f) = args.fencing.or(file.fencing) {
        cluster.fencing = f.parse().map_err(anyhow::Error::msg)?;
    }
    cluster.validate().map_err(anyhow::Error::msg)?;
    let role: HostRole = args
        .role
        .or(file.role)
        .map(|r| r.parse())
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    let join = match (args.join, args.token) {
        (Some(address), Some(token)) => Some(JoinTarget { address, token }),
        (None, Some(_)) => anyhow::bail!("--token needs --join ADDRESS"),
        _ => None,
    };
    let mut host = HostSettings {
        labels: file.labels,
        ..HostSettings::default()
    };
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label expects KEY=VALUE, got '{l}'"))?;
        host.labels.insert(k.to_string(), v.to_string());
    }
    novacron_types::validate::labels(host.labels.iter().map(|(k, v)| (k, Some(v))))
        .map_err(|e| anyhow::anyhow!("--label: {}", e.message))?;
    if let Some(r) = args.cpu_overcommit.or(file.cpu_overcommit) {
        host.cpu_overcommit_pct = ratio_pct("cpu-overcommit", r)?;
    }
    if let Some(r) = args.memory_overcommit.or(file.memory_overcommit) {
        host.memory_overcommit_pct = ratio_pct("memory-overcommit", r)?;
    }
    if let Some(m) = args.reserved_memory_mib.or(file.reserved_memory_mib) {
        host.reserved_memory_mib = m;
    }
    let mut service = ServiceSettings::default();
    match args.placement.or(file.placement).as_deref() {
        None => {}
        Some("spread") => service.placement = PlacementStrategy::Spread,
        Some("pack") => service.placement = PlacementStrategy::Pack,
        Some(other) => anyhow::bail!("--placement must be spread or pack, not '{other}'"),
    }
    let m = &mut service.migration;
    if let Some(v) = args
        .migration_bandwidth_mib
        .or(file.migration_bandwidth_mib)
    {
        anyhow::ensure!(v >= 1, "--migration-bandwidth-mib must be at least 1");
        m.max_bandwidth_mib = v;
    }
    if let Some(v) = args.migration_downtime_ms.or(file.migration_downtime_ms) {
        anyhow::ensure!(v >= 1, "--migration-downtime-ms must be at least 1");
        m.downtime_limit_ms = v;
    }
    if let Some(v) = args.migration_timeout.or(file.migration_timeout) {
        anyhow::ensure!(v >= 1, "--migration-timeout must be at least 1");
        m.timeout = Duration::from_secs(v);
    }
    if let Some(v) = args
        .max_outgoing_migrations
        .or(file.max_outgoing_migrations)
    {
        anyhow::ensure!(v >= 1, "--max-outgoing-migrations must be at least 1");
        m.max_outgoing = v;
    }
    if let Some(v) = args
        .max_incoming_migrations
        .or(file.max_incoming_migrations)
    {
        anyhow::ensure!(v >= 1, "--max-incoming-migrations must be at least 1");
        m.max_incoming = v;
    }
    if let Some(s) = args.shutdown_timeout.or(file.shutdown_timeout) {
        service.shutdown_timeout = Duration::from_secs(s);
    }
    if let Some(s) = args.stats_interval.or(file.stats_interval) {
        if !(1..=3600).contains(&s) {
            anyhow::bail!("--stats-interval must be between 1 and 3600 seconds (got {s})");
        }
        service.stats_interval = Duration::from_secs(s);
    }
    if let Some(m) = args.console_log_max_mib.or(file.console_log_max_mib) {
        anyhow::ensure!(
            (1..=1024).contains(&m),
            "--console-log-max-mib must be between 1 and 1024 (got {m})"
        );
        service.console_max_bytes = m << 20;
    }
    if let Some(d) = args
        .operations_retention_days
        .or(file.operations_retention_days)
    {
        anyhow::ensure!(
            (1..=3650).contains(&d),
            "--operations-retention-days must be between 1 and 3650 (got {d})"
        );
        service.operations_retention = Duration::from_secs(d * 24 * 3600);
    }
    if let Some(n) = args.operations_max.or(file.operations_max) {
        anyhow::ensure!(
            (10..=1_000_000).contains(&n),
            "--operations-max must be between 10 and 1000000 (got {n})"
        );
        service.operations_max = n;
    }
    let mut http = ConnLimits::default();
    if let Some(n) = args.max_connections.or(file.max_connections) {
        http.max_connections = n;
    }
    if let Some(n) = args.max_connections_per_ip.or(file.max_connections_per_ip) {
        http.max_per_ip = n;
    }
    if let Some(s) = args.header_timeout.or(file.header_timeout) {
        http.header_timeout = Duration::from_secs(s);
    }
    http.validate().map_err(anyhow::Error::msg)?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(".novacron/data"));
    let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
    Ok(NodeConfig {
        data_dir,
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
        node_id: NodeId(node_id),
        advertise: args.advertise.or(file.advertise),
        role,
        join,
        cluster,
        host,
        watchdog_exe: std::env::current_exe().ok(),
        http,
        node_name: args
            .node_name
            .or(file.node_name)
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| format!("node-{node_id}")),
        accel,
        qemu_binary: args
            .qemu
            .or(file.qemu)
            .unwrap_or_else(|| "qemu-system-x86_64".into()),
        // Set-up builds the demo image here; a node started from the checkout registers it.
        demo_image: args.demo_image.or(file.demo_image).or_else(|| {
            let default = PathBuf::from(".novacron/demo-image");
            default
                .join("image.json")
                .exists()
                .then(|| std::path::absolute(&default).unwrap_or(default))
        }),
        admin_password: std::env::var("NOVACRON_ADMIN_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        raft,
        service,
    })
}

/// NovaCron's own crates, whose messages a bare `--log-level` applies to.
const OWN_TARGETS: [&str; 6] = [
    "novacron",
    "novacron_server",
    "novacron_state",
    "novacron_hypervisor",
    "novacron_tiering",
    "novacron_types",
];

/// A bare level applies to NovaCron's own messages and leaves libraries (hyper, ...) at `warn`
/// and openraft at `error`: dozens of openraft lines per election help nobody running a host. Anything else
/// is a filter in tracing's syntax, used as given.
fn log_filter(level: &str) -> String {
    let bare = ["error", "warn", "info", "debug", "trace", "off"];
    if !bare.contains(&level.trim()) {
        return level.to_string();
    }
    // openraft warns about routine events (a vote changing at start-up): errors only.
    let mut filter = String::from("warn,openraft=error");
    for target in OWN_TARGETS {
        filter.push_str(&format!(",{target}={}", level.trim()));
    }
    filter
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(log_filter(&args.log)))
        .context("bad --log-level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let cfg = config(args)?;
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down; VMs keep running and are re-adopted on the next start");
    };
    node::run(cfg, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(extra);
        ServeArgs::try_parse_from(argv).expect("args")
    }

    #[test]
    fn flags_win_over_the_config_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("novacron.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9999\"\naccel = \"tcg\"\nshutdown_timeout = 7\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8");
        let cfg = config(args(&["--config", f, "--data-dir", "/tmp/x"])).expect("config");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(cfg.accel, AccelSetting::Tcg);
        assert_eq!(cfg.service.shutdown_timeout, Duration::from_secs(7));
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        let cfg = config(args(&[
            "--config",
            f,
            "--listen",
            "127.0.0.1:1",
            "--accel",
            "kvm",
        ]))
        .expect("config");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:1");
        assert_eq!(cfg.accel, AccelSetting::Kvm);
    }

    #[test]
    fn a_bare_log_level_is_for_novacron_and_libraries_stay_at_warn() {
        let f = log_filter("info");
        assert!(f.starts_with("warn,"), "{f}");
        assert!(f.contains("novacron_server=info"), "{f}");
        assert!(f.contains("openraft=error"), "{f}");
        assert_eq!(log_filter("info,openraft=debug"), "info,openraft=debug");
        tracing_subscriber::EnvFilter::try_new(log_filter("debug")).expect("valid filter");
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let e = config(args(&["--accel", "warp"])).expect_err("accel");
        assert!(e.to_string().contains("kvm, tcg or auto"), "{e}");
        let e = config(args(&["--node-id", "0"])).expect_err("node id");
        assert!(e.to_string().contains("node-id"), "{e}");
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "colour = \"red\"\n").expect("write");
        let e = config(args(&["--config", file.to_str().expect("utf8")])).expect_err("unknown key");
        assert!(format!("{e:#}").contains("colour"), "{e:#}");
    }
}
