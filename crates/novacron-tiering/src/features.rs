//! The analyzer: what each unit's history says, per window, as numbers a model can use.
//! Every feature of window `w` uses windows `..= w` only.

use serde::{Deserialize, Serialize};

use crate::window::{History, UnitKey};

/// Temperature classes, coldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Temperature {
    Cold,
    Warm,
    Hot,
}

impl Temperature {
    pub const ALL: [Temperature; 3] = [Temperature::Cold, Temperature::Warm, Temperature::Hot];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Temperature::Cold => "cold",
            Temperature::Warm => "warm",
            Temperature::Hot => "hot",
        }
    }
}

/// Where the classes split: a window with no access is cold, one with at least `hot_ops`
/// requests hot, anything between warm.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub hot_ops: f64,
}

impl Thresholds {
    /// `hot_per_minute` requests per minute, scaled to the window.
    pub fn per_minute(hot_per_minute: f64, window_s: f64) -> Self {
        Self {
            hot_ops: (hot_per_minute * window_s / 60.0).max(2.0),
        }
    }

    pub fn classify(&self, ops: f64) -> Temperature {
        if ops < 0.5 {
            Temperature::Cold
        } else if ops >= self.hot_ops - 1e-9 {
            Temperature::Hot
        } else {
            Temperature::Warm
        }
    }

    /// The class of a predicted `log1p(ops)`.
    pub fn classify_log(&self, y: f64) -> Temperature {
        self.classify(y.exp_m1())
    }
}

/// Per-unit features at one window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// Requests per second in the window.
    pub rate: f64,
    /// `log1p(ops)` now and in the three windows before.
    pub recent: [f64; 4],
    /// Exponential moving averages of `log1p(ops)` (fast: 0.5, slow: 0.1).
    pub ema_fast: f64,
    pub ema_slow: f64,
    /// Share of writes among the requests of the last active window (0.5 when none).
    pub write_share: f64,
    /// Share of sequential requests in the last active window.
    pub sequential_share: f64,
    /// Coefficient of variation of inter-arrival gaps in the last active window (0 with fewer
    /// than two gaps): 1 for Poisson arrivals, higher for bursts.
    pub burstiness: f64,
    /// Least-squares slope of `log1p(ops)` over the last 6 windows.
    pub trend: f64,
    /// `log1p` of windows since the last access (`log1p(len)` if never).
    pub since_last: f64,
    /// `log1p(ops)` one day and one week before the window being predicted (0 if unknown),
    /// and whether that history exists.
    pub day_ago: f64,
    pub week_ago: f64,
    pub has_day: bool,
    pub has_week: bool,
    /// Autocorrelation of `log1p(ops)` at a lag of one day, over the history (0 if shorter
    /// than two days).
    pub daily_autocorrelation: f64,
    /// The neighbouring extents in the same volume (one lower, one higher): `log1p(ops)` now,
    /// and its change since the window before (a scan or a sliding hot spot shows here first).
    pub lower: f64,
    pub lower_change: f64,
    pub higher: f64,
    pub higher_change: f64,
}

impl Features {
    /// Number of inputs [`Features::to_inputs`] gives.
    pub const INPUTS: usize = 20;

    /// The features as a model's input vector (roughly unit scale).
    pub fn to_inputs(&self) -> [f64; Self::INPUTS] {
        [
            (self.rate + 1e-3).ln() / 5.0,
            self.recent[0] / 5.0,
            self.recent[1] / 5.0,
            self.recent[2] / 5.0,
            self.recent[3] / 5.0,
            self.ema_fast / 5.0,
            self.ema_slow / 5.0,
            self.write_share,
            self.sequential_share,
            self.burstiness.min(5.0) / 5.0,
            self.trend,
            self.since_last / 3.0,
            self.day_ago / 5.0,
            self.week_ago / 5.0,
            f64::from(u8::from(self.has_day)),
            self.daily_autocorrelation,
            self.lower / 5.0,
            self.lower_change / 5.0,
            self.higher / 5.0,
            self.higher_change / 5.0,
        ]
    }
}

