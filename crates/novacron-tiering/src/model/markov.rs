//! A Markov chain over five activity levels (idle, light, warm, hot, very hot), its transition
//! matrix counted from the transitions each unit is seen to make. A unit's own counts are
//! blended with the counts pooled over all units (a Dirichlet prior), so a new unit starts from
//! what units in general do and drifts to its own habits as evidence accumulates. The score is
//! the expected `log1p(requests)` of the next level, each level's mean also learned.

use super::{Context, Kind, Prediction, Predictor};
use crate::features::Thresholds;

const LEVELS: usize = 5;
/// Weight of the pooled matrix in a unit's row, in transitions.
const PRIOR_WEIGHT: f64 = 4.0;

pub struct Markov {
    /// `own[u][from][to]`.
    own: Vec<[[u32; LEVELS]; LEVELS]>,
    pooled: [[f64; LEVELS]; LEVELS],
    /// Running sum and count of `log1p(requests)` per level.
    level_sum: [f64; LEVELS],
    level_n: [f64; LEVELS],
}

impl Default for Markov {
    fn default() -> Self {
        Self::new()
    }
}

/// The level of a window with `ops` requests.
fn level(ops: u32, t: &Thresholds) -> usize {
    let ops = f64::from(ops);
    if ops < 0.5 {
        0
    } else if ops < (t.hot_ops / 3.0).max(1.5) {
        1
    } else if ops < t.hot_ops - 1e-9 {
        2
    } else if ops < 4.0 * t.hot_ops {
        3
    } else {
        4
    }
}

impl Markov {
    pub fn new() -> Self {
        Self {
            own: Vec::new(),
            pooled: [[0.0; LEVELS]; LEVELS],
            level_sum: [0.0; LEVELS],
            level_n: [0.0; LEVELS],
        }
    }

    /// `P(next level | unit u now at level from)`.
    fn row(&self, u: usize, from: usize) -> [f64; LEVELS] {
        let pooled_total: f64 = self.pooled[from].iter().sum();
        let own = self.own.get(u).map(|m| m[from]).unwrap_or([0; LEVELS]);
        let own_total: f64 = own.iter().map(|c| f64::from(*c)).sum();
        let mut row = [0.0; LEVELS];
        for (to, r) in row.iter_mut().enumerate() {
            // Add-one smoothing of the pooled row.
            let g = (self.pooled[from][to] + 1.0) / (pooled_total + LEVELS as f64);
            *r = (f64::from(own[to]) + PRIOR_WEIGHT * g) / (own_total + PRIOR_WEIGHT);
        }
        row
    }

    fn level_mean(&self, l: usize, t: &Thresholds) -> f64 {
        if self.level_n[l] > 0.0 {
            self.level_sum[l] / self.level_n[l]
        } else {
            // Before any evidence: the middle of the level's range.
            [
                0.0,
                1.0,
                (t.hot_ops / 2.0).ln_1p(),
                (2.0 * t.hot_ops).ln_1p(),
                (6.0 * t.hot_ops).ln_1p(),
            ][l]
        }
    }
}

impl Predictor for Markov {
    fn name(&self) -> &'static str {
        "markov"
    }

    fn kind(&self) -> Kind {
        Kind::Model
    }

    fn learn(&mut self, ctx: &Context) {
        let h = ctx.history;
        let w = ctx.w;
        self.own.resize(h.units.len(), [[0; LEVELS]; LEVELS]);
        for u in 0..h.units.len() {
            let now = h.series[u][w];
            let to = level(now.ops, &ctx.thresholds);
            self.level_sum[to] += now.log_ops();
            self.level_n[to] += 1.0;
            // A transition needs the window before, and the unit must have existed then.
            if w == 0 || ctx.previous[u].is_none() {
                continue;
            }
            let from = level(h.series[u][w - 1].ops, &ctx.thresholds);
            self.own[u][from][to] += 1;
            self.pooled[from][to] += 1.0;
        }
    }

    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        let h = ctx.history;
        (0..h.units.len())
            .map(|u| {
                let from = level(h.series[u][ctx.w].ops, &ctx.thresholds);
                let row = self.row(u, from);
                let score = (0..LEVELS)
                    .map(|l| row[l] * self.level_mean(l, &ctx.thresholds))
                    .sum();
                Prediction {
                    score,
                    probs: [row[0], row[1] + row[2], row[3] + row[4]],
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
    fn it_learns_the_transition_matrix() {
        // Strict alternation hot, idle, hot, idle: after enough of it, hot follows idle and
        // idle follows hot, against the pooled prior that starts uniform.
        let ops: Vec<u32> = (0..60).map(|w| if w % 2 == 0 { 100 } else { 0 }).collect();
        let mut m = Markov::new();
        let preds = run_series(&mut m, &ops, 60.0);
        for w in 40..59 {
            let p = preds[w];
            if ops[w] > 0 {
                assert!(p.probs[0] > 0.9, "after hot comes idle: {p:?}");
            } else {
                assert!(p.probs[2] > 0.9, "after idle comes hot: {p:?}");
                assert!(p.score > 4.0, "{p:?}");
            }
        }
    }

    #[test]
    fn levels_follow_the_thresholds() {
        let t = Thresholds { hot_ops: 12.0 };
        assert_eq!(
            [0, 1, 3, 4, 11, 12, 47, 48].map(|o| level(o, &t)),
            [0, 1, 1, 2, 2, 3, 3, 4]
        );
    }
}
