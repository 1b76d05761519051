//! Temperature predictors. Each sees the windows up to now, learns from every window that
//! closes (online: never a look ahead), and predicts every unit's next window: a score
//! (expected `log1p(requests)`, for ranking what goes to the hot tier) and a probability per
//! class.
//!
//! - [`holt_winters::HoltWinters`]: exponential smoothing with damped trend and daily season,
//!   per unit; its smoothing parameters are chosen online among a grid by recent error.
//! - [`markov::Markov`]: a Markov chain over activity levels whose transition matrix is counted
//!   from each unit's observed transitions (blended with the pooled matrix of all units).
//! - [`neural::Neural`]: a small network (one hidden layer) trained by backpropagation on the
//!   analyzer's features.
//! - [`ensemble::Ensemble`]: the three, weighted by their recent accuracy.
//! - [`baseline`]: the rules to beat.

pub mod baseline;
pub mod ensemble;
pub mod holt_winters;
pub mod markov;
pub mod neural;

use serde::{Deserialize, Serialize};

use crate::features::{Analyzer, Features, Temperature, Thresholds};
use crate::window::History;

/// One unit's forecast for the next window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Expected `log1p(requests)`.
    pub score: f64,
    /// Probability of cold, warm, hot.
    pub probs: [f64; 3],
}

impl Prediction {
    /// Certain of one class, with `score` as the expected level.
    pub fn certain(class: Temperature, score: f64) -> Self {
        let mut probs = [0.0; 3];
        probs[class.index()] = 1.0;
        Self { score, probs }
    }

    /// The decision for balanced accuracy: the class most over-represented relative to how
    /// common it is (`p(c) / prior(c)`), which is the Bayes choice when every class counts
    /// the same.
    pub fn decide(&self, prior: &[f64; 3]) -> Temperature {
        let mut best = (Temperature::Cold, f64::NEG_INFINITY);
        for c in Temperature::ALL {
            let v = self.probs[c.index()] / prior[c.index()].max(1e-3);
            if v > best.1 + 1e-12 {
                best = (c, v);
            }
        }
        best.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Model,
    Baseline,
    Oracle,
}

/// What a predictor sees when window `w` has closed.
pub struct Context<'a> {
    pub history: &'a History,
    pub analyzer: &'a Analyzer,
    pub thresholds: Thresholds,
    /// The window that just closed (the last in `history`).
    pub w: usize,
    /// Every unit's features at `w`.
    pub features: &'a [Features],
    /// Every unit's features at `w - 1` (`None` for units first seen at `w`, or at `w = 0`).
    pub previous: &'a [Option<Features>],
    /// How common each class has been so far (over every unit and window).
    pub prior: [f64; 3],
    /// Units the hot tier holds.
    pub hot_capacity: usize,
}

/// Drives predictors through windows: keeps the history, the class frequencies and last
/// window's features, and builds each window's [`Context`].
pub struct Replay {
    pub history: History,
    pub analyzer: Analyzer,
    pub thresholds: Thresholds,
    pub hot_capacity: usize,
    class_counts: [f64; 3],
    previous: Vec<Option<Features>>,
    features: Vec<Features>,
}

impl Replay {
    pub fn new(window_s: f64, thresholds: Thresholds, hot_capacity: usize) -> Self {
        Self {
            history: History::new(window_s),
            analyzer: Analyzer::new(window_s),
            thresholds,
            hot_capacity,
            // Add-one counts, so no class starts at probability zero.
            class_counts: [1.0; 3],
            previous: Vec::new(),
            features: Vec::new(),
        }
    }

    /// Closes the next window (the units it touched); its features and the class
    /// frequencies so far are then in [`Replay::context`].
    pub fn push(&mut self, touched: &[(crate::window::UnitKey, crate::window::WindowStats)]) {
        let old = std::mem::take(&mut self.features);
        self.previous = old.into_iter().map(Some).collect();
        self.history.push(touched);
        let w = self.history.len - 1;
        for s in &self.history.series {
            self.class_counts[self.thresholds.classify(f64::from(s[w].ops)).index()] += 1.0;
        }
        self.features = (0..self.history.units.len())
            .map(|u| self.analyzer.features(&self.history, u, w))
            .collect();
        self.previous.resize(self.history.units.len(), None);
    }

    pub fn prior(&self) -> [f64; 3] {
        let total: f64 = self.class_counts.iter().sum();
        self.class_counts.map(|c| c / total)
    }

    pub fn context(&self) -> Context<'_> {
        Context {
            history: &self.history,
            analyzer: &self.analyzer,
            thresholds: self.thresholds,
            w: self.history.len - 1,
            features: &self.features,
            previous: &self.previous,
            prior: self.prior(),
            hot_capacity: self.hot_capacity,
        }
    }
}

pub trait Predictor {
    fn name(&self) -> &'static str;
    fn kind(&self) -> Kind;
    /// Window `ctx.w` closed: learn from what it was.
    fn learn(&mut self, ctx: &Context);
    /// Every unit's forecast for window `ctx.w + 1`.
    fn predict(&mut self, ctx: &Context) -> Vec<Prediction>;
}

/// Standard normal CDF (Abramowitz and Stegun 7.1.26 through erf; error below 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    let erf = if z >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

/// Class probabilities of a forecast `log1p(ops) ~ N(mean, sd²)`.
pub fn class_probs(mean: f64, sd: f64, t: &Thresholds) -> [f64; 3] {
    let sd = sd.max(0.05);
    let cold = normal_cdf((0.5f64.ln_1p() - mean) / sd);
    let not_hot = normal_cdf(((t.hot_ops - 0.5).ln_1p() - mean) / sd);
    [cold, (not_hot - cold).max(0.0), 1.0 - not_hot]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_cdf_and_class_probabilities_are_sane() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-3);
        let t = Thresholds { hot_ops: 10.0 };
        let p = class_probs(0.0, 0.3, &t);
        assert!(p[0] > 0.9 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let p = class_probs(30f64.ln_1p(), 0.3, &t);
        assert!(p[2] > 0.9);
    }

    #[test]
    fn decisions_weigh_rare_classes_up() {
        let p = Prediction {
            score: 1.0,
            probs: [0.6, 0.3, 0.1],
        };
        assert_eq!(p.decide(&[1.0 / 3.0; 3]), Temperature::Cold);
        // Hot happens 2% of the time: a 10% chance is five times its share.
        assert_eq!(p.decide(&[0.88, 0.10, 0.02]), Temperature::Hot);
    }
}
