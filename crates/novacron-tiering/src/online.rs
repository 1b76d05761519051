//! The models as a running host uses them: volumes (whole, one unit each) report their I/O
//! window by window; the three models and the ensemble learn from every window that closes and
//! forecast the next. Pure: the caller brings the counts and the clock.
//!
//! It also keeps score: for each model, the share of its past class forecasts that came true
//! (what `novacron_tiering_accuracy` shows).
//!
//! Memory stays bounded: the last `keep` windows' counts are kept, and once the models'
//! history reaches `4 × keep` windows a fresh forecaster learns from those alone (volumes
//! absent from all of them, deleted ones, are forgotten). `keep` is two days of windows, at
//! most [`MAX_KEEP`].

use std::collections::{BTreeMap, VecDeque};

use crate::features::{Temperature, Thresholds};
use crate::model::ensemble::Ensemble;
use crate::model::holt_winters::HoltWinters;
use crate::model::markov::Markov;
use crate::model::neural::Neural;
use crate::model::{Prediction, Predictor, Replay};
use crate::window::{UnitKey, WindowStats};

/// One volume's forecast for the next window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    pub class: Temperature,
    /// Expected `log1p(operations)`.
    pub score: f64,
    /// Windows since its last I/O (0: this window had some).
    pub idle_windows: u64,
}

pub struct Forecaster {
    replay: Replay,
    models: Vec<Box<dyn Predictor + Send>>,
    ensemble: Ensemble,
    /// Volume key → unit number.
    units: BTreeMap<String, u32>,
    /// Last window's class forecasts by model (models, then the ensemble), per unit.
    pending: Vec<Vec<Temperature>>,
    /// Right and total forecasts per model (models, then the ensemble).
    score: Vec<(u64, u64)>,
    /// The last windows' counts (at most `keep`), what a rebuild learns from.
    recent: VecDeque<BTreeMap<String, u64>>,
    keep: usize,
    /// Windows closed in all.
    closed: usize,
    /// `new`'s arguments, for a rebuild.
    params: (f64, f64, usize, u64),
}

/// The most windows a rebuild replays.
pub const MAX_KEEP: usize = 2048;

/// Names of the scored forecasters, in `accuracy()` order.
pub const NAMES: [&str; 4] = ["holt-winters", "markov", "neural", "ensemble"];

impl Forecaster {
    /// `hot_ops`: operations in a window from which a volume is hot (any I/O makes it warm).
    pub fn new(window_s: f64, hot_ops: f64, hot_capacity: usize, seed: u64) -> Self {
        let replay = Replay::new(
            window_s,
            Thresholds {
                hot_ops: hot_ops.max(2.0),
            },
            hot_capacity.max(1),
        );
        let day = replay.analyzer.day;
        let models: Vec<Box<dyn Predictor + Send>> = vec![
            Box::new(HoltWinters::new(day)),
            Box::new(Markov::new()),
            Box::new(Neural::new(seed)),
        ];
        let n = models.len();
        Self {
            replay,
            ensemble: Ensemble::new(n),
            models,
            units: BTreeMap::new(),
            pending: Vec::new(),
            score: vec![(0, 0); n + 1],
            recent: VecDeque::new(),
            keep: day.map_or(MAX_KEEP, |d| 2 * d).clamp(16, MAX_KEEP),
            closed: 0,
            params: (window_s, hot_ops, hot_capacity, seed),
        }
    }

