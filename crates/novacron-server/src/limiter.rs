//! Byte-rate limits for moving data (disk copies of cold migrations, tier moves): three levels
//! — global, per pool, per volume — each a `governor` GCRA bucket metering kibibytes, and an
//! adaptive factor that backs every level off when the guests' own I/O latency or the host's
//! load rises, and recovers when they fall (additive increase, multiplicative decrease).
//!
//! A move takes its bytes from its volume's bucket, then its pool's, then the global one, so
//! the tightest level sets its pace; moves sharing a level take turns at it (first come,
//! first served, one piece each), so they share it evenly.
//!
//! Invariants: configured rates are 1 to 200 MB/s (validated); the effective rate never goes
//! below 1 MB/s; no single request asks a bucket for more than its burst (governor refuses).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub const MIN_RATE: u64 = 1_000_000;
pub const MAX_RATE: u64 = 200_000_000;

/// One bucket: `bytes_per_sec`, bursting at most a tenth of a second's worth.
pub struct ByteRate {
    limiter: DefaultDirectRateLimiter,
    /// Waiters take turns (tokio's mutex is FIFO): GCRA alone lets whoever wakes first take
    /// the next cells, which starves some of many concurrent moves.
    turn: tokio::sync::Mutex<()>,
    burst_kib: u32,
    pub bytes_per_sec: u64,
}

impl ByteRate {
    pub fn new(bytes_per_sec: u64) -> Self {
        let kib = (bytes_per_sec / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        let burst_kib = (kib / 10).max(64);
        let limiter = RateLimiter::direct(
            Quota::per_second(NonZeroU32::new(kib).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst_kib).unwrap_or(NonZeroU32::MIN)),
        );
        Self {
            limiter,
            turn: tokio::sync::Mutex::new(()),
            burst_kib,
            bytes_per_sec,
        }
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: usize) {
        let mut kib = bytes.div_ceil(1024) as u32;
        while kib > 0 {
            let n = kib.min(self.burst_kib);
            if let Some(n) = NonZeroU32::new(n) {
                let _turn = self.turn.lock().await;
                // Never InsufficientCapacity: n is at most the burst.
                let _ = self.limiter.until_n_ready(n).await;
            }
            kib -= n;
        }
    }

    /// The largest request that passes in one piece.
    pub fn burst_bytes(&self) -> usize {
        self.burst_kib as usize * 1024
    }
}

/// Configured rates, bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub global: u64,
    pub per_pool: u64,
    pub per_volume: u64,
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("global", self.global),
            ("per_pool", self.per_pool),
            ("per_volume", self.per_volume),
        ] {
            if !(MIN_RATE..=MAX_RATE).contains(&v) {
                return Err(format!(
                    "{name} rate must be between 1 MB/s and 200 MB/s (got {v} bytes/s)"
                ));
            }
        }
        Ok(())
    }
}

/// What the guests and the host feel, sampled now and then.
#[derive(Clone, Copy, Debug)]
pub struct Pressure {
    /// The guests' I/O latency (for example the mean of `query-blockstats` latencies).
    pub guest_latency_ms: f64,
    pub latency_target_ms: f64,
    /// 1-minute load average per CPU.
    pub load_per_cpu: f64,
    pub load_target: f64,
}

/// The adaptive factor (pure): halves-ish under pressure, recovers by steps when calm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttle {
    pub factor: f64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self { factor: 1.0 }
    }
}

impl Throttle {
    pub const FLOOR: f64 = 0.05;

    /// The next factor after observing `p`.
    pub fn next(self, p: &Pressure) -> Self {
        let pressed = p.guest_latency_ms > p.latency_target_ms || p.load_per_cpu > p.load_target;
        let factor = if pressed {
            (self.factor * 0.6).max(Self::FLOOR)
        } else {
            (self.factor + 0.1).min(1.0)
        };
        Self { factor }
    }
}

/// One move competing for bandwidth: the pools it reads and writes, and its own cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveDemand {
    pub pools: [String; 2],
    pub cap: Option<u64>,
}

