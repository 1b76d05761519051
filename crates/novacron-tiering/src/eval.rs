//! Replaying a trace through every predictor, online: after each window closes, every
//! predictor learns from it and forecasts the next; only then is the next window revealed and
//! scored. Reported per predictor:
//! - balanced accuracy and macro-F1 of the next window's class, over every unit of the trace
//!   (a unit not seen yet is forecast cold by everyone);
//! - a tier simulation: the hot tier holds `hot_share` of the units; after each window the
//!   predictor's top-ranked units (by score) go there, with hysteresis (a unit displaces a hot
//!   one only if its score is higher by `hysteresis`); the hit ratio is the share of the next
//!   window's requests that land on hot units, and every promotion or demotion moves one extent.
//!
//! The oracle knows the next window: the best any ranking could do in that simulation.

use serde::{Deserialize, Serialize};

use crate::features::{Analyzer, Temperature, Thresholds};
use crate::model::baseline::{FrequencyRecency, LastWindow, MovingAverage};
use crate::model::ensemble::Ensemble;
use crate::model::holt_winters::HoltWinters;
use crate::model::markov::Markov;
use crate::model::neural::Neural;
use crate::model::{Kind, Prediction, Predictor, Replay};
use crate::window::Windowed;

#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Requests per minute from which a window is hot.
    pub hot_per_minute: f64,
    /// Share of the units the hot tier holds.
    pub hot_share: f64,
    /// Score margin (in `log1p(requests)`) a unit needs to displace a hot one.
    pub hysteresis: f64,
    /// Windows scored by no one at the start (every predictor starts from nothing).
    pub warmup: usize,
    pub seed: u64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            hot_per_minute: 10.0,
            hot_share: 0.1,
            hysteresis: 0.1,
            warmup: 3,
            seed: 1,
        }
    }
}

/// One predictor's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub name: String,
    pub kind: Kind,
    pub balanced_accuracy: f64,
    pub macro_f1: f64,
    pub hit_ratio: f64,
    pub bytes_moved: u64,
    pub moves: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub windows: usize,
    pub units: usize,
    pub requests: u64,
    pub hot_units: usize,
    pub hot_ops_per_window: f64,
    /// Share of (unit, window) pairs per class, cold, warm, hot.
    pub class_shares: [f64; 3],
    pub results: Vec<EvalResult>,
    /// The ensemble's weights at the end (Holt-Winters, Markov, neural).
    pub ensemble_weights: Vec<f64>,
}

impl EvalReport {
    pub fn get(&self, name: &str) -> Option<&EvalResult> {
        self.results.iter().find(|r| r.name == name)
    }

    /// The best baseline by `key`.
    pub fn best_baseline(&self, key: impl Fn(&EvalResult) -> f64) -> Option<&EvalResult> {
        self.results
            .iter()
            .filter(|r| r.kind == Kind::Baseline)
            .max_by(|a, b| key(a).total_cmp(&key(b)))
    }
}

#[derive(Default, Clone)]
struct Confusion {
    m: [[u64; 3]; 3],
}

impl Confusion {
    fn add(&mut self, actual: Temperature, predicted: Temperature) {
        self.m[actual.index()][predicted.index()] += 1;
    }

    fn balanced_accuracy(&self) -> f64 {
        let recalls: Vec<f64> = (0..3)
            .filter_map(|c| {
                let n: u64 = self.m[c].iter().sum();
                (n > 0).then(|| self.m[c][c] as f64 / n as f64)
            })
            .collect();
        recalls.iter().sum::<f64>() / recalls.len().max(1) as f64
    }

    fn macro_f1(&self) -> f64 {
        let f1s: Vec<f64> = (0..3)
            .filter_map(|c| {
                let actual: u64 = self.m[c].iter().sum();
                let predicted: u64 = (0..3).map(|r| self.m[r][c]).sum();
                if actual + predicted == 0 {
                    return None;
                }
                Some(2.0 * self.m[c][c] as f64 / (actual + predicted) as f64)
            })
            .collect();
        f1s.iter().sum::<f64>() / f1s.len().max(1) as f64
    }
}

