//! `novacron volume ...`: volumes, their snapshots and moves between tiers.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use novacron_types::{
    AttachVolumeRequest, CreateVolumeRequest, MoveVolumeRequest, ResizeVolumeRequest, Volume,
    VolumeFormat,
};

use super::common::{Global, client, follow};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Volumes, filtered, one page at a time (`--after` the previous page's last ID).
    List {
        #[arg(long)]
        pool: Option<String>,
        /// hot, warm or cold.
        #[arg(long)]
        tier: Option<String>,
        /// Attached to this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Only attached (true) or detached (false) volumes.
        #[arg(long)]
        attached: Option<bool>,
        /// key=value.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        after: Option<String>,
    },
    Show {
        volume: String,
    },
    /// Create a volume (on the VM's host with --attach, else on --node or the host you talk to).
    Create {
        name: String,
        #[arg(long)]
        size_mib: u64,
        /// qcow2 or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// Default: the host's own data directory.
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        node: Option<u64>,
        /// Attach it to this VM once made (hot-plugged if it runs).
        #[arg(long)]
        attach: Option<String>,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Attach a volume to a VM (hot-plugged into a running VM).
    Attach {
        volume: String,
        vm: String,
    },
    /// Detach a volume (a running guest must release the device).
    Detach {
        volume: String,
    },
    /// Grow a volume (live when its VM runs).
    Resize {
        volume: String,
        #[arg(long)]
        size_mib: u64,
    },
    /// Take an internal (qcow2) snapshot.
    Snapshot {
        volume: String,
        name: String,
    },
    /// Roll a volume back to a snapshot (its VM stopped, or detached).
    Restore {
        volume: String,
        name: String,
    },
    /// Delete a snapshot (its VM stopped, or detached).
    DeleteSnapshot {
        volume: String,
        name: String,
    },
    /// Move a volume to another pool (live when its VM runs; compressed into a cold pool).
    Move {
        volume: String,
        pool: String,
        /// This move's own limit, MB/s (1 to 200).
        #[arg(long)]
        rate_mb: Option<u64>,
        /// Return at once instead of following the move.
        #[arg(long)]
        no_wait: bool,
    },
    Delete {
        volume: String,
    },
}

fn show(g: &Global, vols: &[Volume]) -> anyhow::Result<()> {
    if g.output == Format::Json {
        return output::json(&vols);
    }
    output::table(
        &[
            "NAME",
            "SIZE",
            "FORMAT",
            "POOL",
            "HOST",
            "ATTACHED",
            "SNAPSHOTS",
            "ID",
        ],
        vols.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    format!("{} MiB", v.size_mib),
                    format!(
                        "{}{}",
                        v.format.as_str(),
                        if v.compressed { " (compressed)" } else { "" }
                    ),
                    match &v.moving_to {
                        Some(to) => format!("{} -> {to}", v.pool),
                        None => v.pool.clone(),
                    },
                    v.node
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "shared".into()),
                    match (&v.attached_to, &v.vm_disk) {
                        (Some(vm), Some(d)) => format!("{vm} ({d})"),
                        (Some(vm), None) => vm.to_string(),
                        _ => "-".into(),
                    },
                    v.snapshots.len().to_string(),
                    v.id.to_string(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub async fn run(g: &Global, cmd: VolumeCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        VolumeCommand::List {
            pool,
            tier,
            vm,
            attached,
            label,
            limit,
            after,
        } => {
            let mut q: Vec<String> = vec![format!("limit={limit}")];
            for (k, v) in [
                ("pool", pool),
                ("tier", tier),
                ("vm", vm),
                ("attached", attached.map(|a| a.to_string())),
                ("label", label),
                ("after", after),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", novacron_client::encode(&v)));
                }
            }
            let page = c.list_volumes(&q.join("&")).await?;
            if g.output == Format::Json {
                return output::json(&page);
            }
            show(g, &page.items)?;
            if let Some(next) = page.next {
                eprintln!("more: --after {next}");
            }
            Ok(())
        }
        VolumeCommand::Show { volume } => show(g, &[c.get_volume(&volume).await?]),
        VolumeCommand::Create {
            name,
            size_mib,
            format,
            pool,
            node,
            attach,
            labels,
        } => {
            let format = match format.as_str() {
                "qcow2" => VolumeFormat::Qcow2,
                "raw" => VolumeFormat::Raw,
                other => bail!("--format must be qcow2 or raw (got '{other}')"),
            };
            let mut map = std::collections::BTreeMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("--label must be key=value (got '{l}')");
                };
                map.insert(k.to_string(), v.to_string());
            }
            let v = c
                .create_volume(&CreateVolumeRequest {
                    name,
                    size_mib,
                    format,
                    pool,
                    node: node.map(novacron_types::NodeId),
                    attach_to: attach,
                    labels: map,
                })
                .await?;
            show(g, &[v])
        }
        VolumeCommand::Attach { volume, vm } => {
            let v = c
                .volume_action(&volume, "attach", &AttachVolumeRequest { vm })
                .await?;
            show(g, &[v])
        }
        VolumeCommand::Detach { volume } => {
            let v = c
                .volume_action(&volume, "detach", &serde_json::json!({}))
                .await?;
            show(g, &[v])
        }
        VolumeCommand::Resize { volume, size_mib } => {
            let v = c
                .volume_action(&volume, "resize", &ResizeVolumeRequest { size_mib })
                .await?;
            show(g, &[v])
        }
        VolumeCommand::Snapshot { volume, name } => {
            show(g, &[c.snapshot_volume(&volume, &name).await?])
        }
        VolumeCommand::Restore { volume, name } => {
            show(g, &[c.restore_volume_snapshot(&volume, &name).await?])
        }
        VolumeCommand::DeleteSnapshot { volume, name } => {
            show(g, &[c.delete_volume_snapshot(&volume, &name).await?])
        }
        VolumeCommand::Move {
            volume,
            pool,
            rate_mb,
            no_wait,
        } => {
            let op = c
                .move_volume(&volume, &MoveVolumeRequest { pool, rate_mb })
                .await?;
            if no_wait {
                return if g.output == Format::Json {
                    output::json(&op)
                } else {
                    println!("moving: operation {}", op.id);
                    Ok(())
                };
            }
            follow(&c, op, Duration::from_secs(24 * 3600), g).await?;
            show(g, &[c.get_volume(&volume).await?])
        }
        VolumeCommand::Delete { volume } => {
            c.delete_volume(&volume).await?;
            if g.output != Format::Json {
                println!("volume '{volume}' deleted");
            }
            Ok(())
        }
    }
}
