//! `novacron vm ...`: create (with placement rules and a dry run), lifecycle actions,
//! snapshots, migration, the serial console.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;

use novacron_client::{Client, encode};
use novacron_types::{
    CreateVmRequest, DiskRequest, KernelBoot, MigrateVmRequest, MigrationTimeoutAction,
    PlacementReport, PlacementRequest, PlacementRules, PlacementStrategy, Vm,
};

use super::common::{Global, WaitArgs, client, follow, print_op};
use crate::output::{self, Format};

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

pub(crate) async fn vm(g: &Global, cmd: VmCommand) -> anyhow::Result<()> {
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
