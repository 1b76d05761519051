//! `novacron node ...`: hosts, their maintenance and evacuation.

use std::time::Duration;

use clap::Subcommand;

use novacron_types::Operation;

use super::common::{Global, WaitArgs, client, follow, print_op};
use crate::output::{self, Format};

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

pub(crate) async fn run(g: &Global, cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List => {
            let c = client(g)?;
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
        NodeCommand::Evacuate { id, wait } => {
            let c = client(g)?;
            let op: Operation = c
                .post(
                    &format!("/api/v1/nodes/{id}/evacuate"),
                    &serde_json::json!({}),
                )
                .await?;
            if wait.no_wait {
                return print_op(&op, g);
            }
            let op = follow(&c, op, Duration::from_secs(wait.timeout), g).await?;
            if g.output == Format::Json {
                return output::json(&op);
            }
            eprintln!("host {id} is empty and in maintenance ({})", op.id);
            Ok(())
        }
        NodeCommand::Restore { id } => {
            let c = client(g)?;
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
