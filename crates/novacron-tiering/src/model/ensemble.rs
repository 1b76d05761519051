//! The three models combined, each weighted by its recent accuracy at each of the two jobs:
//! every window, each member's forecasts for that window are scored against what happened —
//! its class probabilities by class-balanced log loss, its scores by the hit ratio its own top
//! ranks would have had in the hot tier — the scores are smoothed over time, and each job's
//! weights are `exp(-ETA * loss)`, normalised (the exponentially weighted average forecaster).
//! A member that has been wrong lately counts less until it is right again.

use super::{Context, Prediction};
use crate::features::Temperature;

const ETA: f64 = 3.0;
/// Hit ratios differ by hundredths: a sharper rate.
const ETA_RANK: f64 = 40.0;
const DECAY: f64 = 0.15;

pub struct Ensemble {
    loss: Vec<f64>,
    /// Smoothed hit ratio of each member's ranking.
    hits: Vec<f64>,
    /// Each member's forecasts for the window about to close, and the combined one.
    last: Option<Vec<Vec<Prediction>>>,
    last_combined: Vec<Prediction>,
    /// Decision calibration: for each candidate pair of class multipliers (warm, hot), the
    /// smoothed confusion counts its decisions would have had.
    calibration: Vec<[[f64; 3]; 3]>,
}

/// Multipliers tried on `p(class) / prior(class)` for warm and hot.
const MULTIPLIERS: [f64; 7] = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];
const CALIBRATION_DECAY: f64 = 0.05;

impl Ensemble {
    pub fn new(members: usize) -> Self {
        Self {
            loss: vec![0.0; members],
            hits: vec![0.0; members],
            last: None,
            last_combined: Vec::new(),
            calibration: vec![[[0.0; 3]; 3]; MULTIPLIERS.len() * MULTIPLIERS.len()],
        }
    }

    fn decide_with(p: &Prediction, prior: &[f64; 3], candidate: usize) -> Temperature {
        let m = [
            1.0,
            MULTIPLIERS[candidate / MULTIPLIERS.len()],
            MULTIPLIERS[candidate % MULTIPLIERS.len()],
        ];
        let mut best = (Temperature::Cold, f64::NEG_INFINITY);
        for c in Temperature::ALL {
            let v = m[c.index()] * p.probs[c.index()] / prior[c.index()].max(1e-3);
            if v > best.1 + 1e-12 {
                best = (c, v);
            }
        }
        best.0
    }

    /// The ensemble's class decision: `p / prior` with the class multipliers that would have
    /// given the best balanced accuracy on the windows so far (learned, never looking ahead).
    pub fn decide(&self, p: &Prediction, prior: &[f64; 3]) -> Temperature {
        let ba = |m: &[[f64; 3]; 3]| {
            let recalls: Vec<f64> = (0..3)
                .filter_map(|c| {
                    let n: f64 = m[c].iter().sum();
                    (n > 1e-9).then(|| m[c][c] / n)
                })
                .collect();
            recalls.iter().sum::<f64>() / recalls.len().max(1) as f64
        };
        // Ties go to the plain rule (both multipliers 1).
        let one = MULTIPLIERS.len() / 2;
        let neutral = one * MULTIPLIERS.len() + one;
        let mut best = (neutral, ba(&self.calibration[neutral]));
        for (i, m) in self.calibration.iter().enumerate() {
            let v = ba(m);
            if v > best.1 + 1e-9 {
                best = (i, v);
            }
        }
        Self::decide_with(p, prior, best.0)
    }

    /// Weights of the members' class probabilities.
    pub fn weights(&self) -> Vec<f64> {
        softmax_weights(&self.loss.iter().map(|l| -ETA * l).collect::<Vec<_>>())
    }

    /// Weights of the members' scores (the ranking for the hot tier).
    pub fn rank_weights(&self) -> Vec<f64> {
        softmax_weights(&self.hits.iter().map(|h| ETA_RANK * h).collect::<Vec<_>>())
    }

