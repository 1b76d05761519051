//! Synthetic traces with known shapes, for evaluating on traces no model was tuned on. Every
//! generator is seeded: the same shape and seed give the same trace.
//!
//! - `diurnal`: tenants busy in their own hours of the day (three time zones), quiet at night;
//!   4 days, meant for 15-minute windows.
//! - `bursty`: units switching between bursts and silence, with heavy-tailed durations;
//!   6 hours, 1-minute windows.
//! - `shifting`: a hot region sliding through the address space, over a quiet background;
//!   6 hours, 1-minute windows.
//! - `scan`: a backup-style scan reading one volume extent by extent, over and over, beside a
//!   few steadily busy extents; 6 hours, 1-minute windows.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::trace::{Access, Trace};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Diurnal,
    Bursty,
    Shifting,
    Scan,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Diurnal, Shape::Bursty, Shape::Shifting, Shape::Scan];

    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Diurnal => "diurnal",
            Shape::Bursty => "bursty",
            Shape::Shifting => "shifting",
            Shape::Scan => "scan",
        }
    }

    /// The window the shape is meant to be evaluated with, in seconds.
    pub fn window_s(self) -> f64 {
        match self {
            Shape::Diurnal => 900.0,
            _ => 60.0,
        }
    }

    fn duration_s(self) -> f64 {
        match self {
            Shape::Diurnal => 4.0 * 86_400.0,
            _ => 6.0 * 3600.0,
        }
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Shape::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!("unknown shape '{s}' (expected diurnal, bursty, shifting or scan)")
            })
    }
}

/// Generation settings: `volumes` volumes of `extents` extents of `extent_bytes`; time runs
/// for the shape's duration times `scale` (scale < 1 for quick tests).
#[derive(Clone, Copy, Debug)]
pub struct Synth {
    pub shape: Shape,
    pub seed: u64,
    pub volumes: u32,
    pub extents: u64,
    pub extent_bytes: u64,
    pub scale: f64,
}

impl Synth {
    pub fn new(shape: Shape, seed: u64) -> Self {
        Self {
            shape,
            seed,
            volumes: 4,
            extents: 64,
            extent_bytes: 64 << 20,
            scale: 1.0,
        }
    }
}

/// A Poisson draw (Knuth's method for small means, a rounded normal for large ones).
fn poisson(rng: &mut StdRng, mean: f64) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        return (mean + mean.sqrt() * z).round().max(0.0) as u32;
    }
    let limit = (-mean).exp();
    let mut k = 0;
    let mut p: f64 = rng.random();
    while p > limit {
        k += 1;
        p *= rng.random::<f64>();
    }
    k
}

/// Heavy-tailed duration (Pareto, shape 1.5) with the given minimum, capped at 20x.
fn pareto(rng: &mut StdRng, min: f64) -> f64 {
    let u: f64 = rng.random_range(1e-9..1.0);
    (min / u.powf(1.0 / 1.5)).min(20.0 * min)
}