/// The analyzer's settings.
#[derive(Clone, Copy, Debug)]
pub struct Analyzer {
    /// Windows per day (`None` when the window does not divide a day).
    pub day: Option<usize>,
}

impl Analyzer {
    pub fn new(window_s: f64) -> Self {
        let per_day = 86_400.0 / window_s;
        let day = (per_day >= 2.0 && (per_day - per_day.round()).abs() < 1e-6)
            .then_some(per_day.round() as usize);
        Self { day }
    }

    /// Features of unit `u` at window `w` (the last one in `h`, or earlier).
    pub fn features(&self, h: &History, u: usize, w: usize) -> Features {
        let wi = w as isize;
        let series = &h.series[u];
        let mut f = Features {
            rate: f64::from(series[w].ops) / h.window_s,
            recent: [h.y(u, wi), h.y(u, wi - 1), h.y(u, wi - 2), h.y(u, wi - 3)],
            write_share: 0.5,
            ..Default::default()
        };
        // EMAs over the last 32 windows (older ones weigh under 0.1^... and are dropped).
        let from = w.saturating_sub(31);
        for s in &series[from..=w] {
            let y = s.log_ops();
            f.ema_fast = 0.5 * y + 0.5 * f.ema_fast;
            f.ema_slow = 0.1 * y + 0.9 * f.ema_slow;
        }
        if let Some(last) = (0..=w).rev().find(|x| series[*x].ops > 0) {
            let s = &series[last];
            f.since_last = ((w - last) as f64).ln_1p();
            f.write_share = f64::from(s.writes) / f64::from(s.ops);
            f.sequential_share = f64::from(s.sequential) / f64::from(s.ops);
            if s.gaps >= 2 {
                let n = f64::from(s.gaps);
                let mean = s.gap_sum / n;
                let var = (s.gap_sq / n - mean * mean).max(0.0);
                f.burstiness = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
            }
        } else {
            f.since_last = ((w + 1) as f64).ln_1p();
        }
        f.trend = slope(
            &(w.saturating_sub(5)..=w)
                .map(|x| series[x].log_ops())
                .collect::<Vec<_>>(),
        );
        if let Some(day) = self.day {
            let target = wi + 1;
            if target - day as isize >= 0 {
                f.has_day = true;
                f.day_ago = h.y(u, target - day as isize);
            }
            if target - 7 * day as isize >= 0 {
                f.has_week = true;
                f.week_ago = h.y(u, target - 7 * day as isize);
            }
            if w + 1 >= 2 * day {
                f.daily_autocorrelation = autocorrelation(h, u, w, day);
            }
        }
        let key = h.units[u];
        let neighbour = |d: i64| {
            let extent = key.extent.checked_add_signed(d)?;
            let n = h.unit(&UnitKey {
                volume: key.volume,
                extent,
            })?;
            Some((h.y(n, wi), h.y(n, wi) - h.y(n, wi - 1)))
        };
        if let Some((now, change)) = neighbour(-1) {
            f.lower = now;
            f.lower_change = change;
        }
        if let Some((now, change)) = neighbour(1) {
            f.higher = now;
            f.higher_change = change;
        }
        f
    }
}

