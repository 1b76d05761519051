//! Exponential smoothing with a damped additive trend and an additive daily season (Holt-Winters
//! / ETS(A,Ad,A)) on `log1p(requests)`, one state per unit, updated once per window.
//!
//! Learning: the smoothing parameters are not fixed. A small grid of parameter sets runs side by
//! side on every unit; each keeps an exponentially weighted squared error of its one-step
//! forecasts, and the forecast comes from the set with the lowest (so the model settles on fast
//! or slow smoothing, with or without trend and season, by what the data rewards). The spread of
//! its recent errors turns the point forecast into class probabilities.
//!
//! Why not the `augurs` crate: its ETS fits a model to a whole series by optimisation; here
//! thousands of units each need one cheap update per window, which the recursions below are.

use super::{Context, Kind, Prediction, Predictor, class_probs};

/// One parameter set's per-unit state.
#[derive(Clone, Debug, Default)]
struct State {
    level: f64,
    trend: f64,
    season: Vec<f64>,
    started: bool,
}

#[derive(Clone, Copy, Debug)]
struct Params {
    alpha: f64,
    beta: f64,
    gamma: f64,
    phi: f64,
}

pub struct HoltWinters {
    grid: Vec<Params>,
    /// `states[p][u]`.
    states: Vec<Vec<State>>,
    /// Exponentially weighted squared one-step error per parameter set.
    error: Vec<f64>,
    /// Exponentially weighted squared error of the forecasts actually given.
    variance: f64,
    season: Option<usize>,
}

const ERROR_DECAY: f64 = 0.05;

impl HoltWinters {
    pub fn new(season: Option<usize>) -> Self {
        let mut grid = Vec::new();
        for alpha in [0.3, 0.6, 0.9, 1.0] {
            for beta in [0.0, 0.15] {
                for gamma in if season.is_some() {
                    vec![0.0, 0.4]
                } else {
                    vec![0.0]
                } {
                    grid.push(Params {
                        alpha,
                        beta,
                        gamma,
                        phi: 0.85,
                    });
                }
            }
        }
        Self {
            states: vec![Vec::new(); grid.len()],
            error: vec![0.0; grid.len()],
            grid,
            variance: 1.0,
            season,
        }
    }

    fn forecast(&self, p: usize, s: &State, next: usize) -> f64 {
        let par = self.grid[p];
        let seasonal = match self.season {
            Some(m) if !s.season.is_empty() => s.season[next % m],
            _ => 0.0,
        };
        (s.level + par.phi * s.trend + seasonal).max(0.0)
    }

    fn best(&self) -> usize {
        let mut best = 0;
        for p in 1..self.grid.len() {
            if self.error[p] < self.error[best] - 1e-12 {
                best = p;
            }
        }
        best
    }
}

impl Predictor for HoltWinters {
    fn name(&self) -> &'static str {
        "holt-winters"
    }

    fn kind(&self) -> Kind {
        Kind::Model
    }

    fn learn(&mut self, ctx: &Context) {
        let h = ctx.history;
        let w = ctx.w;
        let best = self.best();
        for p in 0..self.grid.len() {
            let par = self.grid[p];
            let states = &mut self.states[p];
            states.resize_with(h.units.len(), State::default);
            let mut sq = 0.0;
            let mut n = 0usize;
            for (u, s) in states.iter_mut().enumerate() {
                let y = h.y(u, w as isize);
                if !s.started {
                    // A unit starts at its first window, flat.
                    s.level = y;
                    s.started = true;
                    if let Some(m) = self.season {
                        s.season = vec![0.0; m];
                    }
                    continue;
                }
                let seasonal = match self.season {
                    Some(m) => s.season[w % m],
                    None => 0.0,
                };
                let forecast = (s.level + par.phi * s.trend + seasonal).max(0.0);
                let e = y - forecast;
                sq += e * e;
                n += 1;
                if p == best {
                    self.variance = (1.0 - ERROR_DECAY) * self.variance + ERROR_DECAY * e * e;
                }
                let level =
                    par.alpha * (y - seasonal) + (1.0 - par.alpha) * (s.level + par.phi * s.trend);
                s.trend = par.beta * (level - s.level) + (1.0 - par.beta) * par.phi * s.trend;
                s.level = level;
                if let Some(m) = self.season {
                    s.season[w % m] = par.gamma * (y - level) + (1.0 - par.gamma) * seasonal;
                }
            }
            if n > 0 {
                let mse = sq / n as f64;
                self.error[p] = (1.0 - ERROR_DECAY) * self.error[p] + ERROR_DECAY * mse;
            }
        }
    }

    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        let best = self.best();
        let sd = self.variance.sqrt();
        let states = &self.states[best];
        (0..ctx.history.units.len())
            .map(|u| {
                let mean = states
                    .get(u)
                    .map(|s| self.forecast(best, s, ctx.w + 1))
                    .unwrap_or(0.0);
                Prediction {
                    score: mean,
                    probs: class_probs(mean, sd, &ctx.thresholds),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::run_series;

    #[test]
    fn it_learns_a_daily_season() {
        // 8 windows a day (3 h windows); busy in windows 2 and 3 of each day, idle otherwise.
        let ops: Vec<u32> = (0..8 * 6)
            .map(|w| if matches!(w % 8, 2 | 3) { 200 } else { 0 })
            .collect();
        let mut m = HoltWinters::new(Some(8));
        let preds = run_series(&mut m, &ops, 10_800.0);
        // After four days it expects the busy windows before they come.
        for w in 4 * 8..ops.len() - 1 {
            let busy_next = ops[w + 1] > 0;
            let p = preds[w];
            assert_eq!(p.score > 2.5, busy_next, "window {w}: score {}", p.score);
        }
    }

    #[test]
    fn it_follows_a_level_without_season() {
        let ops: Vec<u32> = (0..30).map(|w| if w < 15 { 5 } else { 100 }).collect();
        let mut m = HoltWinters::new(None);
        let preds = run_series(&mut m, &ops, 60.0);
        assert!(
            (preds[10].score - 6f64.ln()).abs() < 0.1,
            "{}",
            preds[10].score
        );
        assert!(
            (preds[25].score - 101f64.ln()).abs() < 0.3,
            "{}",
            preds[25].score
        );
        assert!(preds[25].probs[2] > 0.5);
    }
}
