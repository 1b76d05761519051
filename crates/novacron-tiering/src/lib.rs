//! Storage tiering's decision side: which data will be hot.
//!
//! - [`trace`]: block I/O traces (CloudPhysics, generic CSV); [`synth`]: seeded synthetic ones.
//! - [`series`]: the collector's bounded store of per-volume I/O counters (downsampled).
//! - [`window`]: volumes cut into extents (the unit that is predicted and moved) and time into
//!   windows; [`window::History`] grows one window at a time.
//! - [`features`]: the analyzer (rate, read/write mix, sequential share, burstiness, trend,
//!   daily and weekly periodicity, recency, neighbours) and the temperature classes.
//! - [`model`]: the predictors (Holt-Winters, Markov chain, neural network, their ensemble)
//!   and the baselines.
//! - [`online`]: the models as a host runs them: whole volumes, window by window, with
//!   each model's running accuracy.
//! - [`eval`]: replaying a trace through all of them, online, against an oracle.
//! - [`planner`]: predictions and policies (maintenance, capacity, performance, time, cost)
//!   into a move plan with a reason per move, with hysteresis.
//!
//! Invariants: pure (no clock, no network; files only in `trace::read`); every predictor
//! learns only from windows that have closed; the same input and seed give the same output.

pub mod eval;
pub mod features;
pub mod model;
pub mod online;
pub mod planner;
pub mod series;
pub mod synth;
pub mod trace;
pub mod window;

#[cfg(test)]
pub(crate) mod testutil {
    use crate::features::{Temperature, Thresholds};
    use crate::model::{Prediction, Predictor, Replay};
    use crate::window::{History, UnitKey, WindowStats};

    /// Window `w` of units given as per-window request counts (extents 0.. of one volume).
    fn touched(units: &[Vec<u32>], w: usize) -> Vec<(UnitKey, WindowStats)> {
        units
            .iter()
            .enumerate()
            .filter(|(_, ops)| ops[w] > 0)
            .map(|(e, ops)| {
                (
                    UnitKey {
                        volume: 0,
                        extent: e as u64,
                    },
                    WindowStats {
                        ops: ops[w],
                        writes: ops[w] / 4,
                        sequential: ops[w] / 2,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// The history of such units.
    pub fn history(units: &[Vec<u32>], window_s: f64) -> History {
        let mut h = History::new(window_s);
        for w in 0..units[0].len() {
            h.push(&touched(units, w));
        }
        h
    }

    /// Runs a predictor over such units; returns its forecasts made after each window (for
    /// the window after), indexed by extent.
    pub fn run_units(
        p: &mut dyn Predictor,
        units: &[Vec<u32>],
        window_s: f64,
    ) -> Vec<Vec<Prediction>> {
        let mut replay = Replay::new(window_s, Thresholds::per_minute(10.0, window_s), 1);
        let mut out = Vec::new();
        for w in 0..units[0].len() {
            replay.push(&touched(units, w));
            let ctx = replay.context();
            p.learn(&ctx);
            // Units are created in order of first access; index the forecasts by extent.
            let preds = p.predict(&ctx);
            let mut by_extent = vec![Prediction::certain(Temperature::Cold, 0.0); units.len()];
            for (u, key) in ctx.history.units.iter().enumerate() {
                by_extent[key.extent as usize] = preds[u];
            }
            out.push(by_extent);
        }
        out
    }

    /// [`run_units`] for one unit.
    pub fn run_series(p: &mut dyn Predictor, ops: &[u32], window_s: f64) -> Vec<Prediction> {
        run_units(p, &[ops.to_vec()], window_s)
            .into_iter()
            .map(|v| v[0])
            .collect()
    }
}