/// The simulated hot tier of one predictor.
struct Tier {
    hot: Vec<bool>,
    members: usize,
    capacity: usize,
    moves: u64,
    hits: u64,
    total: u64,
}

impl Tier {
    fn new(capacity: usize) -> Self {
        Self {
            hot: Vec::new(),
            members: 0,
            capacity,
            moves: 0,
            hits: 0,
            total: 0,
        }
    }

    /// Re-plans the hot set from `scores` (one per known unit).
    fn plan(&mut self, scores: &[f64], hysteresis: f64) {
        self.hot.resize(scores.len(), false);
        let mut outside: Vec<usize> = (0..scores.len())
            .filter(|u| !self.hot[*u] && scores[*u] > 0.05)
            .collect();
        outside.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        let mut inside: Vec<usize> = (0..scores.len()).filter(|u| self.hot[*u]).collect();
        inside.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
        let mut weakest = inside.into_iter().peekable();
        for u in outside {
            if self.members < self.capacity {
                self.hot[u] = true;
                self.members += 1;
                self.moves += 1;
                continue;
            }
            match weakest.peek() {
                Some(&w) if scores[u] > scores[w] + hysteresis => {
                    self.hot[w] = false;
                    self.hot[u] = true;
                    self.moves += 2;
                    weakest.next();
                }
                _ => break,
            }
        }
    }
}

