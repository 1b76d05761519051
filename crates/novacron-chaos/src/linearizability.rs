//! A linearizability checker for key-value histories.
//!
//! Each operation has an invocation time and, if the client got an answer, a completion time.
//! A history is linearizable when every completed operation (and any subset of the uncompleted
//! writes, which may or may not have taken effect) can be ordered so that the order respects
//! real time (an operation that completed before another was invoked comes first) and every read
//! returns the latest write of its key (or nothing, before the first write).
//!
//! Keys are independent, so each key's sub-history is checked alone (P-compositionality). Per key
//! the search is Wing & Gong's: repeatedly pick an operation that may go next (invoked before every
//! pending completed operation finished), apply it to the register, and backtrack on a
//! contradiction; (linearized set, register value) pairs already explored are memoized (Lowe).

use std::collections::{BTreeMap, HashSet};

/// What an operation did, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wrote `value`. Values should be unique per key so reads identify their write.
    Write { value: u64 },
    /// Read and got `value` (`None`: the key had no value).
    Read { value: Option<u64> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub key: String,
    pub action: Action,
    /// When the client sent it (any monotonic clock, the same for every client).
    pub invoked: u64,
    /// When the client got the answer; `None` if it never did (timeout, crash): a write may then
    /// have happened or not, and a read constrains nothing.
    pub completed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The first key whose history cannot be linearized, with its operations.
    NotLinearizable {
        key: String,
        operations: Vec<Operation>,
    },
    /// The search for this key exceeded the step budget without deciding.
    Unknown {
        key: String,
    },
}

/// Checks a history. `max_steps` bounds the search per key (a few million is plenty for
/// histories with up to a dozen concurrent clients).
pub fn check(history: &[Operation], max_steps: u64) -> Verdict {
    // Values some read returned, per key.
    let mut observed: HashSet<(&str, u64)> = HashSet::new();
    for op in history {
        if let (Action::Read { value: Some(v) }, Some(_)) = (&op.action, op.completed) {
            observed.insert((op.key.as_str(), *v));
        }
    }
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        match (&op.action, op.completed) {
            // A read without an answer says nothing.
            (Action::Read { .. }, None) => continue,
            // An unanswered write nobody read may as well not have happened: if it took effect,
            // no read fell between it and the next write, so dropping it keeps every read
            // valid (and the converse holds trivially). This keeps the search small when many
            // writes time out during faults.
            (Action::Write { value }, None) if !observed.contains(&(op.key.as_str(), *value)) => {
                continue;
            }
            _ => {}
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        match check_key(&ops, max_steps) {
            Some(true) => {}
            Some(false) => {
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    operations: ops.into_iter().cloned().collect(),
                };
            }
            None => {
                return Verdict::Unknown {
                    key: key.to_string(),
                };
            }
        }
    }
    Verdict::Linearizable
}

/// splitmix64: well-spread 64-bit values from a counter (for Zobrist hashing).
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix128(x: u64) -> u128 {
    (u128::from(mix64(x)) << 64) | u128::from(mix64(x ^ 0xd1b5_4a32_d192_ed03))
}

/// One level of the search: the register's value there, the next operation to try, and the
/// operation currently tried (linearized) below it.
struct Frame {
    value: Option<u64>,
    cursor: usize,
    chosen: Option<usize>,
}

/// The search for one key: Wing & Gong's, with an explicit stack (histories of a five-minute
/// run hold thousands of operations per key: far too deep for recursion), the real-time horizon
/// kept incrementally, and explored states remembered by a 128-bit Zobrist hash (kept up to
/// date in O(1) per step).
struct Search<'a> {
    ops: Vec<&'a Operation>,
    /// Which operations are linearized so far.
    done: Vec<u64>,
    /// XOR of the Zobrist keys of the linearized operations.
    signature: u128,
    /// The first operation not linearized yet (where a level starts looking).
    low: usize,
    /// Completion times of the completed operations not linearized yet (time → how many).
    pending: BTreeMap<u64, u32>,
    /// States (linearized set, register value) already explored and found to lead nowhere.
    seen: HashSet<u128>,
    steps: u64,
    max_steps: u64,
}