    /// Keeps `keep` windows across a rebuild (at least 1) instead of two days' worth.
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep.max(1);
        self
    }

    /// Closes a window: `ops[volume]` operations each volume did in it (volumes not named did
    /// none). Returns every known volume's forecast for the next window.
    pub fn push(&mut self, ops: &BTreeMap<String, u64>) -> BTreeMap<String, Forecast> {
        self.closed += 1;
        self.recent.push_back(ops.clone());
        if self.recent.len() > self.keep {
            self.recent.pop_front();
        }
        let out = self.step(ops);
        if self.replay.history.len >= 4 * self.keep {
            self.rebuild();
        }
        out
    }

    /// A fresh forecaster that has learnt from the kept windows only; the scores carry over.
    fn rebuild(&mut self) {
        let (window_s, hot_ops, hot_capacity, seed) = self.params;
        let mut fresh = Forecaster::new(window_s, hot_ops, hot_capacity, seed).with_keep(self.keep);
        for ops in &self.recent {
            fresh.step(ops);
        }
        fresh.recent = std::mem::take(&mut self.recent);
        fresh.score = std::mem::take(&mut self.score);
        fresh.closed = self.closed;
        *self = fresh;
    }

    fn step(&mut self, ops: &BTreeMap<String, u64>) -> BTreeMap<String, Forecast> {
        let mut touched = Vec::new();
        for (key, n) in ops {
            let next = self.units.len() as u32;
            let unit = *self.units.entry(key.clone()).or_insert(next);
            if *n > 0 {
                touched.push((
                    UnitKey {
                        volume: unit,
                        extent: 0,
                    },
                    WindowStats {
                        ops: (*n).min(u64::from(u32::MAX)) as u32,
                        ..Default::default()
                    },
                ));
            }
        }
        self.replay.push(&touched);
        let ctx = self.replay.context();
        let thresholds = ctx.thresholds;
        let w = ctx.w;
        // Score last window's forecasts against what this window was.
        let actual: Vec<Temperature> = ctx
            .history
            .series
            .iter()
            .map(|s| thresholds.classify(f64::from(s[w].ops)))
            .collect();
        for (m, forecast) in self.pending.iter().enumerate() {
            for (u, class) in forecast.iter().enumerate() {
                self.score[m].1 += 1;
                if actual.get(u) == Some(class) {
                    self.score[m].0 += 1;
                }
            }
        }
        self.ensemble.learn(&ctx);
        let mut member: Vec<Vec<Prediction>> = Vec::new();
        for m in &mut self.models {
            m.learn(&ctx);
            member.push(m.predict(&ctx));
        }
        let prior = ctx.prior;
        let mut pending: Vec<Vec<Temperature>> = member
            .iter()
            .map(|p| p.iter().map(|x| x.decide(&prior)).collect())
            .collect();
        let combined = self.ensemble.combine(member);
        let classes: Vec<Temperature> = combined
            .iter()
            .map(|p| self.ensemble.decide(p, &prior))
            .collect();
        pending.push(classes.clone());
        self.pending = pending;

        let history = &self.replay.history;
        let mut out = BTreeMap::new();
        for (key, unit) in &self.units {
            let Some(u) = history.unit(&UnitKey {
                volume: *unit,
                extent: 0,
            }) else {
                // Never did any I/O: cold, idle since it was first seen.
                out.insert(
                    key.clone(),
                    Forecast {
                        class: Temperature::Cold,
                        score: 0.0,
                        idle_windows: history.len as u64,
                    },
                );
                continue;
            };
            let series = &history.series[u];
            let idle = series.iter().rev().take_while(|s| s.ops == 0).count() as u64;
            out.insert(
                key.clone(),
                Forecast {
                    class: classes[u],
                    score: combined[u].score,
                    idle_windows: idle,
                },
            );
        }
        out
    }

    /// Share of each forecaster's class forecasts that came true so far ([`NAMES`] order);
    /// `None` before any was scored.
    pub fn accuracy(&self) -> Vec<Option<f64>> {
        self.score
            .iter()
            .map(|(right, total)| (*total > 0).then(|| *right as f64 / *total as f64))
            .collect()
    }

    /// Windows closed so far.
    pub fn windows(&self) -> usize {
        self.closed
    }

    /// Windows the models' history holds now (bounded, see the module doc).
    pub fn history_windows(&self) -> usize {
        self.replay.history.len
    }

    /// Volumes known now.
    pub fn volumes(&self) -> usize {
        self.units.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_volume_is_forecast_hot_an_idle_one_cold_and_scores_are_kept() {
        let mut f = Forecaster::new(60.0, 100.0, 1, 7);
        let mut last = BTreeMap::new();
        for _ in 0..30 {
            let ops: BTreeMap<String, u64> = [
                ("busy".to_string(), 500),
                ("idle".to_string(), 0),
                ("light".to_string(), 5),
            ]
            .into();
            last = f.push(&ops);
        }
        assert_eq!(last["busy"].class, Temperature::Hot, "{last:?}");
        assert_eq!(last["idle"].class, Temperature::Cold, "{last:?}");
        assert_eq!(last["light"].class, Temperature::Warm, "{last:?}");
        assert_eq!(last["idle"].idle_windows, 30);
        assert_eq!(last["busy"].idle_windows, 0);
        assert!(last["busy"].score > last["light"].score);
        let acc = f.accuracy();
        assert_eq!(acc.len(), NAMES.len());
        // A steady pattern is learnt: the ensemble is right nearly always.
        assert!(acc[3].is_some_and(|a| a > 0.8), "{acc:?}");
        assert_eq!(f.windows(), 30);
    }

    #[test]
    fn history_stays_bounded_and_deleted_volumes_are_forgotten() {
        let mut f = Forecaster::new(60.0, 100.0, 1, 7).with_keep(16);
        let mut last = BTreeMap::new();
        for w in 0..200 {
            let mut ops: BTreeMap<String, u64> = [("busy".to_string(), 500)].into();
            if w < 20 {
                ops.insert("gone".into(), 300);
            }
            last = f.push(&ops);
            assert!(
                f.history_windows() < 4 * 16,
                "window {w}: {}",
                f.history_windows()
            );
        }
        assert!(!last.contains_key("gone"), "{last:?}");
        assert_eq!(f.volumes(), 1);
        assert_eq!(last["busy"].class, Temperature::Hot, "{last:?}");
        assert_eq!(f.windows(), 200);
        // The scores span every window, across rebuilds.
        let acc = f.accuracy();
        assert!(acc[3].is_some_and(|a| a > 0.8), "{acc:?}");
    }

    #[test]
    fn a_volume_that_goes_quiet_is_forecast_colder() {
        let mut f = Forecaster::new(60.0, 100.0, 1, 7);
        let mut last = BTreeMap::new();
        for w in 0..60 {
            let n = if w < 30 { 400 } else { 0 };
            last = f.push(&[("v".to_string(), n)].into());
        }
        assert_eq!(last["v"].class, Temperature::Cold, "{last:?}");
        assert_eq!(last["v"].idle_windows, 30);
    }
}
