//! The client subcommands. Each parses its arguments, calls the API through `novacron-client`,
//! and prints a table (or JSON with `-o json`). Errors exit non-zero with the server's message.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use novacron_client::{Client, encode};
use novacron_types::{
    CreateVmRequest, DiskRequest, Image, ImageFormat, ImportImageRequest, KernelBoot,
    MigrateVmRequest, MigrationTimeoutAction, Operation, OperationStatus, PlacementReport,
    PlacementRequest, PlacementRules, PlacementStrategy, Vm,
};

use crate::cluster_cli::{self, ClusterCommand};
use crate::config;
use crate::dev_cluster::DevClusterArgs;
use crate::output::{self, Format};
use crate::serve::ServeArgs;
use crate::volume_cli::{self, PolicyCommand, VolumeCommand};

#[derive(Parser, Debug)]
#[command(
    name = "novacron",
    version,
    about = "NovaCron: run and manage QEMU virtual machines on a cluster of hosts"
)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Parser, Debug, Clone)]
pub struct Global {
    /// API address, for example http://127.0.0.1:8080.
    #[arg(long, global = true, env = "NOVACRON_SERVER")]
    pub server: Option<String>,
    /// Bearer token (session or API token).
    #[arg(long, global = true, env = "NOVACRON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Format,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Log in and remember the server and session in the client config file.
    Login {
        #[arg(long, default_value = "admin")]
        username: String,
        /// Read the password from standard input instead of NOVACRON_PASSWORD or a prompt.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Operations.
    #[command(subcommand, name = "op")]
    Op(OpCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Users (admin only).
    #[command(subcommand)]
    User(UserCommand),
    /// Cluster hosts.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster membership: join tokens, status, removal, leadership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Storage pools: directories VM disks live in.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Volumes: disks in pools, attached to VMs, moved between tiers.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Storage tiering: the policy, and evaluating the temperature predictors on traces.
    #[command(subcommand)]
    Tiering(TieringCommand),
    /// Run a local cluster of N hosts as separate processes on loopback (Ctrl-C stops it).
    DevCluster(DevClusterArgs),
    /// The fencing watchdog `serve` runs beside itself (not for direct use).
    #[command(hide = true)]
    FenceWatchdog {
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TieringCommand {
    /// The tiering policy (shown, or replaced from a JSON file).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Replay a block I/O trace through every predictor (trained online, never looking ahead)
    /// and print balanced accuracy, macro-F1, hot-tier hit ratio and bytes moved, against the
    /// baselines and an oracle that knows the future.
    Eval {
        #[arg(long)]
        trace: std::path::PathBuf,
        /// cloudphysics (version,time,op,size,lbn) or csv (timestamp_s,volume,op,offset,size).
        #[arg(long, default_value = "cloudphysics")]
        format: String,
        /// Extent size: the unit that is predicted and moved.
        #[arg(long, default_value_t = 64)]
        extent_mib: u64,
        /// Window length in seconds.
        #[arg(long, default_value_t = 60.0)]
        window: f64,
        /// Requests per minute from which a window counts as hot.
        #[arg(long, default_value_t = 10.0)]
        hot_per_minute: f64,
        /// Share of the extents the simulated hot tier holds.
        #[arg(long, default_value_t = 0.1)]
        hot_share: f64,
        /// Score margin a unit needs to displace a hot one.
        #[arg(long, default_value_t = 0.3)]
        hysteresis: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write a synthetic trace (generic CSV) of a given shape; the same seed gives the same
    /// trace.
    Synth {
        /// diurnal, bursty, shifting or scan.
        #[arg(long)]
        shape: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    List,
    Show {
        name: String,
    },
    /// Record a pool. A shared pool's directory must be mounted on the host you talk to (and,
    /// to be used there, on every other host); a local one is made on each host.
    Create {
        name: String,
        /// Absolute directory path on the hosts.
        #[arg(long)]
        path: String,
        /// hot, warm or cold.
        #[arg(long)]
        tier: String,
        /// Capacity in GiB.
        #[arg(long)]
        capacity_gib: u64,
        /// Every host sees the same files (NFS, CephFS, ...): VMs on it move without copying
        /// disks and can have HA.
        #[arg(long)]
        shared: bool,
        /// Cost per GiB-month.
        #[arg(long, default_value_t = 0.0)]
        cost: f64,
        /// Performance class (default: the tier).
        #[arg(long)]
        class: Option<String>,
    },
    /// Delete a pool's record (refused while any VM's disks are on it).
    Delete {
        name: String,
    },
}

/// Placement rules of a VM.
#[derive(clap::Args, Debug, Clone)]
pub struct RulesArgs {
    /// A label the host must carry, KEY=VALUE (repeatable).
    #[arg(long = "host-label", value_parser = parse_label)]
    host_labels: Vec<(String, String)>,
    /// Run on the same host as the other VMs of this group.
    #[arg(long)]
    affinity: Option<String>,
    /// Never share a host with another VM of this group.
    #[arg(long)]
    anti_affinity: Option<String>,
}

impl RulesArgs {
    fn rules(self) -> PlacementRules {
        PlacementRules {
            host_labels: self.host_labels.into_iter().collect(),
            affinity: self.affinity,
            anti_affinity: self.anti_affinity,
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

fn print_placement(report: &PlacementReport) {
    println!("strategy: {}", report.strategy.as_str());
    if report.candidates.is_empty() {
        println!("no host fits");
    } else {
        output::table(
            &[
                "RANK",
                "NODE",
                "NAME",
                "SCORE",
                "VCPUS FREE",
                "MEMORY FREE",
                "VMS",
                "LOAD",
            ],
            report
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    vec![
                        (i + 1).to_string(),
                        c.node.to_string(),
                        c.name.clone(),
                        format!("{:.3}", c.score),
                        c.vcpus_free_after.to_string(),
                        format!("{} MiB", c.memory_free_mib_after),
                        c.vms.to_string(),
                        c.load1
                            .map(|l| format!("{l:.2}"))
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        );
    }
    if !report.rejected.is_empty() {
        println!();
        output::table(
            &["REJECTED", "NAME", "REASONS"],
            report
                .rejected
                .iter()
                .map(|r| {
                    let why: Vec<String> = r
                        .reasons
                        .iter()
                        .map(|x| format!("{}: {}", x.code, x.message))
                        .collect();
                    vec![r.node.to_string(), r.name.clone(), why.join("; ")]
                })
                .collect(),
        );
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM (its disks are created; it is not started unless --start).
    Create {
        name: String,
        #[arg(long, default_value = "demo")]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// An extra blank disk of this many MiB (repeatable).
        #[arg(long = "disk")]
        disks: Vec<u64>,
        /// Direct kernel boot: kernel path on the host.
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// Start it right away and wait until it runs.
        #[arg(long)]
        start: bool,
        /// Host ID to create it on (default: chosen by the cluster's placement; a named host
        /// is still checked).
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        rules: RulesArgs,
        /// The storage pool for its disks (default: the host's data directory).
        #[arg(long)]
        pool: Option<String>,
        /// Restart it on another host if its host is lost (needs a shared pool).
        #[arg(long)]
        ha: bool,
        /// Show where it would go (the ranking and every rejected host's reasons); create
        /// nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Disk I/O its host collected from QEMU: totals per disk over what is kept at the chosen
    /// resolution (`-o json` for every bucket).
    Stats {
        vm: String,
        /// Seconds per bucket at least (10 s kept 1 h, 1 min kept 1 day, 15 min kept 30 days).
        #[arg(long)]
        step: Option<u64>,
    },
    /// Turn HA on or off for a VM (on needs its disks on a shared pool).
    Ha {
        vm: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Where a VM with these needs would go: hosts ranked best first, and every other host with
    /// the reasons it was rejected. Creates nothing (always a dry run).
    Place {
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// Disk space in MiB besides the image's (repeatable, added up).
        #[arg(long = "disk")]
        disks: Vec<u64>,
        /// Count this image's size as disk too.
        #[arg(long)]
        image: Option<String>,
        /// Check only this host.
        #[arg(long)]
        node: Option<u64>,
        /// spread (most room left) or pack (fullest that fits); default: the server's setting.
        #[arg(long)]
        strategy: Option<String>,
        #[command(flatten)]
        rules: RulesArgs,
        /// The storage pool the disks would go to.
        #[arg(long)]
        pool: Option<String>,
        /// Accepted for clarity: `vm place` never creates anything.
        #[arg(long)]
        dry_run: bool,
    },
    List,
    Show {
        vm: String,
    },
    /// Live-migrate a running VM to another host, with a progress bar (phase, memory and disk
    /// left, rate, dirty rate, expected downtime, ETA). Ctrl-C stops watching, not the migration
    /// (`novacron op cancel ID` cancels it).
    Migrate {
        vm: String,
        /// Target host ID (default: the best host by placement).
        #[arg(long)]
        target: Option<u64>,
        /// RAM bandwidth cap in MiB/s.
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Disk mirroring bandwidth cap in MiB/s.
        #[arg(long)]
        disk_bandwidth: Option<u64>,
        /// Longest planned pause at the switch-over, in ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Throttle a guest that dirties memory faster than it can be sent (default: on).
        #[arg(long)]
        auto_converge: Option<bool>,
        /// Seconds before `--on-timeout` applies.
        #[arg(long = "migration-timeout")]
        migration_timeout: Option<u64>,
        /// abort (the VM stays) or postcopy (finish by running it on the target at once).
        #[arg(long)]
        on_timeout: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    Start(ActionArgs),
    Stop(ActionArgs),
    #[command(name = "force-stop")]
    ForceStop(ActionArgs),
    Reboot(ActionArgs),
    Pause(ActionArgs),
    Resume(ActionArgs),
    Delete {
        vm: String,
    },
    /// Print the serial console (and keep following it with --follow).
    Console {
        vm: String,
        /// Only the last N bytes.
        #[arg(long)]
        tail: Option<u64>,
        #[arg(short, long)]
        follow: bool,
    },
    /// Snapshot the disks of a stopped VM.
    Snapshot {
        vm: String,
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Restore a stopped VM's disks to a snapshot.
    Restore {
        vm: String,
        name: String,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Parser, Debug)]
pub struct ActionArgs {
    pub vm: String,
    /// Return the operation at once instead of waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Waiting for an operation.
#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// Return the operation at once instead of waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    List,
    /// Import a qcow2 or raw file (a path on the server's host) as a named image.
    Import {
        name: String,
        path: String,
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    Delete {
        image: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OpCommand {
    /// Operations, newest first (one page; the next page's cursor is printed).
    List {
        /// running, success, failure or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// A kind (vm.start) or a prefix ending in a dot (vm.).
        #[arg(long)]
        kind: Option<String>,
        /// A VM's name or ID, or a resource path.
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The cursor printed after the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    Show {
        id: String,
    },
    Wait {
        id: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a running operation (a live migration, before post-copy).
    Cancel {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    Create {
        name: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    Create {
        username: String,
        #[arg(long, default_value = "viewer")]
        role: String,
        #[arg(long)]
        password_stdin: bool,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    List,
    /// Put a host in maintenance and move its VMs away (running ones live, stopped ones cold);
    /// a leader hands leadership over first.
    Evacuate {
        id: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// End a host's maintenance: VMs may be placed there again.
    Restore {
        id: u64,
    },
}

pub(crate) fn client(g: &Global) -> anyhow::Result<Client> {
    let file = config::load()?;
    let server = g.server.clone().or(file.server).context(
        "no server: pass --server, set NOVACRON_SERVER, or run `novacron login --server URL`",
    )?;
    Ok(Client::new(&server, g.token.clone().or(file.token)))
}

fn read_password(prompt: &str, from_stdin: bool) -> anyhow::Result<String> {
    if !from_stdin && let Ok(p) = std::env::var("NOVACRON_PASSWORD") {
        return Ok(p);
    }
    if !from_stdin && std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(prompt).context("reading the password")?;
        if p.is_empty() {
            bail!("no password given");
        }
        return Ok(p);
    }
    let mut s = String::new();
    if from_stdin {
        std::io::stdin().read_to_string(&mut s)?;
    } else {
        std::io::stdin().read_line(&mut s)?;
    }
    let p = s.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        bail!("no password given");
    }
    Ok(p)
}

pub async fn run(g: Global, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::DevCluster(_) | Command::FenceWatchdog { .. } => {
            unreachable!("handled in main")
        }
        Command::Pool(c) => pool(&g, c).await,
        Command::Volume(c) => volume_cli::run(&g, c).await,
        Command::Tiering(TieringCommand::Policy(p)) => volume_cli::policy(&g, p).await,
        Command::Tiering(c) => tiering(&g, c),
        Command::Cluster(c) => cluster_cli::run(&g, c).await,
        Command::Login {
            username,
            password_stdin,
        } => {
            let file = config::load()?;
            let server = g
                .server
                .clone()
                .or(file.server)
                .unwrap_or_else(|| "http://127.0.0.1:8080".into());
            let password = read_password(&format!("Password for {username}: "), password_stdin)?;
            let token = Client::new(&server, None)
                .login(&username, &password)
                .await?;
            let path = config::save(&config::ClientFile {
                server: Some(server.clone()),
                token: Some(token),
            })?;
            eprintln!(
                "Logged in to {server} as {username} (saved to {})",
                path.display()
            );
            Ok(())
        }
        Command::Vm(c) => vm(&g, c).await,
        Command::Image(c) => image(&g, c).await,
        Command::Op(c) => op(&g, c).await,
        Command::Token(c) => token(&g, c).await,
        Command::User(c) => user(&g, c).await,
        Command::Node(NodeCommand::List) => {
            let c = client(&g)?;
            let nodes: Vec<serde_json::Value> = c.list_all("/api/v1/nodes").await?;
            if g.output == Format::Json {
                return output::json(&nodes);
            }
            let s = |v: &serde_json::Value, k: &str| {
                v.get(k)
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            let rows = nodes
                .iter()
                .map(|n| {
                    vec![
                        s(n, "id"),
                        s(n, "name"),
                        if n["maintenance"] == true {
                            format!("{} (maintenance)", s(n, "status"))
                        } else {
                            s(n, "status")
                        },
                        n["raft"]["role"].as_str().unwrap_or("").into(),
                        s(n, "api_address"),
                        s(n, "accelerator"),
                        s(n, "qemu_version"),
                    ]
                })
                .collect();
            output::table(
                &["ID", "NAME", "STATUS", "RAFT", "API", "ACCEL", "QEMU"],
                rows,
            );
            Ok(())
        }
        Command::Node(NodeCommand::Evacuate { id, wait }) => {
            let c = client(&g)?;
            let op: Operation = c
                .post(
                    &format!("/api/v1/nodes/{id}/evacuate"),
                    &serde_json::json!({}),
                )
                .await?;
            if wait.no_wait {
                return print_op(&op, &g);
            }
            let op = follow(&c, op, Duration::from_secs(wait.timeout), &g).await?;
            if g.output == Format::Json {
                return output::json(&op);
            }
            eprintln!("host {id} is empty and in maintenance ({})", op.id);
            Ok(())
        }
        Command::Node(NodeCommand::Restore { id }) => {
            let c = client(&g)?;
            let node: serde_json::Value = c
                .post(
                    &format!("/api/v1/nodes/{id}/restore"),
                    &serde_json::json!({}),
                )
                .await?;
            if g.output == Format::Json {
                return output::json(&node);
            }
            eprintln!("host {id} is out of maintenance");
            Ok(())
        }
    }
}

fn vm_rows(vms: &[Vm]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.state.as_str().to_string(),
                v.spec.vcpus.to_string(),
                format!("{} MiB", v.spec.memory_mib),
                v.node.to_string(),
                v.id.to_string(),
                v.state_reason.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// Waits for an operation with a spinner on a terminal; fails if the operation failed.
pub(crate) async fn follow(
    c: &Client,
    op: Operation,
    timeout: Duration,
    g: &Global,
) -> anyhow::Result<Operation> {
    let bar = if std::io::stderr().is_terminal() && g.output == Format::Table {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}%")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let id = op.id.to_string();
    let mut current = op;
    while !current.status.is_final() {
        if let Some(b) = &bar {
            b.set_position(u64::from(current.progress));
            b.set_message(format!("{} {}", current.kind, current.message));
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(b) = &bar {
                b.abandon();
            }
            bail!(
                "operation {id} is still running after {}s (novacron op wait {id})",
                timeout.as_secs()
            );
        }
        current = match c.wait_operation(&id, 2).await {
            Ok(op) => op,
            // A leader change (an evacuation hands leadership over) makes reads 503 for a
            // moment: keep following.
            Err(e) if e.status() == Some(503) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                current
            }
            Err(e) => return Err(e.into()),
        };
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match current.status {
        OperationStatus::Success => Ok(current),
        _ => {
            let msg = current
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| current.message.clone());
            bail!("{} {:?}: {msg}", current.kind, current.status)
        }
    }
}

fn print_op(op: &Operation, g: &Global) -> anyhow::Result<()> {
    if g.output == Format::Json {
        return output::json(op);
    }
    output::table(
        &["ID", "KIND", "STATUS", "PROGRESS", "MESSAGE"],
        vec![vec![
            op.id.to_string(),
            op.kind.clone(),
            format!("{:?}", op.status).to_lowercase(),
            format!("{}%", op.progress),
            op.error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| op.message.clone()),
        ]],
    );
    Ok(())
}

async fn action(g: &Global, name: &str, a: ActionArgs) -> anyhow::Result<()> {
    let c = client(g)?;
    let op = c.vm_action(&a.vm, name).await?;
    if a.no_wait {
        return print_op(&op, g);
    }
    let op = follow(&c, op, Duration::from_secs(a.timeout), g).await?;
    let vm = c.get_vm(&a.vm).await?;
    if g.output == Format::Json {
        return output::json(&vm);
    }
    eprintln!(
        "{} {}: done ({}), VM is {}",
        name,
        vm.name,
        op.id,
        vm.state.as_str()
    );
    Ok(())
}

async fn vm(g: &Global, cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory,
            disks,
            kernel,
            initrd,
            cmdline,
            start,
            node,
            rules,
            pool,
            ha,
            dry_run,
        } => {
            let c = client(g)?;
            let req = CreateVmRequest {
                name,
                image,
                vcpus,
                memory_mib: memory,
                disks: disks
                    .into_iter()
                    .map(|size_mib| DiskRequest { size_mib })
                    .collect(),
                boot: kernel.map(|kernel| KernelBoot {
                    kernel,
                    initrd,
                    cmdline,
                }),
                node: node.map(novacron_types::NodeId),
                placement: rules.rules(),
                pool,
                ha,
            };
            if dry_run {
                let report = c
                    .place(&PlacementRequest {
                        vcpus: req.vcpus,
                        memory_mib: req.memory_mib,
                        disk_mib: req.disks.iter().map(|d| d.size_mib).sum(),
                        image: Some(req.image.clone()),
                        placement: req.placement.clone(),
                        node: req.node,
                        strategy: None,
                        pool: req.pool.clone(),
                    })
                    .await?;
                if g.output == Format::Json {
                    return output::json(&report);
                }
                print_placement(&report);
                return Ok(());
            }
            let vm = c.create_vm(&req).await?;
            if start {
                let op = c.vm_action(&vm.id.to_string(), "start").await?;
                follow(&c, op, Duration::from_secs(600), g).await?;
            }
            let vm = c.get_vm(&vm.id.to_string()).await?;
            if g.output == Format::Json {
                return output::json(&vm);
            }
            output::table(
                &["NAME", "STATE", "VCPUS", "MEMORY", "NODE", "ID", "REASON"],
                vm_rows(&[vm]),
            );
            Ok(())
        }
        VmCommand::Place {
            vcpus,
            memory,
            disks,
            image,
            node,
            strategy,
            rules,
            pool,
            dry_run: _,
        } => {
            let strategy = match strategy.as_deref() {
                None => None,
                Some("spread") => Some(PlacementStrategy::Spread),
                Some("pack") => Some(PlacementStrategy::Pack),
                Some(other) => anyhow::bail!("--strategy must be spread or pack, not '{other}'"),
            };
            let report = client(g)?
                .place(&PlacementRequest {
                    vcpus,
                    memory_mib: memory,
                    disk_mib: disks.iter().sum(),
                    image,
                    placement: rules.rules(),
                    node: node.map(novacron_types::NodeId),
                    strategy,
                    pool,
                })
                .await?;
            if g.output == Format::Json {
                return output::json(&report);
            }
            print_placement(&report);
            Ok(())
        }
        VmCommand::Stats { vm, step } => {
            let report = client(g)?.disk_stats(&vm, step).await?;
            if g.output == Format::Json {
                return output::json(&report);
            }
            output::table(
                &[
                    "DISK",
                    "STEP",
                    "BUCKETS",
                    "READ OPS",
                    "WRITE OPS",
                    "READ MiB",
                    "WRITE MiB",
                ],
                report
                    .disks
                    .iter()
                    .map(|d| {
                        let sum = |f: fn(&novacron_types::IoBucket) -> u64| {
                            d.buckets.iter().map(f).sum::<u64>()
                        };
                        vec![
                            d.disk.clone(),
                            format!("{}s", d.step_s),
                            d.buckets.len().to_string(),
                            sum(|b| b.rd_ops).to_string(),
                            sum(|b| b.wr_ops).to_string(),
                            format!("{:.1}", sum(|b| b.rd_bytes) as f64 / 1048576.0),
                            format!("{:.1}", sum(|b| b.wr_bytes) as f64 / 1048576.0),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        VmCommand::Ha { vm, state } => {
            let c = client(g)?;
            let req = novacron_types::UpdateVmRequest {
                ha: Some(state == "on"),
                ..Default::default()
            };
            let vm = c.update_vm(&vm, &req).await?;
            if g.output == Format::Json {
                return output::json(&vm);
            }
            println!(
                "VM '{}': HA {}",
                vm.name,
                if vm.spec.ha { "on" } else { "off" }
            );
            Ok(())
        }
        VmCommand::List => {
            let vms = client(g)?.list_vms().await?;
            if g.output == Format::Json {
                return output::json(&vms);
            }
            output::table(
                &["NAME", "STATE", "VCPUS", "MEMORY", "NODE", "ID", "REASON"],
                vm_rows(&vms),
            );
            Ok(())
        }
        VmCommand::Show { vm } => {
            let vm = client(g)?.get_vm(&vm).await?;
            if g.output == Format::Json {
                return output::json(&vm);
            }
            let disks: Vec<String> = vm
                .spec
                .disks
                .iter()
                .map(|d| format!("{} ({} MiB)", d.name, d.size_mib))
                .collect();
            let snaps: Vec<String> = vm.snapshots.iter().map(|s| s.name.clone()).collect();
            let rows = vec![
                vec!["name".into(), vm.name.clone()],
                vec!["id".into(), vm.id.to_string()],
                vec!["state".into(), vm.state.as_str().into()],
                vec!["reason".into(), vm.state_reason.clone().unwrap_or_default()],
                vec!["desired".into(), format!("{:?}", vm.desired).to_lowercase()],
                vec!["node".into(), vm.node.to_string()],
                vec!["vcpus".into(), vm.spec.vcpus.to_string()],
                vec!["memory".into(), format!("{} MiB", vm.spec.memory_mib)],
                vec!["image".into(), vm.spec.image.to_string()],
                vec!["disks".into(), disks.join(", ")],
                vec!["snapshots".into(), snaps.join(", ")],
                vec!["created".into(), output::millis(vm.created_at)],
            ];
            output::table(&["FIELD", "VALUE"], rows);
            Ok(())
        }
        VmCommand::Migrate {
            vm,
            target,
            bandwidth,
            disk_bandwidth,
            downtime_ms,
            auto_converge,
            migration_timeout,
            on_timeout,
            wait,
        } => {
            let on_timeout = match on_timeout.as_deref() {
                None => None,
                Some("abort") => Some(MigrationTimeoutAction::Abort),
                Some("postcopy") => Some(MigrationTimeoutAction::Postcopy),
                Some(other) => bail!("--on-timeout must be abort or postcopy, not '{other}'"),
            };
            let c = client(g)?;
            let op = c
                .migrate_vm(
                    &vm,
                    &MigrateVmRequest {
                        target: target.map(novacron_types::NodeId),
                        max_bandwidth_mib: bandwidth,
                        disk_bandwidth_mib: disk_bandwidth,
                        downtime_limit_ms: downtime_ms,
                        auto_converge,
                        timeout_seconds: migration_timeout,
                        on_timeout,
                    },
                )
                .await?;
            if wait.no_wait {
                return print_op(&op, g);
            }
            let op = follow(&c, op, Duration::from_secs(wait.timeout), g).await?;
            if g.output == Format::Json {
                return output::json(&op);
            }
            let vm = c.get_vm(&vm).await?;
            eprintln!(
                "migrate {}: done ({}), now on host {}{}",
                vm.name,
                op.id,
                vm.node,
                op.migration
                    .as_ref()
                    .and_then(|m| m.downtime_ms)
                    .map(|d| format!(", downtime {d} ms"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        VmCommand::Start(a) => action(g, "start", a).await,
        VmCommand::Stop(a) => action(g, "stop", a).await,
        VmCommand::ForceStop(a) => action(g, "force-stop", a).await,
        VmCommand::Reboot(a) => action(g, "reboot", a).await,
        VmCommand::Pause(a) => action(g, "pause", a).await,
        VmCommand::Resume(a) => action(g, "resume", a).await,
        VmCommand::Delete { vm } => {
            client(g)?.delete_vm(&vm).await?;
            eprintln!("deleted VM {vm}");
            Ok(())
        }
        VmCommand::Console { vm, tail, follow } => {
            let c = client(g)?;
            let (data, next) = c.console(&vm, None, tail).await?;
            std::io::stdout().write_all(&data)?;
            std::io::stdout().flush()?;
            if follow {
                follow_console(&c, &vm, next).await?;
            }
            Ok(())
        }
        VmCommand::Snapshot { vm, name, no_wait } => {
            let c = client(g)?;
            let op = c.snapshot_vm(&vm, &name).await?;
            if no_wait {
                return print_op(&op, g);
            }
            follow(&c, op, Duration::from_secs(600), g).await?;
            eprintln!("snapshot {name} of {vm} created");
            Ok(())
        }
        VmCommand::Restore { vm, name, no_wait } => {
            let c = client(g)?;
            let op = c.restore_vm(&vm, &name).await?;
            if no_wait {
                return print_op(&op, g);
            }
            follow(&c, op, Duration::from_secs(600), g).await?;
            eprintln!("{vm} restored to snapshot {name}");
            Ok(())
        }
    }
}

/// Streams the console over the WebSocket endpoint until Ctrl-C or the server closes it.
/// Follows a VM's console over a WebSocket to the host that runs it (streams are not
/// forwarded between hosts), and follows the VM when it moves (a live migration ends the stream
/// on the old host; the new host's console starts fresh).
async fn follow_console(c: &Client, vm: &str, offset: u64) -> anyhow::Result<()> {
    let mut offset = offset;
    let mut host = c.get_vm(vm).await?.node;
    loop {
        let addr = host_address(c, host).await?;
        let owner = Client::new(&addr, c.token().map(str::to_string));
        let broken = match stream_console_from(&owner, vm, offset).await? {
            StreamEnd::CtrlC => return Ok(()),
            StreamEnd::Closed => None,
            StreamEnd::Broken(e) => Some(e),
        };
        // The stream ended: the VM stopped existing there, or moved.
        match c.get_vm(vm).await {
            Ok(now) if now.node != host => {
                eprintln!(
                    "\n[novacron: VM {vm} moved to host {}; following it there]",
                    now.node
                );
                host = now.node;
                offset = 0;
            }
            _ => return broken.map_or(Ok(()), Err),
        }
    }
}

/// The API address of host `id`.
async fn host_address(c: &Client, id: novacron_types::NodeId) -> anyhow::Result<String> {
    let nodes: Vec<serde_json::Value> = c.list_all("/api/v1/nodes").await?;
    nodes
        .iter()
        .find(|n| n["id"].as_u64() == Some(id.0))
        .and_then(|n| n["api_address"].as_str())
        .map(str::to_string)
        .with_context(|| format!("host {id} is not in the cluster's host list"))
}

enum StreamEnd {
    CtrlC,
    Closed,
    Broken(anyhow::Error),
}

/// Streams the console from `c`'s host until the stream ends or Ctrl-C.
async fn stream_console_from(c: &Client, vm: &str, offset: u64) -> anyhow::Result<StreamEnd> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_base = c.base().replacen("http", "ws", 1);
    let url = format!(
        "{ws_base}/api/v1/vms/{}/console/ws?offset={offset}",
        encode(vm)
    );
    let mut req = url.as_str().into_client_request()?;
    if let Some(t) = c.token() {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .context("opening the console stream")?;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(StreamEnd::CtrlC),
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => { out.write_all(&b)?; out.flush()?; }
                Some(Ok(Message::Text(t))) => { out.write_all(t.as_bytes())?; out.flush()?; }
                Some(Ok(Message::Close(_))) | None => return Ok(StreamEnd::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(StreamEnd::Broken(e.into())),
            }
        }
    }
}

fn tiering(g: &Global, cmd: TieringCommand) -> anyhow::Result<()> {
    use novacron_tiering::{eval, synth, trace, window};
    match cmd {
        // Async (it talks to a host); dispatched before this.
        TieringCommand::Policy(_) => bail!("tiering policy needs a server"),
        TieringCommand::Eval {
            trace: path,
            format,
            extent_mib,
            window: window_s,
            hot_per_minute,
            hot_share,
            hysteresis,
            seed,
        } => {
            let format: trace::Format = format.parse().map_err(anyhow::Error::msg)?;
            if extent_mib == 0 || extent_mib > 1 << 20 {
                bail!("--extent-mib must be between 1 and 1048576 (got {extent_mib})");
            }
            if !(window_s.is_finite() && window_s >= 1.0) {
                bail!("--window must be at least 1 second (got {window_s})");
            }
            if !(hot_share > 0.0 && hot_share <= 1.0) {
                bail!("--hot-share must be in (0, 1] (got {hot_share})");
            }
            if !(hot_per_minute.is_finite() && hot_per_minute > 0.0) {
                bail!("--hot-per-minute must be above 0 (got {hot_per_minute})");
            }
            if !(hysteresis.is_finite() && hysteresis >= 0.0) {
                bail!("--hysteresis must be at least 0 (got {hysteresis})");
            }
            let t = trace::read(&path, format)?;
            let cut = window::cut(&t, extent_mib << 20, window_s);
            let report = eval::evaluate(
                &cut,
                &eval::EvalSettings {
                    hot_per_minute,
                    hot_share,
                    hysteresis,
                    seed,
                    ..Default::default()
                },
            );
            if g.output == Format::Json {
                return output::json(&report);
            }
            print!("{}", eval::table(&report));
            Ok(())
        }
        TieringCommand::Synth { shape, seed, out } => {
            let shape: synth::Shape = shape.parse().map_err(anyhow::Error::msg)?;
            let t = synth::generate(&synth::Synth::new(shape, seed));
            std::fs::write(&out, trace::to_csv(&t))
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
            if g.output != Format::Json {
                println!(
                    "{}: {} requests on {} volumes; evaluate with --format csv --window {}",
                    out.display(),
                    t.accesses.len(),
                    t.volumes.len(),
                    shape.window_s()
                );
            }
            Ok(())
        }
    }
}

async fn pool(g: &Global, cmd: PoolCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    let show = |pools: Vec<novacron_types::StoragePool>| {
        if g.output == Format::Json {
            return output::json(&pools);
        }
        output::table(
            &[
                "NAME",
                "TIER",
                "SHARED",
                "CAPACITY",
                "COST/GIB-MONTH",
                "CLASS",
                "PATH",
            ],
            pools
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.tier.as_str().into(),
                        if p.shared { "yes" } else { "no" }.into(),
                        format!("{} GiB", p.capacity_bytes >> 30),
                        format!("{}", p.cost_per_gib_month),
                        p.performance_class.clone(),
                        p.path.clone(),
                    ]
                })
                .collect(),
        );
        Ok(())
    };
    match cmd {
        PoolCommand::List => show(c.list_pools().await?),
        PoolCommand::Show { name } => show(vec![c.get_pool(&name).await?]),
        PoolCommand::Create {
            name,
            path,
            tier,
            capacity_gib,
            shared,
            cost,
            class,
        } => {
            let tier = match tier.as_str() {
                "hot" => novacron_types::PoolTier::Hot,
                "warm" => novacron_types::PoolTier::Warm,
                "cold" => novacron_types::PoolTier::Cold,
                other => bail!("--tier must be hot, warm or cold (got '{other}')"),
            };
            let path = std::path::absolute(&path)
                .map(|p| p.display().to_string())
                .unwrap_or(path);
            let pool = c
                .create_pool(&novacron_types::CreatePoolRequest {
                    name,
                    path,
                    tier,
                    shared,
                    capacity_bytes: capacity_gib.saturating_mul(1 << 30),
                    cost_per_gib_month: cost,
                    performance_class: class,
                })
                .await?;
            show(vec![pool])
        }
        PoolCommand::Delete { name } => {
            c.delete_pool(&name).await?;
            if g.output != Format::Json {
                println!("pool '{name}' deleted");
            }
            Ok(())
        }
    }
}

fn image_rows(images: &[Image]) -> Vec<Vec<String>> {
    images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.format.as_str().into(),
                format!("{} MiB", i.virtual_size / (1 << 20)),
                if i.boot.is_some() {
                    "kernel".into()
                } else {
                    "disk".into()
                },
                i.id.to_string(),
                i.description.clone(),
            ]
        })
        .collect()
}

async fn image(g: &Global, cmd: ImageCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        ImageCommand::List => {
            let images = c.list_images().await?;
            if g.output == Format::Json {
                return output::json(&images);
            }
            output::table(
                &["NAME", "FORMAT", "SIZE", "BOOT", "ID", "DESCRIPTION"],
                image_rows(&images),
            );
            Ok(())
        }
        ImageCommand::Import {
            name,
            path,
            format,
            description,
            no_wait,
        } => {
            let format = match format.as_deref() {
                None => None,
                Some("qcow2") => Some(ImageFormat::Qcow2),
                Some("raw") => Some(ImageFormat::Raw),
                Some(other) => bail!("--format must be qcow2 or raw (got '{other}')"),
            };
            let path = std::path::absolute(&path)
                .map(|p| p.display().to_string())
                .unwrap_or(path);
            let req = ImportImageRequest {
                name: name.clone(),
                source_path: path,
                format,
                description,
                boot: None,
            };
            let op = c.import_image(&req).await?;
            if no_wait {
                return print_op(&op, g);
            }
            follow(&c, op, Duration::from_secs(3600), g).await?;
            eprintln!("imported image {name}");
            Ok(())
        }
        ImageCommand::Delete { image } => {
            c.delete(&format!("/api/v1/images/{}", encode(&image)))
                .await?;
            eprintln!("deleted image {image}");
            Ok(())
        }
    }
}

async fn op(g: &Global, cmd: OpCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        OpCommand::List {
            status,
            kind,
            target,
            limit,
            after,
        } => {
            let mut path = String::from("/api/v1/operations");
            let filters = [("status", status), ("kind", kind), ("target", target)];
            let mut sep = '?';
            for (k, v) in filters {
                if let Some(v) = v {
                    path.push_str(&format!("{sep}{k}={}", encode(&v)));
                    sep = '&';
                }
            }
            let page: novacron_types::Page<Operation> =
                c.page(&path, limit, after.as_deref()).await?;
            if let Some(next) = &page.next {
                eprintln!("(more: novacron op list --after {next})");
            }
            if g.output == Format::Json {
                return output::json(&page.items);
            }
            let ops = page.items;
            let rows = ops
                .iter()
                .map(|o| {
                    vec![
                        o.id.to_string(),
                        o.kind.clone(),
                        format!("{:?}", o.status).to_lowercase(),
                        output::millis(o.created_at),
                        o.error
                            .as_ref()
                            .map(|e| e.message.clone())
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(&["ID", "KIND", "STATUS", "CREATED", "ERROR"], rows);
            Ok(())
        }
        OpCommand::Show { id } => print_op(&c.get_operation(&id).await?, g),
        OpCommand::Wait { id, timeout } => {
            let op = c.get_operation(&id).await?;
            let op = follow(&c, op, Duration::from_secs(timeout), g).await?;
            print_op(&op, g)
        }
        OpCommand::Cancel { id } => {
            let op = c.cancel_operation(&id).await?;
            eprintln!("cancelling {} ({})", op.id, op.kind);
            print_op(&op, g)
        }
    }
}

async fn token(g: &Global, cmd: TokenCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        TokenCommand::Create {
            name,
            role,
            expires_in_days,
        } => {
            let body =
                serde_json::json!({"name": name, "role": role, "expires_in_days": expires_in_days});
            let created: serde_json::Value = c.post("/api/v1/tokens", &body).await?;
            if g.output == Format::Json {
                return output::json(&created);
            }
            println!("{}", created["token"].as_str().unwrap_or_default());
            eprintln!("(the token is shown once; store it now)");
            Ok(())
        }
        TokenCommand::List => {
            let tokens: Vec<serde_json::Value> = c.list_all("/api/v1/tokens").await?;
            if g.output == Format::Json {
                return output::json(&tokens);
            }
            let s = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
            let rows = tokens
                .iter()
                .map(|t| vec![s(&t["id"]), s(&t["name"]), s(&t["role"]), s(&t["revoked"])])
                .collect();
            output::table(&["ID", "NAME", "ROLE", "REVOKED"], rows);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            c.delete(&format!("/api/v1/tokens/{}", encode(&id))).await?;
            eprintln!("revoked token {id}");
            Ok(())
        }
    }
}

async fn user(g: &Global, cmd: UserCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        UserCommand::Create {
            username,
            role,
            password_stdin,
        } => {
            let password = read_password(&format!("Password for {username}: "), password_stdin)?;
            let body =
                serde_json::json!({"username": username, "password": password, "role": role});
            let user: serde_json::Value = c.post("/api/v1/users", &body).await?;
            if g.output == Format::Json {
                return output::json(&user);
            }
            eprintln!("created user {username} ({role})");
            Ok(())
        }
        UserCommand::List => {
            let users: Vec<serde_json::Value> = c.list_all("/api/v1/users").await?;
            if g.output == Format::Json {
                return output::json(&users);
            }
            let s = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
            let rows = users
                .iter()
                .map(|u| vec![s(&u["username"]), s(&u["role"]), s(&u["id"])])
                .collect();
            output::table(&["USERNAME", "ROLE", "ID"], rows);
            Ok(())
        }
    }
}