fn check_key(ops: &[&Operation], max_steps: u64) -> Option<bool> {
    let mut ops = ops.to_vec();
    ops.sort_by_key(|o| o.invoked);
    let mut pending: BTreeMap<u64, u32> = BTreeMap::new();
    for c in ops.iter().filter_map(|o| o.completed) {
        *pending.entry(c).or_default() += 1;
    }
    let words = ops.len().div_ceil(64);
    let mut s = Search {
        ops,
        done: vec![0u64; words],
        signature: 0,
        low: 0,
        pending,
        seen: HashSet::new(),
        steps: 0,
        max_steps,
    };
    s.run()
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

impl Search<'_> {
    /// Nothing may be linearized after an operation that completed before it was invoked: the
    /// earliest completion among the operations not linearized yet.
    fn horizon(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(u64::MAX)
    }

    fn mark(&mut self, i: usize, on: bool) {
        self.signature ^= mix128(i as u64);
        if on {
            self.done[i / 64] |= 1 << (i % 64);
            while self.low < self.ops.len() && is_set(&self.done, self.low) {
                self.low += 1;
            }
        } else {
            self.done[i / 64] &= !(1 << (i % 64));
            self.low = self.low.min(i);
        }
        if let Some(c) = self.ops[i].completed {
            if on {
                if let Some(n) = self.pending.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        self.pending.remove(&c);
                    }
                }
            } else {
                *self.pending.entry(c).or_default() += 1;
            }
        }
    }

    fn state_hash(&self, value: Option<u64>) -> u128 {
        // The value's key is taken from a range no operation index reaches.
        let v = match value {
            None => mix128(u64::MAX),
            Some(x) => mix128(mix64(x) | (1 << 63)),
        };
        self.signature ^ v.rotate_left(17)
    }

    /// The register's next value if operation `i` goes next from `value`; `None` if it cannot
    /// (a read of another value).
    fn apply(&self, i: usize, value: Option<u64>) -> Option<Option<u64>> {
        match self.ops[i].action {
            Action::Write { value: v } => Some(Some(v)),
            Action::Read { value: seen } => (seen == value).then_some(value),
        }
    }

    /// `Some(true)`: linearizable; `Some(false)`: not; `None`: out of budget.
    fn run(&mut self) -> Option<bool> {
        // Every operation that completed must be linearized; unanswered writes are optional.
        if self.pending.is_empty() {
            return Some(true);
        }
        let mut stack = vec![Frame {
            value: None,
            cursor: 0,
            chosen: None,
        }];
        self.seen.insert(self.state_hash(None));
        while let Some(top) = stack.last_mut() {
            // Undo the operation tried below this level before trying the next one.
            if let Some(c) = top.chosen.take() {
                self.mark(c, false);
            }
            let top = stack.last_mut().expect("a frame");
            let (value, mut cursor) = (top.value, top.cursor);
            let horizon = self.horizon();
            let mut found = None;
            while cursor < self.ops.len() {
                let i = cursor;
                cursor += 1;
                if is_set(&self.done, i) {
                    continue;
                }
                if self.ops[i].invoked > horizon {
                    cursor = self.ops.len(); // sorted by invocation: the rest are later still
                    break;
                }
                if let Some(next) = self.apply(i, value) {
                    found = Some((i, next));
                    break;
                }
            }
            let top = stack.last_mut().expect("a frame");
            top.cursor = cursor;
            let Some((i, next)) = found else {
                // Nothing can go next from here: back up one level.
                stack.pop();
                continue;
            };
            top.chosen = Some(i);
            self.mark(i, true);
            self.steps += 1;
            if self.steps > self.max_steps {
                return None;
            }
            if self.pending.is_empty() {
                return Some(true);
            }
            if !self.seen.insert(self.state_hash(next)) {
                continue; // explored before, to no end: try the next candidate here
            }
            stack.push(Frame {
                value: next,
                cursor: self.low,
                chosen: None,
            });
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: &str, value: u64, invoked: u64, completed: Option<u64>) -> Operation {
        Operation {
            key: key.into(),
            action: Action::Write { value },
            invoked,
            completed,
        }
    }

    fn r(key: &str, value: Option<u64>, invoked: u64, completed: u64) -> Operation {
        Operation {
            key: key.into(),
            action: Action::Read { value },
            invoked,
            completed: Some(completed),
        }
    }

    const BUDGET: u64 = 1_000_000;

    #[test]
    fn histories_of_tens_of_thousands_of_operations_need_no_deep_stack() {
        // One key, 25,000 writes each followed by a read of it: a linear history 50,000 deep.
        let mut h = Vec::new();
        let mut t = 0;
        for v in 1..=25_000u64 {
            h.push(w("k", v, t, Some(t + 1)));
            h.push(r("k", Some(v), t + 2, t + 3));
            t += 4;
        }
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // The last read sees an older value: caught at the end of the long chain.
        let last = h.len() - 1;
        h[last] = r("k", Some(24_998), t - 2, t - 1);
        assert!(matches!(check(&h, BUDGET), Verdict::NotLinearizable { .. }));
    }

    fn ok(h: &[Operation]) -> bool {
        match check(h, BUDGET) {
            Verdict::Linearizable => true,
            Verdict::NotLinearizable { .. } => false,
            Verdict::Unknown { key } => panic!("undecided on {key}"),
        }
    }

    #[test]
    fn known_good_histories_pass() {
        // Sequential.
        assert!(ok(&[
            r("k", None, 0, 1),
            w("k", 1, 2, Some(3)),
            r("k", Some(1), 4, 5)
        ]));
        // A read concurrent with a write may see either value.
        assert!(ok(&[
            w("k", 1, 0, Some(10)),
            r("k", None, 1, 2),
            r("k", Some(1), 3, 4)
        ]));
        // Concurrent writes: reads fix an order, and a later read agrees with it.
        assert!(ok(&[
            w("k", 1, 0, Some(10)),
            w("k", 2, 0, Some(10)),
            r("k", Some(1), 11, 12),
            r("k", Some(1), 13, 14),
        ]));
        // A write that never got an answer may have happened...
        assert!(ok(&[w("k", 1, 0, None), r("k", Some(1), 5, 6)]));
        // ...or not.
        assert!(ok(&[w("k", 1, 0, None), r("k", None, 5, 6)]));
        // Keys are independent.
        assert!(ok(&[
            w("a", 1, 0, Some(1)),
            w("b", 2, 0, Some(1)),
            r("a", Some(1), 2, 3),
            r("b", Some(2), 2, 3)
        ]));
    }

    #[test]
    fn many_unanswered_writes_nobody_read_do_not_blow_up_the_search() {
        // 400 timed-out writes interleaved with answered ones: without dropping the unobserved
        // ones, every subset of them would be a candidate.
        let mut h = Vec::new();
        for i in 0..400u64 {
            h.push(w("k", 10_000 + i, i * 10, None));
            h.push(w("k", i + 1, i * 10 + 1, Some(i * 10 + 2)));
            h.push(r("k", Some(i + 1), i * 10 + 3, i * 10 + 4));
        }
        // One unanswered write that was read must still be placed correctly.
        h.push(w("k", 99_999, 5000, None));
        h.push(r("k", Some(99_999), 5001, 5002));
        assert!(ok(&h));
        // ...and a stale read after it is still caught.
        h.push(r("k", Some(400), 5003, 5004));
        assert!(!ok(&h));
    }

    #[test]
    fn known_bad_histories_fail() {
        // A stale read after the write completed.
        assert!(!ok(&[w("k", 1, 0, Some(1)), r("k", None, 2, 3)]));
        // A value nobody wrote.
        assert!(!ok(&[w("k", 1, 0, Some(1)), r("k", Some(7), 2, 3)]));
        // New then old, in real-time order (the classic non-linearizable pair of reads).
        assert!(!ok(&[
            w("k", 1, 0, Some(1)),
            w("k", 2, 2, Some(20)),
            r("k", Some(2), 3, 4),
            r("k", Some(1), 5, 6),
        ]));
        // Two concurrent writes, then reads that disagree about which came last.
        assert!(!ok(&[
            w("k", 1, 0, Some(10)),
            w("k", 2, 0, Some(10)),
            r("k", Some(1), 11, 12),
            r("k", Some(2), 13, 14),
            r("k", Some(1), 15, 16),
        ]));
        // A lost acknowledged write: it completed, a later read sees the value before it.
        assert!(!ok(&[
            w("k", 1, 0, Some(1)),
            w("k", 2, 2, Some(3)),
            r("k", Some(1), 4, 5)
        ]));
        // The failure names the key.
        let v = check(
            &[
                w("a", 1, 0, Some(1)),
                w("b", 1, 0, Some(1)),
                r("b", None, 2, 3),
            ],
            BUDGET,
        );
        assert!(
            matches!(v, Verdict::NotLinearizable { ref key, .. } if key == "b"),
            "{v:?}"
        );
    }

    /// Histories produced by a real register (each operation takes effect at a point inside its
    /// interval) always pass; the same histories with one read corrupted to a value nobody wrote
    /// always fail.
    #[test]
    fn random_register_histories_pass_and_corrupted_ones_fail() {
        for seed in 0..200 {
            let mut g = crate::seeded::Seeded::new(seed);
            let mut register: BTreeMap<String, u64> = BTreeMap::new();
            let mut history = Vec::new();
            let mut next_value = 1;
            // Linearization points at 100, 110, 120, ...; intervals stretch around them, so
            // operations overlap in time.
            for step in 0..40u64 {
                let point = 100 + 10 * step;
                let key = format!("k{}", g.next_u64() % 3);
                let invoked = point - g.next_u64() % 25;
                let completed = point + g.next_u64() % 25;
                let vanished = g.next_u64().is_multiple_of(10);
                if g.next_u64().is_multiple_of(2) {
                    register.insert(key.clone(), next_value);
                    history.push(w(
                        &key,
                        next_value,
                        invoked,
                        (!vanished).then_some(completed),
                    ));
                    next_value += 1;
                } else {
                    history.push(r(&key, register.get(&key).copied(), invoked, completed));
                }
            }
            assert!(
                ok(&history),
                "seed {seed}: a real register's history was rejected"
            );
            if let Some(i) = history
                .iter()
                .position(|o| matches!(o.action, Action::Read { .. }))
            {
                history[i].action = Action::Read {
                    value: Some(999_999),
                };
                assert!(!ok(&history), "seed {seed}: a corrupted read was accepted");
            }
        }
    }
}
