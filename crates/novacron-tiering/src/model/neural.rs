//! A small neural network (the analyzer's features → one hidden tanh layer → the expected
//! `log1p(requests)` and three class logits), trained online by backpropagation with Adam:
//! after every window it takes the pairs (features at `w - 1`, what happened at `w`) into a
//! bounded replay buffer and makes one pass over a sample of it. The class head's loss weighs
//! each class by the inverse of how common it is, so rare hot windows are not drowned.
//!
//! Why by hand rather than with `candle`: the whole network is 350 weights; its forward and
//! backward passes are a few loops, and a tensor library would add over a minute to every
//! build for no gain at this size.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{Context, Kind, Prediction, Predictor};
use crate::features::Features;

const IN: usize = Features::INPUTS;
const HIDDEN: usize = 16;
const OUT: usize = 4;
const BUFFER: usize = 6000;
const PER_WINDOW: usize = 2000;
const STEPS_PER_WINDOW: usize = 3000;
const BATCH: usize = 16;
const LEARNING_RATE: f64 = 0.003;
/// Weight of the class head's loss against the regression's.
const CLASS_WEIGHT: f64 = 0.1;

#[derive(Clone, Debug)]
struct Sample {
    x: [f64; IN],
    y: f64,
    class: usize,
}

/// Parameters with their Adam moments.
#[derive(Clone, Debug)]
struct Param {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Param {
    fn new(n: usize, scale: f64, rng: &mut StdRng) -> Self {
        Self {
            w: (0..n)
                .map(|_| {
                    if scale > 0.0 {
                        rng.random_range(-scale..scale)
                    } else {
                        0.0
                    }
                })
                .collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, grad: &[f64], t: i32) {
        let (b1, b2) = (0.9f64, 0.999f64);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (i, g) in grad.iter().enumerate() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            self.w[i] -= LEARNING_RATE * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

pub struct Neural {
    w1: Param,
    b1: Param,
    w2: Param,
    b2: Param,
    t: i32,
    buffer: VecDeque<Sample>,
    rng: StdRng,
}

struct Forward {
    h: [f64; HIDDEN],
    out: [f64; OUT],
}

fn softmax(z: &[f64]) -> [f64; 3] {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e = [(z[0] - m).exp(), (z[1] - m).exp(), (z[2] - m).exp()];
    let s: f64 = e.iter().sum();
    [e[0] / s, e[1] / s, e[2] / s]
}

impl Neural {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let s1 = (1.0 / IN as f64).sqrt();
        let s2 = (1.0 / HIDDEN as f64).sqrt();
        Self {
            w1: Param::new(IN * HIDDEN, s1, &mut rng),
            b1: Param::new(HIDDEN, 0.0, &mut rng),
            w2: Param::new(HIDDEN * OUT, s2, &mut rng),
            b2: Param::new(OUT, 0.0, &mut rng),
            t: 0,
            buffer: VecDeque::new(),
            rng,
        }
    }

    fn forward(&self, x: &[f64; IN]) -> Forward {
        let mut h = [0.0; HIDDEN];
        for (j, hj) in h.iter_mut().enumerate() {
            let row = &self.w1.w[j * IN..(j + 1) * IN];
            let z: f64 = row.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + self.b1.w[j];
            *hj = z.tanh();
        }
        let mut out = [0.0; OUT];
        for (k, ok) in out.iter_mut().enumerate() {
            let row = &self.w2.w[k * HIDDEN..(k + 1) * HIDDEN];
            *ok = row.iter().zip(&h).map(|(a, b)| a * b).sum::<f64>() + self.b2.w[k];
        }
        Forward { h, out }
    }

    /// One Adam step on a batch; returns the batch's mean loss.
    fn train_batch(&mut self, batch: &[Sample], class_weights: &[f64; 3]) -> f64 {
        let mut g1 = vec![0.0; IN * HIDDEN];
        let mut gb1 = vec![0.0; HIDDEN];
        let mut g2 = vec![0.0; HIDDEN * OUT];
        let mut gb2 = vec![0.0; OUT];
        let mut loss = 0.0;
        for s in batch {
            let f = self.forward(&s.x);
            let p = softmax(&f.out[1..]);
            let cw = CLASS_WEIGHT * class_weights[s.class];
            let mut d = [0.0; OUT];
            d[0] = f.out[0] - s.y;
            loss += 0.5 * d[0] * d[0] - cw * p[s.class].max(1e-12).ln();
            for k in 0..3 {
                d[1 + k] = cw * (p[k] - if k == s.class { 1.0 } else { 0.0 });
            }
            for k in 0..OUT {
                gb2[k] += d[k];
                for j in 0..HIDDEN {
                    g2[k * HIDDEN + j] += d[k] * f.h[j];
                }
            }
            for j in 0..HIDDEN {
                let back: f64 = (0..OUT).map(|k| self.w2.w[k * HIDDEN + j] * d[k]).sum();
                let dz = back * (1.0 - f.h[j] * f.h[j]);
                gb1[j] += dz;
                for i in 0..IN {
                    g1[j * IN + i] += dz * s.x[i];
                }
            }
        }
        let n = batch.len() as f64;
        for g in [&mut g1, &mut gb1, &mut g2, &mut gb2] {
            for x in g.iter_mut() {
                *x /= n;
            }
        }
        self.t += 1;
        self.w1.step(&g1, self.t);
        self.b1.step(&gb1, self.t);
        self.w2.step(&g2, self.t);
        self.b2.step(&gb2, self.t);
        loss / n
    }
}

impl Predictor for Neural {
    fn name(&self) -> &'static str {
        "neural"
    }

    fn kind(&self) -> Kind {
        Kind::Model
    }

    fn learn(&mut self, ctx: &Context) {
        let h = ctx.history;
        let mut fresh: Vec<Sample> = ctx
            .previous
            .iter()
            .enumerate()
            .filter_map(|(u, prev)| {
                let prev = prev.as_ref()?;
                let now = h.series[u][ctx.w];
                Some(Sample {
                    x: prev.to_inputs(),
                    y: now.log_ops(),
                    class: ctx.thresholds.classify(f64::from(now.ops)).index(),
                })
            })
            .collect();
        if fresh.is_empty() {
            return;
        }
        fresh.shuffle(&mut self.rng);
        fresh.truncate(PER_WINDOW);
        self.buffer.extend(fresh);
        while self.buffer.len() > BUFFER {
            self.buffer.pop_front();
        }
        let weights = ctx.prior.map(|p| (1.0 / (3.0 * p.max(0.01))).min(10.0));
        let steps = (STEPS_PER_WINDOW / BATCH).max(1);
        for _ in 0..steps {
            let batch: Vec<Sample> = (0..BATCH)
                .map(|_| self.buffer[self.rng.random_range(0..self.buffer.len())].clone())
                .collect();
            self.train_batch(&batch, &weights);
        }
    }

    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        ctx.features
            .iter()
            .map(|f| {
                let out = self.forward(&f.to_inputs()).out;
                Prediction {
                    score: out[0].max(0.0),
                    probs: softmax(&out[1..]),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::run_units;

    #[test]
    fn backpropagation_reduces_the_loss_on_a_fixed_batch() {
        let mut n = Neural::new(1);
        let mut rng = StdRng::seed_from_u64(2);
        let batch: Vec<Sample> = (0..64)
            .map(|i| {
                let mut x = [0.0; IN];
                for v in x.iter_mut() {
                    *v = rng.random_range(-1.0..1.0);
                }
                // A known answer: y = 2 x0 - x1 + 1, class by the sign of x2.
                Sample {
                    y: 2.0 * x[0] - x[1] + 1.0,
                    class: if x[2] > 0.0 { 2 } else { i % 2 },
                    x,
                }
            })
            .collect();
        let w = [1.0; 3];
        let first = n.train_batch(&batch, &w);
        let mut last = first;
        for _ in 0..1500 {
            last = n.train_batch(&batch, &w);
        }
        assert!(last < first * 0.2, "loss {first} → {last}");
    }

    #[test]
    fn it_learns_that_a_scan_moves_to_the_next_extent() {
        // A sequential scan over 30 extents, again and again (a nightly backup): extent e is
        // read in windows e, e + 30, ... Only the neighbour features can tell that the extent
        // after the busy one is next.
        let extents = 30usize;
        let windows = 4 * extents;
        let per_unit: Vec<Vec<u32>> = (0..extents)
            .map(|e| {
                (0..windows)
                    .map(|w| if w % extents == e { 300 } else { 0 })
                    .collect()
            })
            .collect();
        let mut n = Neural::new(3);
        let preds = run_units(&mut n, &per_unit, 60.0);
        let mut right = 0;
        let checked = (2 * extents..windows - 1).filter(|w| (w + 1) % extents != 0);
        let mut total = 0;
        for w in checked {
            total += 1;
            let best = (0..preds[w].len())
                .max_by(|a, b| preds[w][*a].score.total_cmp(&preds[w][*b].score))
                .expect("units");
            right += usize::from(best == (w + 1) % extents);
        }
        assert!(
            right * 10 >= total * 8,
            "picked the next extent {right} times of {total}"
        );
    }
}
