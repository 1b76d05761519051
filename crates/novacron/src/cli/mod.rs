//! The client subcommands. Each parses its arguments, calls the API through `novacron-client`,
//! and prints a table (or JSON with `-o json`). Errors exit non-zero with the server's message.
//!
//! One file per resource; `common.rs` holds what they share (the global flags, the client,
//! following an operation). `serve`, `dev-cluster` and `fence-watchdog` are in their own
//! modules of the binary.

mod cluster;
mod common;
mod image;
mod node;
mod op;
mod pool;
mod tiering;
mod users;
mod vm;
mod volume;

use clap::{Parser, Subcommand};

use novacron_client::Client;

use crate::config;
use crate::dev_cluster::DevClusterArgs;
use crate::serve::ServeArgs;
use cluster::ClusterCommand;
pub use common::Global;
use common::read_password;
use image::ImageCommand;
use node::NodeCommand;
use op::OpCommand;
use pool::PoolCommand;
use tiering::TieringCommand;
use users::{TokenCommand, UserCommand};
use vm::VmCommand;
use volume::VolumeCommand;

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

pub async fn run(g: Global, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::DevCluster(_) | Command::FenceWatchdog { .. } => {
            unreachable!("handled in main")
        }
        Command::Pool(c) => pool::pool(&g, c).await,
        Command::Volume(c) => volume::run(&g, c).await,
        Command::Tiering(TieringCommand::Policy(p)) => tiering::policy(&g, p).await,
        Command::Tiering(c) => tiering::tiering(&g, c),
        Command::Cluster(c) => cluster::run(&g, c).await,
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
        Command::Vm(c) => vm::vm(&g, c).await,
        Command::Image(c) => image::image(&g, c).await,
        Command::Op(c) => op::op(&g, c).await,
        Command::Token(c) => users::token(&g, c).await,
        Command::User(c) => users::user(&g, c).await,
        Command::Node(c) => node::run(&g, c).await,
    }
}
