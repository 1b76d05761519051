//! `novacron dev-cluster`: N hosts as separate `novacron serve` processes on loopback, each with
//! its own data dir, joined into one cluster; stopped together on Ctrl-C.
//!
//! Ports are chosen once and kept in `BASE/cluster.json`, so running it again restarts the same
//! cluster (Raft remembers each member's address). A host that exits (killed to watch failover
//! and HA, say) leaves the others running: it is restarted by the `--restart` policy, or by
//! running `dev-cluster` again, which starts only the hosts that are not running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

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

struct Host {
    name: String,
    role: HostRole,
    url: String,
    child: Child,
    /// How to start it again.
    listen: std::net::SocketAddr,
    extra: Vec<String>,
    started: std::time::Instant,
    /// Wait before the next restart (doubles while it keeps exiting soon after starting).
    backoff: Duration,
    /// Exited and not restarted.
    down: bool,
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

async fn spawn(
    base: &Path,
    name: &str,
    role: HostRole,
    listen: std::net::SocketAddr,
    extra: &[String],
    admin_password: &str,
) -> anyhow::Result<Host> {
    let data = base.join(name);
    std::fs::create_dir_all(&data)?;
    let exe = std::env::current_exe().context("locating the novacron binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(listen.to_string())
        .args(["--node-name", name, "--role", role.as_str()])
        .args(extra)
        .env("NOVACRON_ADMIN_PASSWORD", admin_password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting novacron serve")?;
    let log_path = data.join("novacron.log");
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .await?;
    let log = std::sync::Arc::new(tokio::sync::Mutex::new(log));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Both streams go to the host's log file; stdout lines are also watched for the address.
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, log.clone(), Some(tx)));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, log, None));
    }
    let url = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = rx.recv().await {
            if let Some(rest) = line.split(" listening on ").nth(1) {
                return rest.split_whitespace().next().map(str::to_string);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(url) = url else {
        let _ = child.start_kill();
        bail!(
            "host {name} did not start; see {} for why",
            log_path.display()
        );
    };
    Ok(Host {
        name: name.to_string(),
        role,
        url,
        child,
        listen,
        extra: extra.to_vec(),
        started: std::time::Instant::now(),
        backoff: Duration::from_secs(1),
        down: false,
    })
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

    let mut plan: Vec<(String, HostRole, u16)> = (0..args.nodes)
        .map(|i| (format!("node-{}", i + 1), HostRole::Full, layout.ports[i]))
        .collect();
    if let (true, Some(p)) = (args.witness, layout.witness_port) {
        plan.push(("witness".into(), HostRole::Witness, p));
    }

    let mut hosts: Vec<Host> = Vec::new();
    let mut admin: Option<Client> = None;
    let mut running_elsewhere: Vec<(String, HostRole, String)> = Vec::new();
    for (i, (name, role, port)) in plan.iter().enumerate() {
        let listen = std::net::SocketAddr::new(args.ip, *port);
        let url = format!("http://{listen}");
        if already_running(listen).await {
            eprintln!("{name} is already running on {url}; leaving it alone");
            running_elsewhere.push((name.clone(), *role, url.clone()));
        } else {
            let mut extra = args.serve_args.clone();
            let joined_before = base.join(name).join("identity.json").exists();
            if i > 0 && !joined_before {
                let seed = admin.as_ref().context("the first host is not up")?;
                let t: JoinTokenCreated = seed
                    .post(
                        "/api/v1/cluster/tokens",
                        &JoinTokenRequest {
                            role: Some(*role),
                            ttl_seconds: Some(600),
                        },
                    )
                    .await
                    .context("making a join token")?;
                extra.extend([
                    "--join".to_string(),
                    seed.base().to_string(),
                    "--token".to_string(),
                    t.token,
                ]);
            }
            eprintln!("starting {name} on {url} ...");
            match spawn(&base, name, *role, listen, &extra, &password).await {
                Ok(mut h) => {
                    // A joined host must not try to join again when restarted.
                    h.extra = args.serve_args.clone();
                    hosts.push(h);
                }
                Err(e) => {
                    stop_all(&mut hosts).await;
                    return Err(e);
                }
            }
        }
        if i == 0 {
            let c = Client::new(&url, None);
            let token = c
                .login("admin", &password)
                .await
                .context("logging in to the first host")?;
            admin = Some(c.with_token(token));
        }
    }

    let total = hosts.len() + running_elsewhere.len();
    println!("NovaCron dev cluster: {total} hosts");
    for h in &hosts {
        println!("  {:<8} {:<8} {}", h.name, h.role.as_str(), h.url);
    }
    for (name, role, url) in &running_elsewhere {
        println!(
            "  {:<8} {:<8} {url} (already running; not started here)",
            name,
            role.as_str()
        );
    }
    println!("admin password: {password}");
    let first = plan
        .first()
        .map(|(_, _, p)| format!("http://{}", std::net::SocketAddr::new(args.ip, *p)))
        .unwrap_or_default();
    println!(
        "log in with: novacron login --server {first} (logs in {}/<host>/novacron.log)",
        base.display()
    );
    if hosts.is_empty() {
        println!("Every host is already running; nothing to do here.");
        return Ok(());
    }
    println!(
        "Ctrl-C stops the hosts started here (VMs keep running and are re-adopted next time)."
    );
    let how_to_restart = format!(
        "novacron dev-cluster --base-dir {}{} (starts only the hosts that are down)",
        base.display(),
        if args.witness { " --witness" } else { "" },
    );
    supervise(&mut hosts, &args.restart, &base, &password, &how_to_restart).await
}

/// Watches the hosts until Ctrl-C or SIGTERM, which stop them all. A host that exits is
/// reported, and started again if the policy says so; the others keep running either way.
async fn supervise(
    hosts: &mut [Host],
    policy: &str,
    base: &Path,
    password: &str,
    how_to_restart: &str,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {}
        }
        for h in hosts.iter_mut().filter(|h| !h.down) {
            let Ok(Some(status)) = h.child.try_wait() else {
                continue;
            };
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
                h.down = true;
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
            tokio::time::sleep(h.backoff).await;
            h.backoff = (h.backoff * 2).min(Duration::from_secs(30));
            match spawn(base, &h.name, h.role, h.listen, &h.extra, password).await {
                Ok(new) => {
                    let backoff = h.backoff;
                    *h = new;
                    h.backoff = backoff;
                    eprintln!("  {} is back on {}", h.name, h.url);
                }
                Err(e) => {
                    eprintln!("  {e:#}");
                    h.down = true;
                }
            }
        }
        if hosts.iter().all(|h| h.down) {
            eprintln!("every host started here has exited");
            return Err(anyhow::anyhow!("every host has exited"));
        }
    }
    stop_all(hosts).await;
    Ok(())
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
    let running = |h: &Host| !h.down;
    for h in hosts.iter().filter(|h| running(h)) {
        if let Some(pid) = h.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for h in hosts.iter_mut().filter(|h| running(h)) {
        if tokio::time::timeout(Duration::from_secs(15), h.child.wait())
            .await
            .is_err()
        {
            let _ = h.child.kill().await;
        }
        eprintln!("stopped {}", h.name);
    }
}
