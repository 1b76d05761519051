//! What every subcommand shares: the global flags, the API client, the password prompt and
//! following an operation to its end (with a progress bar on a terminal).

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use novacron_client::Client;
use novacron_types::{Operation, OperationStatus};

use crate::config;
use crate::output::{self, Format};

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

pub(crate) fn client(g: &Global) -> anyhow::Result<Client> {
    let file = config::load()?;
    let server = g.server.clone().or(file.server).context(
        "no server: pass --server, set NOVACRON_SERVER, or run `novacron login --server URL`",
    )?;
    Ok(Client::new(&server, g.token.clone().or(file.token)))
}

pub(crate) fn read_password(prompt: &str, from_stdin: bool) -> anyhow::Result<String> {
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

pub(crate) fn print_op(op: &Operation, g: &Global) -> anyhow::Result<()> {
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
