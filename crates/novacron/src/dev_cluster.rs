//! `novacron dev-cluster`: N hosts as separate `novacron serve` processes on loopback, each with
//! its own data dir, joined into one cluster; stopped together on Ctrl-C.
//!
//! Ports are chosen once and kept in `BASE/cluster.json`, so running it again restarts the same
//! cluster (Raft remembers each member's address). A host that exits (killed to watch failover
//! and HA, say) leaves the others running: it is restarted by the `--restart` policy, or by
//! running `dev-cluster` again, which starts only the hosts that are not running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use novacron_client::Client;
use novacron_server::service::{JoinTokenCreated, JoinTokenRequest};
use novacron_types::HostRole;

#[derive(Parser, Debug, Clone)]
pub struct DevClusterArgs {
    /// Full hosts to run (1 to 9).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Also run a witness host (votes, keeps the log, runs no VMs).
    #[arg(long)]
    pub witness: bool,
    /// Where the hosts' data dirs live.
    #[arg(long, default_value = ".novacron/dev-cluster")]
    pub base_dir: PathBuf,
    /// Delete the base dir first (a new cluster; stops nothing that is running).
    #[arg(long)]
    pub fresh: bool,
    /// Loopback address the hosts listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: std::net::IpAddr,
    /// What to do when a host exits: no (report it; the others keep running), on-failure
    /// (start it again unless it stopped cleanly) or always.
    #[arg(long, default_value = "no", value_parser = ["no", "on-failure", "always"])]
    pub restart: String,
    /// Extra arguments for every `novacron serve` (for example --accel tcg).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

#[derive(Serialize, Deserialize, Default)]
struct Layout {
    /// host index (1-based) -> port
    ports: Vec<u16>,
    witness_port: Option<u16>,
    admin_password: String,
}

/// Where a host is, as the supervisor sees it.
enum State {
    /// Started; its "listening on" line (printed once it is ready) has not come yet.
    Starting {
        since: Instant,
    },
    Up,
    /// Exited; started again at `at` (the restart policy).
    Waiting {
        at: Instant,
    },
    /// Exited and left down.
    Down,
}

struct Host {
    name: String,
    role: HostRole,
    listen: std::net::SocketAddr,
    /// `novacron serve` arguments besides the data dir, address and name (a first start of a
    /// joining host has `--join`; restarts do not).
    extra: Vec<String>,
    child: Option<Child>,
    /// Its standard output lines (also in its log file), watched for "listening on".
    lines: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    state: State,
    started: Instant,
    /// Wait before the next restart (doubles while it keeps exiting soon after starting).
    backoff: Duration,
}

/// How long a host may take to become ready before it is given up on.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl Host {
    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn running(&self) -> bool {
        matches!(self.state, State::Starting { .. } | State::Up)
    }

    /// Starts `novacron serve` for this host; does not wait for it to be ready.
    fn start(&mut self, base: &Path, admin_password: &str) -> anyhow::Result<()> {
        let data = base.join(&self.name);
        std::fs::create_dir_all(&data)?;
        let exe = std::env::current_exe().context("locating the novacron binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(self.listen.to_string())
            .args(["--node-name", &self.name, "--role", self.role.as_str()])
            .args(&self.extra)
            .env("NOVACRON_ADMIN_PASSWORD", admin_password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C in the terminal reaches dev-cluster alone, which
            // then stops every host the same way (and a restart policy cannot mistake the
            // hosts' own clean exits for failures).
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting novacron serve")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("novacron.log"))?;
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(tokio::fs::File::from_std(log)));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Both streams go to the host's log file; stdout lines are also watched.
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, log.clone(), Some(tx)));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, log, None));
        }
        self.child = Some(child);
        self.lines = Some(rx);
        self.state = State::Starting {
            since: Instant::now(),
        };
        self.started = Instant::now();
        Ok(())
    }

    /// Moves a starting host to `Up` once it has printed its "listening on" line. Returns true
    /// when it just came up.
    fn check_ready(&mut self) -> bool {
        if !matches!(self.state, State::Starting { .. }) {
            return false;
        }
        let Some(rx) = self.lines.as_mut() else {
            return false;
        };
        while let Ok(line) = rx.try_recv() {
            if line.contains(" listening on ") {
                self.state = State::Up;
                return true;
            }
        }
        false
    }

    /// The exit status, once its process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    fn log_path(&self, base: &Path) -> PathBuf {
        base.join(&self.name).join("novacron.log")
    }
}