/// Replays `trace` through every predictor and the oracle.
pub fn evaluate(trace: &Windowed, settings: &EvalSettings) -> EvalReport {
    let thresholds = Thresholds::per_minute(settings.hot_per_minute, trace.window_s);
    let analyzer = Analyzer::new(trace.window_s);
    let all_units: std::collections::BTreeSet<_> = trace
        .windows
        .iter()
        .flat_map(|w| w.iter().map(|(k, _)| *k))
        .collect();
    let capacity = ((all_units.len() as f64 * settings.hot_share).ceil() as usize).max(1);

    let mut models: Vec<Box<dyn Predictor>> = vec![
        Box::new(HoltWinters::new(analyzer.day)),
        Box::new(Markov::new()),
        Box::new(Neural::new(settings.seed)),
    ];
    let mut baselines: Vec<Box<dyn Predictor>> = vec![
        Box::new(LastWindow),
        Box::new(MovingAverage { windows: 4 }),
        Box::new(FrequencyRecency::new()),
    ];
    let mut ensemble = Ensemble::new(models.len());
    // Rows: models, ensemble, baselines, oracle.
    let names: Vec<(String, Kind)> = models
        .iter()
        .map(|m| (m.name().to_string(), m.kind()))
        .chain(std::iter::once(("ensemble".to_string(), Kind::Model)))
        .chain(baselines.iter().map(|b| (b.name().to_string(), b.kind())))
        .chain(std::iter::once(("oracle".to_string(), Kind::Oracle)))
        .collect();
    let rows = names.len();
    let mut confusion = vec![Confusion::default(); rows];
    let mut tiers: Vec<Tier> = (0..rows).map(|_| Tier::new(capacity)).collect();

    let mut replay = Replay::new(trace.window_s, thresholds, capacity);
    let mut requests = 0u64;
    for w in 0..trace.windows.len() {
        replay.push(&trace.windows[w]);
        requests += trace.windows[w]
            .iter()
            .map(|(_, s)| u64::from(s.ops))
            .sum::<u64>();
        let ctx = replay.context();
        let prior = ctx.prior;
        let h = ctx.history;
        ensemble.learn(&ctx);
        let mut forecasts: Vec<Vec<Prediction>> = Vec::with_capacity(rows);
        let mut member = Vec::new();
        for m in models.iter_mut() {
            m.learn(&ctx);
            member.push(m.predict(&ctx));
        }
        forecasts.extend(member.iter().cloned());
        forecasts.push(ensemble.combine(member));
        for b in baselines.iter_mut() {
            b.learn(&ctx);
            forecasts.push(b.predict(&ctx));
        }
        let Some(next) = trace.windows.get(w + 1) else {
            break;
        };
        // The oracle reads the next window; nobody else does.
        let mut oracle = vec![Prediction::certain(Temperature::Cold, 0.0); h.units.len()];
        let mut unseen_ops = 0u64;
        let mut unseen_classes = Vec::new();
        for (key, s) in next {
            let class = thresholds.classify(f64::from(s.ops));
            match h.unit(key) {
                Some(u) => oracle[u] = Prediction::certain(class, s.log_ops()),
                None => {
                    unseen_ops += u64::from(s.ops);
                    unseen_classes.push(class);
                }
            }
        }
        forecasts.push(oracle);
        if w + 1 < settings.warmup {
            continue;
        }
        // Score the forecasts of window w + 1.
        let mut actual = vec![Temperature::Cold; h.units.len()];
        let mut ops_next = vec![0u32; h.units.len()];
        for (key, s) in next {
            if let Some(u) = h.unit(key) {
                actual[u] = thresholds.classify(f64::from(s.ops));
                ops_next[u] = s.ops;
            }
        }
        let unknown = all_units.len() - h.units.len() - unseen_classes.len();
        for (row, preds) in forecasts.iter().enumerate() {
            let oracle_row = row == rows - 1;
            let ensemble_row = row == models.len();
            for (u, p) in preds.iter().enumerate() {
                let decided = if oracle_row {
                    actual[u]
                } else if ensemble_row {
                    ensemble.decide(p, &prior)
                } else {
                    p.decide(&prior)
                };
                confusion[row].add(actual[u], decided);
            }
            for c in &unseen_classes {
                confusion[row].add(*c, if oracle_row { *c } else { Temperature::Cold });
            }
            for _ in 0..unknown {
                confusion[row].add(Temperature::Cold, Temperature::Cold);
            }
            let scores: Vec<f64> = preds.iter().map(|p| p.score).collect();
            let hysteresis = if oracle_row { 0.0 } else { settings.hysteresis };
            tiers[row].plan(&scores, hysteresis);
            let t = &mut tiers[row];
            for (u, ops) in ops_next.iter().enumerate() {
                t.total += u64::from(*ops);
                if t.hot[u] {
                    t.hits += u64::from(*ops);
                }
            }
            t.total += unseen_ops;
        }
    }
    EvalReport {
        windows: trace.windows.len(),
        units: all_units.len(),
        requests,
        hot_units: capacity,
        hot_ops_per_window: thresholds.hot_ops,
        class_shares: replay.prior(),
        results: names
            .into_iter()
            .enumerate()
            .map(|(row, (name, kind))| EvalResult {
                name,
                kind,
                balanced_accuracy: confusion[row].balanced_accuracy(),
                macro_f1: confusion[row].macro_f1(),
                hit_ratio: tiers[row].hits as f64 / tiers[row].total.max(1) as f64,
                bytes_moved: tiers[row].moves * trace.extent_bytes,
                moves: tiers[row].moves,
            })
            .collect(),
        ensemble_weights: ensemble.weights(),
    }
}

