//! The move limiter's benchmark: achieved rate against 1, 10, 100 and 200 MB/s (goal: within
//! 3%), and fairness across 100 concurrent moves under one global limit (Jain's index, goal
//! >= 0.95). `cargo run --release -p novacron-server --example limiter_bench`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use novacron_server::limiter::{Limits, MoveLimiter};

const PIECE: usize = 64 * 1024;

#[tokio::main]
async fn main() {
    let mut missed = 0;
    for mb in [1u64, 10, 100, 200] {
        let rate = mb * 1_000_000;
        let l = MoveLimiter::new(Limits {
            global: rate,
            per_pool: rate,
            per_volume: rate,
        })
        .expect("limits");
        // Drain the initial burst, then time a steady stretch of about 2 seconds.
        l.take("pool", "vol", (rate / 10) as usize).await;
        let bytes = (rate * 2) as usize;
        let started = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(PIECE);
            l.take("pool", "vol", n).await;
            left -= n;
        }
        let achieved = bytes as f64 / started.elapsed().as_secs_f64();
        let error = (achieved - rate as f64) / rate as f64 * 100.0;
        let ok = error.abs() <= 3.0;
        missed += usize::from(!ok);
        println!(
            "limit {mb:>3} MB/s: achieved {:>7.2} MB/s ({error:+.2}%; goal within 3%: {})",
            achieved / 1e6,
            if ok { "met" } else { "NOT MET" }
        );
    }

    // 100 moves of different volumes on two pools under a global 100 MB/s.
    let l = Arc::new(
        MoveLimiter::new(Limits {
            global: 100_000_000,
            per_pool: 200_000_000,
            per_volume: 200_000_000,
        })
        .expect("limits"),
    );
    l.take("warm-up", "warm-up", 10_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> = (0..100).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let started = Instant::now();
    let tasks: Vec<_> = counters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (l, c, stop) = (l.clone(), c.clone(), stop.clone());
            tokio::spawn(async move {
                let pool = if i % 2 == 0 { "a" } else { "b" };
                let vol = format!("vol{i}");
                while !stop.load(Ordering::Relaxed) {
                    l.take(pool, &vol, PIECE).await;
                    c.fetch_add(PIECE as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let moved: Vec<f64> = counters
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as f64)
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let sum: f64 = moved.iter().sum();
    let sq: f64 = moved.iter().map(|x| x * x).sum();
    let jain = sum * sum / (moved.len() as f64 * sq);
    let ok = jain >= 0.95;
    missed += usize::from(!ok);
    println!(
        "100 moves under a global 100 MB/s: total {:.2} MB/s, per move min {:.2} / max {:.2} MB/s, Jain's index {jain:.4} (goal >= 0.95: {})",
        sum / elapsed / 1e6,
        moved.iter().cloned().fold(f64::INFINITY, f64::min) / elapsed / 1e6,
        moved.iter().cloned().fold(0.0, f64::max) / elapsed / 1e6,
        if ok { "met" } else { "NOT MET" }
    );
    println!("goals missed: {missed}");
}
