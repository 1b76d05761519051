//! `novacron tiering ...`: the tiering policy in force, and the predictors replayed on a trace.

use anyhow::bail;
use clap::Subcommand;

use novacron_types::TieringPolicy;

use super::common::{Global, client};
use crate::output::{self, Format};

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

pub(crate) fn tiering(g: &Global, cmd: TieringCommand) -> anyhow::Result<()> {
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

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// The tiering policy in force.
    Show,
    /// Replace the tiering policy with a JSON file's (every field; see `policy show -o json`).
    Set {
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

pub async fn policy(g: &Global, cmd: PolicyCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    let p = match cmd {
        PolicyCommand::Show => c.tiering_policy().await?,
        PolicyCommand::Set { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let p: TieringPolicy = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a tiering policy: {e}", file.display()))?;
            c.set_tiering_policy(&p).await?
        }
    };
    if g.output == Format::Json {
        return output::json(&p);
    }
    println!("{}", serde_json::to_string_pretty(&p)?);
    Ok(())
}
