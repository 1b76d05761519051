//! Units and windows: a volume is cut into fixed extents (the unit whose temperature is
//! predicted and which moves between tiers), and time into fixed windows. [`History`] holds
//! each unit's per-window counters, growing one window at a time, so nothing can look ahead.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::trace::Trace;

/// What one unit saw in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub ops: u32,
    pub bytes: u64,
    pub writes: u32,
    /// Requests that started where the unit's previous request ended.
    pub sequential: u32,
    /// Inter-arrival gaps inside the window: count, sum and sum of squares (seconds).
    pub gaps: u32,
    pub gap_sum: f64,
    pub gap_sq: f64,
}

impl WindowStats {
    pub fn log_ops(&self) -> f64 {
        (f64::from(self.ops)).ln_1p()
    }
}

/// A unit: extent `extent` of volume `volume`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitKey {
    pub volume: u32,
    pub extent: u64,
}

/// A trace cut into windows: for each window, the units it touched with their counters.
#[derive(Clone, Debug)]
pub struct Windowed {
    pub window_s: f64,
    pub extent_bytes: u64,
    pub windows: Vec<Vec<(UnitKey, WindowStats)>>,
}

/// Cuts a trace into windows of `window_s` seconds and units of `extent_bytes`. A request is
/// counted in the extent where it starts.
pub fn cut(trace: &Trace, extent_bytes: u64, window_s: f64) -> Windowed {
    let extent_bytes = extent_bytes.max(1);
    let t0 = trace.accesses.first().map(|a| a.t).unwrap_or(0.0);
    let mut windows: Vec<HashMap<UnitKey, WindowStats>> = Vec::new();
    let mut last: HashMap<UnitKey, (f64, u64)> = HashMap::new();
    for a in &trace.accesses {
        let w = ((a.t - t0) / window_s).floor() as usize;
        while windows.len() <= w {
            windows.push(HashMap::new());
        }
        let key = UnitKey {
            volume: a.volume,
            extent: a.offset / extent_bytes,
        };
        let s = windows[w].entry(key).or_default();
        s.ops += 1;
        s.bytes += u64::from(a.size);
        s.writes += u32::from(a.write);
        if let Some((t, end)) = last.get(&key) {
            if *end == a.offset {
                s.sequential += 1;
            }
            // Gaps count inside a window only, so each window's burstiness is its own.
            if ((t - t0) / window_s).floor() as usize == w {
                let g = a.t - t;
                s.gaps += 1;
                s.gap_sum += g;
                s.gap_sq += g * g;
            }
        }
        last.insert(key, (a.t, a.offset + u64::from(a.size)));
    }
    Windowed {
        window_s,
        extent_bytes,
        windows: windows
            .into_iter()
            .map(|m| {
                let mut v: Vec<_> = m.into_iter().collect();
                v.sort_by_key(|(k, _)| *k);
                v
            })
            .collect(),
    }
}

/// Every unit's counters for the windows seen so far.
#[derive(Clone, Debug)]
pub struct History {
    pub window_s: f64,
    pub units: Vec<UnitKey>,
    index: HashMap<UnitKey, usize>,
    /// `series[u][w]`: unit `u` in window `w` (zero before it was first seen).
    pub series: Vec<Vec<WindowStats>>,
    /// Windows so far.
    pub len: usize,
}

impl History {
    pub fn new(window_s: f64) -> Self {
        Self {
            window_s,
            units: Vec::new(),
            index: HashMap::new(),
            series: Vec::new(),
            len: 0,
        }
    }

    /// Appends the next window (the units it touched; every other unit saw nothing).
    pub fn push(&mut self, touched: &[(UnitKey, WindowStats)]) {
        for s in &mut self.series {
            s.push(WindowStats::default());
        }
        let w = self.len;
        for (key, stats) in touched {
            let u = match self.index.get(key) {
                Some(u) => *u,
                None => {
                    self.units.push(*key);
                    self.series.push(vec![WindowStats::default(); w + 1]);
                    self.index.insert(*key, self.units.len() - 1);
                    self.units.len() - 1
                }
            };
            self.series[u][w] = *stats;
        }
        self.len += 1;
    }

    pub fn unit(&self, key: &UnitKey) -> Option<usize> {
        self.index.get(key).copied()
    }

    /// `log1p(ops)` of unit `u` at window `w`, 0 outside the history.
    pub fn y(&self, u: usize, w: isize) -> f64 {
        if w < 0 {
            return 0.0;
        }
        self.series[u]
            .get(w as usize)
            .map(WindowStats::log_ops)
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Format, parse};

    #[test]
    fn windows_units_sequentiality_and_gaps() {
        let text = "timestamp_s,volume,op,offset,size\n\
                    0,a,R,0,4096\n1,a,W,4096,4096\n3,a,R,0,512\n\
                    10,a,R,1048576,512\n11,b,R,0,512\n";
        let t = parse(text, "t", Format::Csv).expect("trace");
        let w = cut(&t, 1 << 20, 10.0);
        assert_eq!(w.windows.len(), 2);
        let (k, s) = w.windows[0][0];
        assert_eq!(
            k,
            UnitKey {
                volume: 0,
                extent: 0
            }
        );
        assert_eq!((s.ops, s.writes, s.sequential, s.gaps), (3, 1, 1, 2));
        assert!((s.gap_sum - 3.0).abs() < 1e-9 && (s.gap_sq - 5.0).abs() < 1e-9);
        assert_eq!(w.windows[1].len(), 2);
        let mut h = History::new(10.0);
        h.push(&w.windows[0]);
        h.push(&w.windows[1]);
        assert_eq!(h.units.len(), 3);
        assert_eq!(h.series[0][1].ops, 0);
        let b = h
            .unit(&UnitKey {
                volume: 1,
                extent: 0,
            })
            .expect("b");
        assert_eq!(h.series[b][0].ops, 0);
        assert_eq!(h.series[b][1].ops, 1);
        assert!((h.y(0, 0) - 4f64.ln()).abs() < 1e-12);
        assert_eq!(h.y(0, -1), 0.0);
    }
}