/// Whether a host already answers on `listen` (started by another `dev-cluster`, or by hand).
async fn already_running(listen: std::net::SocketAddr) -> bool {
    let probe = Client::new(&format!("http://{listen}"), None);
    tokio::time::timeout(
        Duration::from_secs(2),
        probe.get::<serde_json::Value>("/healthz"),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// Copies a child's output, line by line, into its log file (and to `lines`, if given).
async fn pump(
    from: impl tokio::io::AsyncRead + Unpin,
    log: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) {
    let mut reader = BufReader::new(from).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        let _ = log
            .lock()
            .await
            .write_all(format!("{line}\n").as_bytes())
            .await;
        if let Some(tx) = &lines {
            let _ = tx.send(line);
        }
    }
}

/// Ctrl-C and SIGTERM, listened to for dev-cluster's whole life (a signal that came while
/// nothing listened would be lost).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Waits until every host in `which` is up; false if a signal came first. A host that exits or
/// takes too long is an error naming its log.
async fn wait_up(
    hosts: &mut [Host],
    which: &[usize],
    base: &Path,
    signals: &mut Signals,
) -> anyhow::Result<bool> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = signals.recv() => return Ok(false),
            _ = tick.tick() => {}
        }
        let mut all_up = true;
        for &i in which {
            let h = &mut hosts[i];
            if h.check_ready() {
                eprintln!("{} is up on {}", h.name, h.url());
            }
            if let Some(status) = h.exited() {
                h.state = State::Down;
                bail!(
                    "host {} did not start ({}); see {} for why",
                    h.name,
                    describe(status),
                    h.log_path(base).display()
                );
            }
            if let State::Starting { since } = h.state {
                all_up = false;
                if since.elapsed() > START_TIMEOUT {
                    bail!(
                        "host {} did not get ready within {}s; see {}",
                        h.name,
                        START_TIMEOUT.as_secs(),
                        h.log_path(base).display()
                    );
                }
            }
        }
        if all_up {
            return Ok(true);
        }
    }
}

pub async fn run(args: DevClusterArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    if args.fresh && args.base_dir.exists() {
        std::fs::remove_dir_all(&args.base_dir)
            .with_context(|| format!("removing {}", args.base_dir.display()))?;
    }
    std::fs::create_dir_all(&args.base_dir)?;
    let base = std::path::absolute(&args.base_dir)?;
    let layout = load_layout(&base, &args)?;
    let password = layout.admin_password.clone();
    let mut signals = Signals::new()?;

    let mut plan: Vec<(String, HostRole, u16)> = (0..args.nodes)
        .map(|i| (format!("node-{}", i + 1), HostRole::Full, layout.ports[i]))
        .collect();
    if let (true, Some(p)) = (args.witness, layout.witness_port) {
        plan.push(("witness".into(), HostRole::Witness, p));
    }

    let mut hosts: Vec<Host> = Vec::new();
    let mut elsewhere: Vec<(String, HostRole, String)> = Vec::new();
    // Hosts that must join first (no identity yet) wait for a join token from a running host.
    let mut to_join: Vec<usize> = Vec::new();
    for (i, (name, role, port)) in plan.iter().enumerate() {
        let listen = std::net::SocketAddr::new(args.ip, *port);
        if already_running(listen).await {
            eprintln!("{name} is already running on http://{listen}; leaving it alone");
            elsewhere.push((name.clone(), *role, format!("http://{listen}")));
            continue;
        }
        hosts.push(Host {
            name: name.clone(),
            role: *role,
            listen,
            extra: args.serve_args.clone(),
            child: None,
            lines: None,
            state: State::Down,
            started: Instant::now(),
            backoff: Duration::from_secs(1),
        });
        let joined_before = base.join(name).join("identity.json").exists();
        if i > 0 && !joined_before {
            to_join.push(hosts.len() - 1);
        }
    }
    if hosts.is_empty() {
        println!("Every host is already running; nothing to do here.");
        return Ok(());
    }

    // Hosts with an identity (and a new cluster's first host) start at once, together: a
    // cluster that lost most of its voters needs them all back before any can be ready.
    let now: Vec<usize> = (0..hosts.len()).filter(|i| !to_join.contains(i)).collect();
    let started = async {
        for &i in &now {
            eprintln!("starting {} on {} ...", hosts[i].name, hosts[i].url());
            hosts[i].start(&base, &password)?;
        }
        if !wait_up(&mut hosts, &now, &base, &mut signals).await? {
            return Ok(false);
        }
        // New hosts join one at a time, with a token from the first host.
        let seed_url = format!("http://{}", std::net::SocketAddr::new(args.ip, plan[0].2));
        for &i in &to_join {
            let seed = Client::new(&seed_url, None);
            let token = seed
                .login("admin", &password)
                .await
                .context("logging in to the first host")?;
            let t: JoinTokenCreated = seed
                .with_token(token)
                .post(
                    "/api/v1/cluster/tokens",
                    &JoinTokenRequest {
                        role: Some(hosts[i].role),
                        ttl_seconds: Some(600),
                    },
                )
                .await
                .context("making a join token")?;
            let plain = hosts[i].extra.clone();
            hosts[i].extra.extend([
                "--join".to_string(),
                seed_url.clone(),
                "--token".to_string(),
                t.token,
            ]);
            eprintln!("starting {} on {} ...", hosts[i].name, hosts[i].url());
            hosts[i].start(&base, &password)?;
            // A joined host must not try to join again when restarted.
            hosts[i].extra = plain;
            if !wait_up(&mut hosts, &[i], &base, &mut signals).await? {
                return Ok(false);
            }
        }
        anyhow::Ok(true)
    }
    .await;
    match started {
        Ok(true) => {}
        Ok(false) => {
            stop_all(&mut hosts).await;
            return Ok(());
        }
        Err(e) => {
            stop_all(&mut hosts).await;
            return Err(e);
        }
    }

    println!(
        "NovaCron dev cluster: {} hosts",
        hosts.len() + elsewhere.len()
    );
    for h in &hosts {
        println!("  {:<8} {:<8} {}", h.name, h.role.as_str(), h.url());
    }
    for (name, role, url) in &elsewhere {
        println!(
            "  {:<8} {:<8} {url} (already running; not started here)",
            name,
            role.as_str()
        );
    }
    println!("admin password: {password}");
    let first = format!("http://{}", std::net::SocketAddr::new(args.ip, plan[0].2));
    println!(
        "log in with: novacron login --server {first} (logs in {}/<host>/novacron.log)",
        base.display()
    );
    println!(
        "Ctrl-C stops the hosts started here (VMs keep running and are re-adopted next time)."
    );
    let how_to_restart = format!(
        "novacron dev-cluster --base-dir {}{} (starts only the hosts that are down)",
        base.display(),
        if args.witness { " --witness" } else { "" },
    );
    let result = supervise(
        &mut hosts,
        &args.restart,
        &base,
        &password,
        &how_to_restart,
        &mut signals,
    )
    .await;
    stop_all(&mut hosts).await;
    result
}