/// Each move's rate in bytes a second when the moves run as QEMU jobs with their own `speed`
/// (pure): the tightest of its cap, the per-volume limit, its pools' limit split evenly among
/// the moves using each pool, and the global limit split evenly among all moves, all times the
/// throttle factor. Moves with the same constraints get the same share (fair), and no level's
/// sum exceeds its limit.
pub fn shares(limits: &Limits, factor: f64, moves: &[MoveDemand]) -> Vec<u64> {
    let mut per_pool: HashMap<&str, u64> = HashMap::new();
    for m in moves {
        for p in dedup(&m.pools) {
            *per_pool.entry(p).or_default() += 1;
        }
    }
    let n = moves.len().max(1) as u64;
    moves
        .iter()
        .map(|m| {
            let mut r = limits.per_volume.min(limits.global / n);
            if let Some(c) = m.cap {
                r = r.min(c);
            }
            for p in dedup(&m.pools) {
                r = r.min(limits.per_pool / per_pool[p]);
            }
            ((r as f64 * factor) as u64).max(1)
        })
        .collect()
}

fn dedup(pools: &[String; 2]) -> Vec<&str> {
    if pools[0] == pools[1] {
        vec![pools[0].as_str()]
    } else {
        vec![pools[0].as_str(), pools[1].as_str()]
    }
}

/// The three levels, shared by every move of a host.
pub struct MoveLimiter {
    limits: Limits,
    throttle: Mutex<Throttle>,
    global: RwLock<Arc<ByteRate>>,
    pools: Mutex<HashMap<String, Arc<ByteRate>>>,
    volumes: Mutex<HashMap<String, Arc<ByteRate>>>,
}

impl MoveLimiter {
    pub fn new(limits: Limits) -> Result<Self, String> {
        limits.validate()?;
        Ok(Self {
            global: RwLock::new(Arc::new(ByteRate::new(limits.global))),
            limits,
            throttle: Mutex::new(Throttle::default()),
            pools: Mutex::new(HashMap::new()),
            volumes: Mutex::new(HashMap::new()),
        })
    }

    pub fn factor(&self) -> f64 {
        self.throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .factor
    }

    fn effective(&self, rate: u64) -> u64 {
        ((rate as f64 * self.factor()) as u64).max(MIN_RATE)
    }

    fn level(
        &self,
        map: &Mutex<HashMap<String, Arc<ByteRate>>>,
        key: &str,
        rate: u64,
    ) -> Arc<ByteRate> {
        let want = self.effective(rate);
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(key) {
            Some(b) if b.bytes_per_sec == want => b.clone(),
            _ => {
                let b = Arc::new(ByteRate::new(want));
                m.insert(key.to_string(), b.clone());
                b
            }
        }
    }

    /// Waits until a move of `volume` on `pool` may send `bytes` more.
    pub async fn take(&self, pool: &str, volume: &str, bytes: usize) {
        let v = self.level(&self.volumes, volume, self.limits.per_volume);
        let p = self.level(&self.pools, pool, self.limits.per_pool);
        let g = self
            .global
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Pieces no larger than the smallest burst, so no level is asked for more than it holds.
        let piece = v.burst_bytes().min(p.burst_bytes()).min(g.burst_bytes());
        let mut left = bytes;
        while left > 0 {
            let n = left.min(piece);
            v.take(n).await;
            p.take(n).await;
            g.take(n).await;
            left -= n;
        }
    }

    /// Adaptive throttling: call with fresh pressure figures; returns the factor now applied.
    pub fn observe(&self, p: &Pressure) -> f64 {
        let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
        let next = t.next(p);
        if next != *t {
            *t = next;
            drop(t);
            let rate = self.effective(self.limits.global);
            *self.global.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ByteRate::new(rate));
            // Pool and volume buckets are rebuilt at their next use.
        }
        self.factor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn rates_outside_1_to_200_mb_s_are_refused_by_name() {
        let ok = Limits {
            global: 100_000_000,
            per_pool: 50_000_000,
            per_volume: 10_000_000,
        };
        assert!(ok.validate().is_ok());
        let e = Limits {
            per_pool: 999_999,
            ..ok
        }
        .validate()
        .expect_err("too slow");
        assert!(e.starts_with("per_pool rate"), "{e}");
        let e = Limits {
            global: 200_000_001,
            ..ok
        }
        .validate()
        .expect_err("too fast");
        assert!(e.starts_with("global rate"), "{e}");
    }

