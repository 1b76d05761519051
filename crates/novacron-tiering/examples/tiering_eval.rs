//! Prints the `tiering eval` table for the CloudPhysics trace (`../shared/traces/`, or the path
//! given as the first argument) and for every synthetic shape with two seeds each, with the goal
//! lines (`NOT MET` where a goal is missed). `cargo run --release --example tiering_eval`.
//!
//! The models' constants were tuned on the CloudPhysics trace and on seeds 11 and 12 of each
//! shape; this prints seeds 31 and 32, which no tuning saw (`TIERING_SEEDS=11,12` for those).

use std::path::PathBuf;
use std::time::Instant;

use novacron_tiering::{eval, synth, trace, window};

fn main() {
    let cp = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/traces/cloudphysics-io.csv")
        });
    let mut settings = eval::EvalSettings::default();
    if let Some(h) = std::env::var("TIERING_HYSTERESIS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.hysteresis = h;
    }
    let seeds: Vec<u64> = std::env::var("TIERING_SEEDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![31, 32]);
    let mut missed = 0;
    let mut run = |title: String, t: &trace::Trace, window_s: f64| {
        let started = Instant::now();
        let cut = window::cut(t, 64 << 20, window_s);
        let report = eval::evaluate(&cut, &settings);
        println!(
            "== {title} (window {window_s} s, extent 64 MiB, {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let table = eval::table(&report);
        missed += table.matches("NOT MET").count();
        println!("{table}");
    };
    match trace::read(&cp, trace::Format::CloudPhysics) {
        Ok(t) => run(format!("cloudphysics {}", cp.display()), &t, 60.0),
        Err(e) => println!("== cloudphysics: {e}"),
    }
    for shape in synth::Shape::ALL {
        for seed in seeds.iter().copied() {
            let t = synth::generate(&synth::Synth::new(shape, seed));
            run(
                format!("synthetic {} seed {seed}", shape.as_str()),
                &t,
                shape.window_s(),
            );
        }
    }
    missed += planning_bench();
    println!("goals missed: {missed}");
}

/// Planning time per volume at 10,000 volumes on 6 pools, 200 plans with fresh predictions
/// each. Returns 1 if the goal (p99 under 10 us per volume) is missed.
fn planning_bench() -> usize {
    use novacron_tiering::features::Temperature;
    use novacron_tiering::planner::{self, Policies, PoolState, Tier, VolumeState};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let tiers = [
        Tier::Hot,
        Tier::Hot,
        Tier::Warm,
        Tier::Warm,
        Tier::Cold,
        Tier::Cold,
    ];
    let n = 10_000usize;
    let mut per_volume_ns: Vec<f64> = Vec::new();
    let mut moves = 0usize;
    for round in 0..200u64 {
        let mut pools: Vec<PoolState> = tiers
            .iter()
            .enumerate()
            .map(|(i, t)| PoolState {
                name: format!("p{i}"),
                tier: *t,
                capacity_bytes: 90_000 << 30,
                used_bytes: 0,
                cost_per_gib_month: 0.3 / (i as f64 + 1.0),
                draining: round % 50 == 0 && i == 2,
                shared: false,
            })
            .collect();
        let volumes: Vec<VolumeState> = (0..n)
            .map(|i| {
                let pool = rng.random_range(0..pools.len());
                let size = rng.random_range(1u64..64) << 30;
                pools[pool].used_bytes += size;
                let score: f64 = rng.random_range(0.0..8.0);
                VolumeState {
                    name: format!("v{i}"),
                    pool,
                    size_bytes: size,
                    predicted: if score > 6.0 {
                        Temperature::Hot
                    } else if score > 2.0 {
                        Temperature::Warm
                    } else {
                        Temperature::Cold
                    },
                    score,
                    idle_windows: rng.random_range(0..200),
                    moved_at: Some(round.saturating_sub(rng.random_range(0..20))),
                    needs_shared: None,
                }
            })
            .collect();
        let started = Instant::now();
        let plan = planner::plan(&pools, &volumes, &Policies::default(), round + 20);
        per_volume_ns.push(started.elapsed().as_nanos() as f64 / n as f64);
        moves += plan.len();
    }
    per_volume_ns.sort_by(f64::total_cmp);
    let q = |p: f64| per_volume_ns[((per_volume_ns.len() - 1) as f64 * p).round() as usize];
    let p99_us = q(0.99) / 1000.0;
    println!(
        "== planning: 10,000 volumes, 6 pools, 200 plans ({} moves planned): per volume p50 {:.3} us, p99 {:.3} us (goal p99 < 10 us; the prototype promised < 10 ms): {}",
        moves,
        q(0.5) / 1000.0,
        p99_us,
        if p99_us < 10.0 { "met" } else { "NOT MET" }
    );
    usize::from(p99_us >= 10.0)
}