/// Watches the hosts until Ctrl-C or SIGTERM. A host that exits is reported, and started
/// again if the policy says so; the others keep running either way. Never blocks on one host:
/// restarts are started and then watched like everything else.
async fn supervise(
    hosts: &mut [Host],
    policy: &str,
    base: &Path,
    password: &str,
    how_to_restart: &str,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = signals.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        for h in hosts.iter_mut() {
            if h.check_ready() {
                eprintln!("  {} is back on {}", h.name, h.url());
            }
            if let State::Starting { since } = h.state
                && since.elapsed() > START_TIMEOUT
            {
                eprintln!(
                    "host {} did not get ready within {}s; stopping it (see {})",
                    h.name,
                    START_TIMEOUT.as_secs(),
                    h.log_path(base).display()
                );
                if let Some(c) = h.child.as_mut() {
                    let _ = c.start_kill();
                }
            }
            if let Some(status) = h.exited() {
                let restart = match policy {
                    "always" => true,
                    "on-failure" => !status.success(),
                    _ => false,
                };
                eprintln!(
                    "host {} exited ({}); the other hosts keep running",
                    h.name,
                    describe(status)
                );
                if !restart {
                    h.state = State::Down;
                    eprintln!(
                        "  start it again with: {how_to_restart}, or run dev-cluster with \
                         --restart on-failure"
                    );
                    continue;
                }
                if h.started.elapsed() > Duration::from_secs(30) {
                    h.backoff = Duration::from_secs(1);
                }
                eprintln!("  restarting {} in {}s", h.name, h.backoff.as_secs());
                h.state = State::Waiting {
                    at: Instant::now() + h.backoff,
                };
                h.backoff = (h.backoff * 2).min(Duration::from_secs(30));
            }
            if let State::Waiting { at } = h.state
                && Instant::now() >= at
                && let Err(e) = h.start(base, password)
            {
                eprintln!("  cannot start {}: {e:#}", h.name);
                h.state = State::Down;
            }
        }
        if hosts.iter().all(|h| matches!(h.state, State::Down)) {
            eprintln!("every host started here has exited");
            return Err(anyhow::anyhow!("every host has exited"));
        }
    }
}

fn free_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn load_layout(base: &Path, args: &DevClusterArgs) -> anyhow::Result<Layout> {
    let path = base.join("cluster.json");
    let mut layout: Layout = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))?,
        Err(_) => Layout {
            admin_password: std::env::var("NOVACRON_ADMIN_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| {
                    novacron_server::cluster::identity::new_secret()[..16].to_string()
                }),
            ..Layout::default()
        },
    };
    while layout.ports.len() < args.nodes {
        layout.ports.push(free_port(args.ip)?);
    }
    if args.witness && layout.witness_port.is_none() {
        layout.witness_port = Some(free_port(args.ip)?);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&layout)?)?;
    Ok(layout)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "stopped cleanly".to_string(),
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "exited".to_string(),
    }
}

async fn stop_all(hosts: &mut [Host]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for h in hosts.iter().filter(|h| h.running()) {
        if let Some(pid) = h.child.as_ref().and_then(Child::id) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for h in hosts.iter_mut() {
        let Some(child) = h.child.as_mut() else {
            continue;
        };
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        h.child = None;
        eprintln!("stopped {}", h.name);
    }
}
