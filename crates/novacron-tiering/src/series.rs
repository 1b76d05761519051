//! The collector's store: per-volume time series of I/O counters, bounded. Samples arrive as
//! QEMU's cumulative counters (`query-blockstats`: bytes and operations, read and write); the
//! store keeps the differences in a few resolutions, each a ring of fixed length, so memory per
//! volume is constant however long the volume lives (downsampled history):
//!
//! | resolution | kept |
//! |---|---|
//! | the sampling step (10 s by default) | 1 hour |
//! | 1 minute | 1 day |
//! | 15 minutes | 30 days |
//!
//! A counter that goes backwards (QEMU restarted, the volume re-attached) starts a new baseline
//! instead of producing a negative or huge difference.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// QEMU's cumulative counters of one block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
}

/// Activity in one bucket of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the bucket, seconds (Unix time or any monotonic origin).
    pub start: u64,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_ops: u64,
    pub wr_ops: u64,
}

impl Bucket {
    fn add(&mut self, d: &Counters) {
        self.rd_bytes += d.rd_bytes;
        self.wr_bytes += d.wr_bytes;
        self.rd_ops += d.rd_ops;
        self.wr_ops += d.wr_ops;
    }

    pub fn ops(&self) -> u64 {
        self.rd_ops + self.wr_ops
    }
}

/// One resolution: buckets of `step` seconds, at most `keep` of them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ring {
    step: u64,
    keep: usize,
    buckets: VecDeque<Bucket>,
}

impl Ring {
    fn add(&mut self, t: u64, d: &Counters) {
        let start = t - t % self.step;
        match self.buckets.back_mut() {
            Some(b) if b.start == start => b.add(d),
            Some(b) if b.start > start => {
                // A late sample: counted in the newest bucket rather than lost.
                b.add(d)
            }
            _ => {
                let mut b = Bucket {
                    start,
                    ..Default::default()
                };
                b.add(d);
                self.buckets.push_back(b);
                while self.buckets.len() > self.keep {
                    self.buckets.pop_front();
                }
            }
        }
    }
}

/// One volume's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    last: Option<Counters>,
    rings: Vec<Ring>,
}

/// The resolutions: `(step seconds, buckets kept)`.
pub fn resolutions(sample_s: u64) -> Vec<(u64, usize)> {
    let sample_s = sample_s.max(1);
    vec![
        (sample_s, (3600 / sample_s).max(1) as usize),
        (60, 24 * 60),
        (900, 30 * 96),
    ]
}

impl Series {
    pub fn new(sample_s: u64) -> Self {
        Self {
            last: None,
            rings: resolutions(sample_s)
                .into_iter()
                .map(|(step, keep)| Ring {
                    step,
                    keep,
                    buckets: VecDeque::new(),
                })
                .collect(),
        }
    }

    /// Records cumulative counters sampled at `t` seconds.
    pub fn sample(&mut self, t: u64, now: Counters) {
        let Some(last) = self.last.replace(now) else {
            return;
        };
        let backwards = now.rd_bytes < last.rd_bytes
            || now.wr_bytes < last.wr_bytes
            || now.rd_ops < last.rd_ops
            || now.wr_ops < last.wr_ops;
        let d = if backwards {
            // Counters were reset: what was counted since the reset is all we know.
            now
        } else {
            Counters {
                rd_bytes: now.rd_bytes - last.rd_bytes,
                wr_bytes: now.wr_bytes - last.wr_bytes,
                rd_ops: now.rd_ops - last.rd_ops,
                wr_ops: now.wr_ops - last.wr_ops,
            }
        };
        for r in &mut self.rings {
            r.add(t, &d);
        }
    }

    /// The buckets of the finest resolution whose step is at least `step` seconds... or the
    /// coarsest if none; oldest first.
    pub fn buckets(&self, step: u64) -> (u64, Vec<Bucket>) {
        let ring = self
            .rings
            .iter()
            .find(|r| r.step >= step)
            .or(self.rings.last());
        match ring {
            Some(r) => (r.step, r.buckets.iter().copied().collect()),
            None => (step, Vec::new()),
        }
    }