    #[test]
    fn throttling_backs_off_under_pressure_and_recovers_when_calm() {
        let pressed = Pressure {
            guest_latency_ms: 40.0,
            latency_target_ms: 10.0,
            load_per_cpu: 0.2,
            load_target: 1.0,
        };
        let calm = Pressure {
            guest_latency_ms: 2.0,
            ..pressed
        };
        let loaded = Pressure {
            load_per_cpu: 1.5,
            ..calm
        };
        let mut t = Throttle::default();
        t = t.next(&pressed);
        assert!((t.factor - 0.6).abs() < 1e-12);
        t = t.next(&loaded);
        assert!((t.factor - 0.36).abs() < 1e-12);
        for _ in 0..20 {
            t = t.next(&pressed);
        }
        assert_eq!(t.factor, Throttle::FLOOR);
        for _ in 0..3 {
            t = t.next(&calm);
        }
        assert!((t.factor - (Throttle::FLOOR + 0.3)).abs() < 1e-9);
        for _ in 0..20 {
            t = t.next(&calm);
        }
        assert_eq!(t.factor, 1.0);
    }

    #[tokio::test]
    async fn the_tightest_level_sets_the_pace_and_the_factor_applies() {
        let l = MoveLimiter::new(Limits {
            global: 200_000_000,
            per_pool: 200_000_000,
            per_volume: 20_000_000,
        })
        .expect("limits");
        // 20 MB/s with a 2 MB burst: 8 MB take at least 0.29 s (6 MB beyond the burst).
        let started = std::time::Instant::now();
        l.take("p", "v", 8_000_000).await;
        let took = started.elapsed().as_secs_f64();
        assert!(took > 0.25, "8 MB at 20 MB/s passed in {took} s");
        // Under pressure the volume's bucket shrinks to 60%: the same amount takes longer.
        let f = l.observe(&Pressure {
            guest_latency_ms: 50.0,
            latency_target_ms: 10.0,
            load_per_cpu: 0.1,
            load_target: 1.0,
        });
        assert!((f - 0.6).abs() < 1e-12);
        let started = std::time::Instant::now();
        l.take("p", "v2", 8_000_000).await;
        let slower = started.elapsed().as_secs_f64();
        assert!(slower > took * 1.3, "throttled {slower} s vs {took} s");
    }

    #[test]
    fn shares_split_each_level_evenly_and_never_exceed_it() {
        let limits = Limits {
            global: 100 * MB,
            per_pool: 30 * MB,
            per_volume: 50 * MB,
        };
        let mv = |a: &str, b: &str, cap| MoveDemand {
            pools: [a.to_string(), b.to_string()],
            cap,
        };
        // One move: the per-volume limit, or its own cap if lower, or its pool's.
        assert_eq!(
            shares(&limits, 1.0, &[mv("hot", "cold", None)]),
            vec![30 * MB]
        );
        assert_eq!(
            shares(&limits, 1.0, &[mv("hot", "cold", Some(MB))]),
            vec![MB]
        );
        // Three moves out of `hot` share its 30 MB/s; a move elsewhere gets its own pool's.
        let s = shares(
            &limits,
            1.0,
            &[
                mv("hot", "cold", None),
                mv("hot", "warm", None),
                mv("hot", "cold", None),
                mv("a", "b", None),
            ],
        );
        assert_eq!(s, vec![10 * MB, 10 * MB, 10 * MB, 25 * MB]);
        assert!(s.iter().sum::<u64>() <= limits.global);
        // 100 moves share the global limit evenly (Jain's index 1), halved by the throttle.
        let many: Vec<MoveDemand> = (0..100).map(|i| mv(&format!("p{i}"), "q", None)).collect();
        let s = shares(&limits, 0.5, &many);
        assert!(s.iter().all(|x| *x == s[0]));
        assert!(s.iter().sum::<u64>() <= limits.global / 2);
    }
}
