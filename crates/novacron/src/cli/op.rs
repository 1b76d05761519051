//! `novacron op ...`: operations (list, show, wait, cancel).

use std::time::Duration;

use clap::Subcommand;

use novacron_client::encode;
use novacron_types::Operation;

use super::common::{Global, client, follow, print_op};
use crate::output::{self, Format};

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

pub(crate) async fn op(g: &Global, cmd: OpCommand) -> anyhow::Result<()> {
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