/// Least-squares slope of equally spaced points.
pub fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        num += dx * (y - my);
        den += dx * dx;
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// Sample autocorrelation of `log1p(ops)` of unit `u` over windows `..= w` at `lag`.
fn autocorrelation(h: &History, u: usize, w: usize, lag: usize) -> f64 {
    let ys: Vec<f64> = (0..=w).map(|x| h.series[u][x].log_ops()).collect();
    let n = ys.len();
    if n <= lag + 1 {
        return 0.0;
    }
    let mean = ys.iter().sum::<f64>() / n as f64;
    let var: f64 = ys.iter().map(|y| (y - mean).powi(2)).sum();
    if var == 0.0 {
        return 0.0;
    }
    let cov: f64 = (lag..n)
        .map(|i| (ys[i] - mean) * (ys[i - lag] - mean))
        .sum();
    cov / var
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowStats;

    fn history(unit_ops: &[&[u32]], window_s: f64) -> History {
        let units: Vec<Vec<u32>> = unit_ops.iter().map(|u| u.to_vec()).collect();
        crate::testutil::history(&units, window_s)
    }

    #[test]
    fn rate_mix_trend_recency_and_neighbours() {
        let h = history(&[&[1, 3, 7, 15, 31, 63], &[8, 8, 0, 0, 0, 0]], 60.0);
        let a = Analyzer::new(60.0);
        let f = a.features(&h, 0, 5);
        assert!((f.rate - 63.0 / 60.0).abs() < 1e-12);
        assert!((f.recent[0] - 64f64.ln()).abs() < 1e-12);
        // log1p(2^k - 1) = k ln 2: a straight line with slope ln 2.
        assert!((f.trend - 2f64.ln()).abs() < 1e-9, "{}", f.trend);
        assert!((f.write_share - 15.0 / 63.0).abs() < 1e-12);
        assert!((f.sequential_share - 31.0 / 63.0).abs() < 1e-12);
        assert!(f.ema_fast > f.ema_slow);
        let g = a.features(&h, 1, 5);
        assert!(
            (g.since_last - 4f64.ln_1p()).abs() < 1e-12,
            "4 windows since the last access: {}",
            g.since_last
        );
        assert!((g.lower - 64f64.ln()).abs() < 1e-12);
        assert!((g.lower_change - (64f64.ln() - 32f64.ln())).abs() < 1e-12);
        assert_eq!((f.lower, g.higher), (0.0, 0.0));
        assert!((f.higher - 0.0).abs() < 1e-12);
    }

    #[test]
    fn burstiness_is_the_cv_of_gaps() {
        let mut h = History::new(60.0);
        let key = UnitKey {
            volume: 0,
            extent: 0,
        };
        // Gaps 1, 1, 1, 9: mean 3, standard deviation sqrt(12).
        h.push(&[(
            key,
            WindowStats {
                ops: 5,
                gaps: 4,
                gap_sum: 12.0,
                gap_sq: 84.0,
                ..Default::default()
            },
        )]);
        let f = Analyzer::new(60.0).features(&h, 0, 0);
        assert!(
            (f.burstiness - 12f64.sqrt() / 3.0).abs() < 1e-12,
            "{}",
            f.burstiness
        );
    }

    #[test]
    fn daily_periodicity_is_seen() {
        // 4 windows a day (6 h windows), busy every first window of the day, for 3 days.
        let ops: Vec<u32> = (0..12).map(|w| if w % 4 == 0 { 50 } else { 0 }).collect();
        let h = history(&[&ops], 21_600.0);
        let a = Analyzer::new(21_600.0);
        assert_eq!(a.day, Some(4));
        let f = a.features(&h, 0, 11);
        assert!(f.has_day && !f.has_week);
        assert!(
            (f.day_ago - 51f64.ln()).abs() < 1e-12,
            "the next window was busy a day ago"
        );
        assert!(f.daily_autocorrelation > 0.6, "{}", f.daily_autocorrelation);
    }

    #[test]
    fn classes_split_at_the_thresholds() {
        let t = Thresholds::per_minute(10.0, 60.0);
        assert_eq!(t.classify(0.0), Temperature::Cold);
        assert_eq!(t.classify(9.0), Temperature::Warm);
        assert_eq!(t.classify(10.0), Temperature::Hot);
        assert_eq!(t.classify_log(10f64.ln_1p()), Temperature::Hot);
        assert_eq!(Thresholds::per_minute(10.0, 1.0).hot_ops, 2.0);
    }
}