    /// Window `ctx.w` closed: score each member's forecasts of it.
    pub fn learn(&mut self, ctx: &Context) {
        let Some(last) = self.last.take() else {
            return;
        };
        let h = ctx.history;
        for m in self.calibration.iter_mut() {
            for row in m.iter_mut() {
                for x in row.iter_mut() {
                    *x *= 1.0 - CALIBRATION_DECAY;
                }
            }
        }
        for (u, p) in self.last_combined.iter().enumerate() {
            let actual = ctx.thresholds.classify(f64::from(h.series[u][ctx.w].ops));
            for (i, m) in self.calibration.iter_mut().enumerate() {
                let d = Self::decide_with(p, &ctx.prior, i);
                m[actual.index()][d.index()] += 1.0;
            }
        }
        for (m, preds) in last.iter().enumerate() {
            let mut sum = 0.0;
            let mut n = 0.0;
            for (u, p) in preds.iter().enumerate() {
                let now = h.series[u][ctx.w];
                let c = ctx.thresholds.classify(f64::from(now.ops)).index();
                let balance = 1.0 / (3.0 * ctx.prior[c].max(0.01));
                sum += balance * -p.probs[c].max(1e-4).ln();
                n += 1.0;
            }
            if n > 0.0 {
                self.loss[m] = (1.0 - DECAY) * self.loss[m] + DECAY * sum / n;
            }
            // The hit ratio of this member's top ranks in the window.
            let mut order: Vec<usize> = (0..preds.len())
                .filter(|u| preds[*u].score > 0.05)
                .collect();
            order.sort_by(|a, b| preds[*b].score.total_cmp(&preds[*a].score));
            order.truncate(ctx.hot_capacity);
            let total: u64 = (0..preds.len())
                .map(|u| u64::from(h.series[u][ctx.w].ops))
                .sum();
            if total > 0 {
                let hit: u64 = order
                    .iter()
                    .map(|u| u64::from(h.series[*u][ctx.w].ops))
                    .sum();
                self.hits[m] = (1.0 - DECAY) * self.hits[m] + DECAY * hit as f64 / total as f64;
            }
        }
    }

    /// The weighted forecast, remembering the members' for scoring them next window.
    pub fn combine(&mut self, members: Vec<Vec<Prediction>>) -> Vec<Prediction> {
        let w = self.weights();
        let r = self.rank_weights();
        let units = members.first().map(Vec::len).unwrap_or(0);
        let out = (0..units)
            .map(|u| {
                let mut p = Prediction {
                    score: 0.0,
                    probs: [0.0; 3],
                };
                for (m, preds) in members.iter().enumerate() {
                    p.score += r[m] * preds[u].score;
                    for c in 0..3 {
                        p.probs[c] += w[m] * preds[u].probs[c];
                    }
                }
                p
            })
            .collect();
        self.last = Some(members);
        self.last_combined.clone_from(&out);
        out
    }
}

fn softmax_weights(logits: &[f64]) -> Vec<f64> {
    let best = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let raw: Vec<f64> = logits.iter().map(|l| (l - best).exp()).collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|r| r / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Analyzer, Features, Thresholds};
    use crate::window::{History, UnitKey, WindowStats};

    #[test]
    fn the_member_that_is_right_gains_weight() {
        let mut h = History::new(60.0);
        let analyzer = Analyzer::new(60.0);
        let mut e = Ensemble::new(2);
        let right = |ops: u32| Prediction {
            score: f64::from(ops).ln_1p(),
            probs: if ops > 0 {
                [0.0, 0.0, 1.0]
            } else {
                [1.0, 0.0, 0.0]
            },
        };
        let wrong = |ops: u32| right(if ops > 0 { 0 } else { 50 });
        for w in 0..20u32 {
            let ops = if w % 3 == 0 { 50 } else { 0 };
            // Forecasts of window w, made before it.
            e.combine(vec![vec![wrong(ops)], vec![right(ops)]]);
            h.push(&[(
                UnitKey {
                    volume: 0,
                    extent: 0,
                },
                WindowStats {
                    ops,
                    ..Default::default()
                },
            )]);
            let features = vec![Features::default()];
            let ctx = Context {
                history: &h,
                analyzer: &analyzer,
                thresholds: Thresholds { hot_ops: 10.0 },
                w: w as usize,
                features: &features,
                previous: &[None],
                prior: [0.6, 0.1, 0.3],
                hot_capacity: 1,
            };
            e.learn(&ctx);
        }
        let w = e.weights();
        assert!(w[1] > 0.99, "{w:?}");
        let r = e.rank_weights();
        assert!(r[1] > 0.99, "{r:?}");
    }
}