    /// Buckets held across all resolutions (constant once the rings are full).
    pub fn len(&self) -> usize {
        self.rings.iter().map(|r| r.buckets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every volume's series, by volume name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Store {
    sample_s: u64,
    volumes: BTreeMap<String, Series>,
}

impl Store {
    pub fn new(sample_s: u64) -> Self {
        Self {
            sample_s,
            volumes: BTreeMap::new(),
        }
    }

    pub fn sample(&mut self, volume: &str, t: u64, now: Counters) {
        let step = self.sample_s;
        self.volumes
            .entry(volume.to_string())
            .or_insert_with(|| Series::new(step))
            .sample(t, now);
    }

    /// A volume that is gone (deleted) leaves the store.
    pub fn forget(&mut self, volume: &str) {
        self.volumes.remove(volume);
    }

    pub fn get(&self, volume: &str) -> Option<&Series> {
        self.volumes.get(volume)
    }

    pub fn volumes(&self) -> impl Iterator<Item = (&String, &Series)> {
        self.volumes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rd_ops: u64, wr_ops: u64) -> Counters {
        Counters {
            rd_bytes: rd_ops * 4096,
            wr_bytes: wr_ops * 4096,
            rd_ops,
            wr_ops,
        }
    }

    #[test]
    fn differences_land_in_every_resolution() {
        let mut s = Series::new(10);
        s.sample(0, c(100, 0));
        s.sample(10, c(110, 5));
        s.sample(20, c(130, 5));
        s.sample(70, c(130, 25));
        let (step, fine) = s.buckets(10);
        assert_eq!(step, 10);
        assert_eq!(
            fine.iter().map(|b| (b.start, b.ops())).collect::<Vec<_>>(),
            vec![(10, 15), (20, 20), (70, 20)]
        );
        let (step, minute) = s.buckets(60);
        assert_eq!(step, 60);
        assert_eq!(
            minute
                .iter()
                .map(|b| (b.start, b.rd_ops, b.wr_ops))
                .collect::<Vec<_>>(),
            vec![(0, 30, 5), (60, 0, 20)]
        );
        assert_eq!(minute[0].rd_bytes, 30 * 4096);
        assert_eq!(s.buckets(900).1[0].ops(), 55);
    }

    #[test]
    fn memory_stays_bounded_over_a_long_life() {
        let mut s = Series::new(10);
        // 40 days of samples every 10 s.
        for i in 0..(40 * 8640u64) {
            s.sample(i * 10, c(i, i / 2));
        }
        let max = 360 + 24 * 60 + 30 * 96;
        assert_eq!(s.len(), max);
        let (_, coarse) = s.buckets(900);
        assert_eq!(coarse.len(), 30 * 96, "30 days of 15-minute buckets");
        // The newest 15-minute bucket: 90 samples of one read and (mostly) half a write each.
        assert_eq!(coarse.last().expect("bucket").rd_ops, 90);
    }

    #[test]
    fn a_counter_reset_starts_a_new_baseline() {
        let mut s = Series::new(10);
        s.sample(0, c(1000, 1000));
        s.sample(10, c(1010, 1000));
        // QEMU restarted: counters start again from zero.
        s.sample(20, c(3, 0));
        s.sample(30, c(8, 1));
        let ops: Vec<u64> = s.buckets(10).1.iter().map(Bucket::ops).collect();
        assert_eq!(ops, vec![10, 3, 6]);
        let mut store = Store::new(10);
        store.sample("v", 0, c(1, 1));
        store.sample("v", 10, c(2, 1));
        assert_eq!(store.get("v").map(Series::len), Some(3));
        store.forget("v");
        assert!(store.get("v").is_none());
    }
}