/// Generates the trace.
pub fn generate(s: &Synth) -> Trace {
    let mut rng = StdRng::seed_from_u64(s.seed ^ (s.shape as u64) << 32);
    let units = (s.volumes as u64 * s.extents) as usize;
    let duration = s.shape.duration_s() * s.scale;
    let step = 10.0;
    let steps = (duration / step).ceil() as usize;
    // Popularity: a Zipf-like weight per unit, in a shuffled order.
    let mut popularity: Vec<f64> = (0..units)
        .map(|r| 1.0 / (r as f64 + 1.0).powf(0.9))
        .collect();
    for i in (1..units).rev() {
        let j = rng.random_range(0..=i);
        popularity.swap(i, j);
    }
    // Per-shape state.
    let phase: Vec<f64> = (0..units)
        .map(|_| f64::from(rng.random_range(0..3u8)) / 3.0)
        .collect();
    let mut on: Vec<bool> = (0..units).map(|_| rng.random_bool(0.2)).collect();
    let mut switch_at: Vec<f64> = (0..units).map(|_| pareto(&mut rng, 300.0)).collect();
    let mut accesses: Vec<Access> = Vec::new();
    let mut cursor: Vec<u64> = vec![0; units];
    for k in 0..steps {
        let t = k as f64 * step;
        for u in 0..units {
            let p = popularity[u];
            let volume = (u as u64 / s.extents) as u32;
            let extent = u as u64 % s.extents;
            let rate = match s.shape {
                Shape::Diurnal => {
                    let day = (t / 86_400.0 - phase[u]).rem_euclid(1.0);
                    let business = (std::f64::consts::PI * day / 0.5).sin().max(0.0);
                    let busy = if day < 0.5 { business * business } else { 0.0 };
                    3.0 * p * (0.02 + busy)
                }
                Shape::Bursty => {
                    if t >= switch_at[u] {
                        on[u] = !on[u];
                        let min = if on[u] { 120.0 } else { 600.0 };
                        switch_at[u] = t + pareto(&mut rng, min);
                    }
                    if on[u] { 4.0 * p.sqrt() } else { 0.002 }
                }
                Shape::Shifting => {
                    // A region of 12 extents of volume 0..volumes, sliding one extent every
                    // 5 minutes across all units.
                    let head = (t / 300.0) as u64 % units as u64;
                    let d = (u as u64 + units as u64 - head) % units as u64;
                    let hot = if d < 12 {
                        2.0 * (1.0 - d as f64 / 14.0)
                    } else {
                        0.0
                    };
                    hot + 0.01 * p
                }
                Shape::Scan => {
                    // Volume 0 is scanned at one extent per 70 s, starting again after a pause
                    // of 30 minutes; a few extents of the others are steadily busy.
                    let cycle = s.extents as f64 * 70.0 + 1800.0;
                    let into = t % cycle;
                    let scanning = volume == 0 && (into / 70.0) as u64 == extent;
                    let steady = volume != 0 && p > 0.08;
                    (if scanning { 8.0 } else { 0.0 }) + if steady { 0.5 * p } else { 0.002 * p }
                }
            };
            let n = poisson(&mut rng, rate * step);
            for _ in 0..n {
                let sequential = matches!(s.shape, Shape::Scan) && volume == 0;
                let offset_in = if sequential {
                    let o = cursor[u];
                    cursor[u] = (o + 65_536) % s.extent_bytes;
                    o
                } else {
                    rng.random_range(0..s.extent_bytes / 4096) * 4096
                };
                accesses.push(Access {
                    t: t + rng.random_range(0.0..step),
                    volume,
                    write: rng.random_bool(0.3),
                    offset: extent * s.extent_bytes + offset_in,
                    size: if sequential { 65_536 } else { 4096 },
                });
            }
        }
    }
    accesses.sort_by(|a, b| a.t.total_cmp(&b.t));
    Trace {
        volumes: (0..s.volumes).map(|v| format!("vol{v}")).collect(),
        accesses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_shaped() {
        let mut s = Synth::new(Shape::Diurnal, 5);
        s.volumes = 1;
        s.extents = 16;
        s.scale = 0.5;
        let a = generate(&s);
        assert_eq!(a.accesses, generate(&s).accesses, "same seed, same trace");
        s.seed = 6;
        assert_ne!(a.accesses, generate(&s).accesses);
        assert!(a.accesses.windows(2).all(|w| w[0].t <= w[1].t));
        // Diurnal: far more requests in some hours than in others.
        let mut per_hour = [0u32; 24];
        for x in &a.accesses {
            per_hour[((x.t / 3600.0) as usize) % 24] += 1;
        }
        let (lo, hi) = (
            per_hour.iter().min().copied(),
            per_hour.iter().max().copied(),
        );
        assert!(hi.unwrap_or(0) > 5 * lo.unwrap_or(0).max(1), "{per_hour:?}");
    }

    #[test]
    fn a_scan_walks_the_extents_in_order() {
        let mut s = Synth::new(Shape::Scan, 1);
        s.extents = 8;
        s.scale = 0.1;
        let t = generate(&s);
        let scanned: Vec<u64> = t
            .accesses
            .iter()
            .filter(|a| a.volume == 0 && a.size == 65_536)
            .map(|a| a.offset / s.extent_bytes)
            .collect();
        assert!(
            scanned.windows(2).all(|w| w[1] >= w[0] || w[1] == 0),
            "in order, then again"
        );
        assert!(scanned.contains(&7));
    }
}
