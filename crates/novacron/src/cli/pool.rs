//! `novacron pool ...`: storage pools.

use anyhow::bail;
use clap::Subcommand;

use super::common::{Global, client};
use crate::output::{self, Format};

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

pub(crate) async fn pool(g: &Global, cmd: PoolCommand) -> anyhow::Result<()> {
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