/// The report as a table, with the goals checked (ensemble vs the best baseline on balanced
/// accuracy and hit ratio; ensemble hit ratio within 90% of the oracle's).
pub fn table(report: &EvalReport) -> String {
    let mut out = format!(
        "{} windows, {} units ({} in the hot tier), {} requests; hot from {:.0} requests/window; classes cold/warm/hot {:.1}%/{:.1}%/{:.1}%\n",
        report.windows,
        report.units,
        report.hot_units,
        report.requests,
        report.hot_ops_per_window,
        report.class_shares[0] * 100.0,
        report.class_shares[1] * 100.0,
        report.class_shares[2] * 100.0
    );
    out.push_str(&format!(
        "{:<28} {:<9} {:>9} {:>9} {:>9} {:>12}\n",
        "PREDICTOR", "KIND", "BAL.ACC", "MACRO-F1", "HIT", "MOVED MiB"
    ));
    for r in &report.results {
        out.push_str(&format!(
            "{:<28} {:<9} {:>9.3} {:>9.3} {:>9.3} {:>12}\n",
            r.name,
            match r.kind {
                Kind::Model => "model",
                Kind::Baseline => "baseline",
                Kind::Oracle => "oracle",
            },
            r.balanced_accuracy,
            r.macro_f1,
            r.hit_ratio,
            r.bytes_moved >> 20
        ));
    }
    for line in goals(report) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The goal lines: `met` or `NOT MET` with the numbers.
pub fn goals(report: &EvalReport) -> Vec<String> {
    let (Some(e), Some(o)) = (report.get("ensemble"), report.get("oracle")) else {
        return vec![];
    };
    let mut lines = Vec::new();
    if let Some(b) = report.best_baseline(|r| r.balanced_accuracy) {
        lines.push(format!(
            "goal: ensemble balanced accuracy {:.3} > best baseline {:.3} ({}): {}",
            e.balanced_accuracy,
            b.balanced_accuracy,
            b.name,
            if e.balanced_accuracy > b.balanced_accuracy {
                "met"
            } else {
                "NOT MET"
            }
        ));
    }
    if let Some(b) = report.best_baseline(|r| r.hit_ratio) {
        lines.push(format!(
            "goal: ensemble hit ratio {:.3} > best baseline {:.3} ({}): {}",
            e.hit_ratio,
            b.hit_ratio,
            b.name,
            if e.hit_ratio > b.hit_ratio {
                "met"
            } else {
                "NOT MET"
            }
        ));
    }
    let share = e.hit_ratio / o.hit_ratio.max(1e-9);
    lines.push(format!(
        "goal: ensemble hit ratio {:.1}% of the oracle's {:.3} (>= 90%): {}",
        share * 100.0,
        o.hit_ratio,
        if share >= 0.9 { "met" } else { "NOT MET" }
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{Shape, Synth, generate};
    use crate::window::cut;

    #[test]
    fn on_a_scan_the_ensemble_beats_last_window_and_nobody_beats_the_oracle() {
        let mut s = Synth::new(Shape::Scan, 4);
        s.volumes = 2;
        s.extents = 24;
        s.scale = 0.4;
        let t = generate(&s);
        let report = evaluate(&cut(&t, s.extent_bytes, 60.0), &EvalSettings::default());
        let get = |n: &str| report.get(n).cloned().expect(n);
        let (e, lw, o) = (get("ensemble"), get("baseline-last-window"), get("oracle"));
        assert!(e.hit_ratio > lw.hit_ratio, "{}", table(&report));
        assert!(
            e.balanced_accuracy > lw.balanced_accuracy,
            "{}",
            table(&report)
        );
        assert_eq!(o.balanced_accuracy, 1.0);
        assert!(
            report
                .results
                .iter()
                .all(|r| r.hit_ratio <= o.hit_ratio + 1e-12)
        );
        assert!(table(&report).contains("goal: ensemble hit ratio"));
        // The same input and seed give the same report.
        let again = evaluate(&cut(&t, s.extent_bytes, 60.0), &EvalSettings::default());
        assert_eq!(report, again);
    }

    #[test]
    fn confusion_metrics_match_hand_counts() {
        let mut c = Confusion::default();
        // Cold: 3 right, 1 called warm; warm: 1 right, 1 called hot; hot: 2 right.
        for (a, p) in [
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 1),
            (1, 1),
            (1, 2),
            (2, 2),
            (2, 2),
        ] {
            c.add(Temperature::ALL[a], Temperature::ALL[p]);
        }
        assert!((c.balanced_accuracy() - (0.75 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        // F1: cold 2*3/(4+3), warm 2*1/(2+2), hot 2*2/(2+3).
        let f1 = (6.0 / 7.0 + 0.5 + 0.8) / 3.0;
        assert!((c.macro_f1() - f1).abs() < 1e-12);
    }
}
