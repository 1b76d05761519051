//! The rules every model must beat.
//! - [`LastWindow`]: the next window is like the last one.
//! - [`MovingAverage`]: the mean of the last few windows, classed by the same thresholds.
//! - [`FrequencyRecency`]: the Go prototype's rule: an exponential moving average of accesses
//!   per day, `>= 100` hot, `>= 10` warm, else cold, and cold once untouched for a day.

use super::{Context, Kind, Prediction, Predictor};

pub struct LastWindow;

impl Predictor for LastWindow {
    fn name(&self) -> &'static str {
        "baseline-last-window"
    }
    fn kind(&self) -> Kind {
        Kind::Baseline
    }
    fn learn(&mut self, _ctx: &Context) {}
    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        let h = ctx.history;
        (0..h.units.len())
            .map(|u| {
                let s = h.series[u][ctx.w];
                Prediction::certain(ctx.thresholds.classify(f64::from(s.ops)), s.log_ops())
            })
            .collect()
    }
}

pub struct MovingAverage {
    pub windows: usize,
}

impl Predictor for MovingAverage {
    fn name(&self) -> &'static str {
        "baseline-moving-average"
    }
    fn kind(&self) -> Kind {
        Kind::Baseline
    }
    fn learn(&mut self, _ctx: &Context) {}
    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        let h = ctx.history;
        let from = (ctx.w + 1).saturating_sub(self.windows);
        (0..h.units.len())
            .map(|u| {
                let mean = (from..=ctx.w)
                    .map(|w| f64::from(h.series[u][w].ops))
                    .sum::<f64>()
                    / (ctx.w + 1 - from) as f64;
                Prediction::certain(ctx.thresholds.classify(mean), mean.ln_1p())
            })
            .collect()
    }
}

pub struct FrequencyRecency {
    ema: Vec<f64>,
}

impl Default for FrequencyRecency {
    fn default() -> Self {
        Self::new()
    }
}

impl FrequencyRecency {
    pub fn new() -> Self {
        Self { ema: Vec::new() }
    }
}

/// The prototype's smoothing of access frequency.
const ALPHA: f64 = 0.3;

impl Predictor for FrequencyRecency {
    fn name(&self) -> &'static str {
        "baseline-frequency-recency"
    }
    fn kind(&self) -> Kind {
        Kind::Baseline
    }
    fn learn(&mut self, ctx: &Context) {
        let h = ctx.history;
        self.ema.resize(h.units.len(), 0.0);
        for (u, e) in self.ema.iter_mut().enumerate() {
            *e = ALPHA * f64::from(h.series[u][ctx.w].ops) + (1.0 - ALPHA) * *e;
        }
    }
    fn predict(&mut self, ctx: &Context) -> Vec<Prediction> {
        let h = ctx.history;
        let per_day = 86_400.0 / h.window_s;
        let day_windows = per_day.ceil().max(1.0) as usize;
        (0..h.units.len())
            .map(|u| {
                let ema = self.ema.get(u).copied().unwrap_or(0.0);
                let daily = ema * per_day;
                let idle_for = (0..=ctx.w)
                    .rev()
                    .take_while(|w| h.series[u][*w].ops == 0)
                    .count();
                let class = if idle_for >= day_windows {
                    super::super::features::Temperature::Cold
                } else if daily >= 100.0 {
                    super::super::features::Temperature::Hot
                } else if daily >= 10.0 {
                    super::super::features::Temperature::Warm
                } else {
                    super::super::features::Temperature::Cold
                };
                Prediction::certain(class, ema.ln_1p())
            })
            .collect()
    }
}
