//! `novacron`: `serve` runs a node; every other subcommand talks to a node's REST API.

mod cli;
mod config;
mod dev_cluster;
mod output;
mod serve;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    let result = match args.command {
        cli::Command::Serve(s) => serve::run(*s).await,
        cli::Command::DevCluster(a) => dev_cluster::run(a).await,
        cli::Command::FenceWatchdog { data_dir } => novacron_server::watchdog::run(&data_dir)
            .await
            .map_err(anyhow::Error::from),
        command => cli::run(args.global, command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
