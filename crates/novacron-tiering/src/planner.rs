//! The tier planner: predictions and policies in, a move plan out, each move with the policy
//! that asked for it and why. Pure (no clock: "now" is a window number).
//!
//! Policies by priority (a volume moves at most once per plan, for the first policy that
//! wants it):
//! 1. **maintenance**: every volume of a draining pool leaves it (dwell time does not apply);
//! 2. **capacity**: a pool above its high-water mark sheds its coldest volumes to a colder
//!    tier until it is below;
//! 3. **performance**: volumes predicted hot move to the hot tier, hottest first; when the hot
//!    tier is full, a predicted-hot volume displaces the coldest hot one only if its score is
//!    higher by the hysteresis margin;
//! 4. **time**: volumes idle for `demote_after_idle` windows go one tier colder;
//! 5. **cost**: a volume predicted cold on a warmer tier goes to the cold tier, and every move
//!    picks the cheapest pool of its target tier that has room.
//!
//! Hysteresis: a volume moved less than `min_dwell` windows ago stays (except for maintenance),
//! and displacing needs the score margin, so a volume does not bounce between tiers.

use serde::{Deserialize, Serialize};

use crate::features::Temperature;

/// Storage tiers, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Hot,
    Warm,
    Cold,
}

impl Tier {
    fn colder(self) -> Option<Tier> {
        match self {
            Tier::Hot => Some(Tier::Warm),
            Tier::Warm => Some(Tier::Cold),
            Tier::Cold => None,
        }
    }

    /// Every colder tier, nearest first (a cluster may have no warm pool).
    fn colder_all(self) -> impl Iterator<Item = Tier> {
        std::iter::successors(self.colder(), |t| t.colder())
    }

    fn for_class(c: Temperature) -> Tier {
        match c {
            Temperature::Hot => Tier::Hot,
            Temperature::Warm => Tier::Warm,
            Temperature::Cold => Tier::Cold,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolState {
    pub name: String,
    pub tier: Tier,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub cost_per_gib_month: f64,
    /// Maintenance: everything must leave.
    pub draining: bool,
    /// The same directory on every host.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeState {
    pub name: String,
    /// Index into the pools.
    pub pool: usize,
    pub size_bytes: u64,
    /// The predicted class of the next window and its score (expected `log1p(requests)`).
    pub predicted: Temperature,
    pub score: f64,
    /// Windows since the last access.
    pub idle_windows: u64,
    /// The window of its last move.
    pub moved_at: Option<u64>,
    /// `Some(shared)`: only pools that are (or are not) shared will do (a VM's own disks are
    /// all on shared pools or none is).
    #[serde(default)]
    pub needs_shared: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    /// A pool should stay under this share of its capacity.
    pub high_water: f64,
    /// Windows a volume stays put after a move.
    pub min_dwell: u64,
    /// Windows without access after which a volume goes one tier colder.
    pub demote_after_idle: u64,
    /// Score margin to displace a hot volume.
    pub hysteresis: f64,
}

impl Default for Policies {
    fn default() -> Self {
        Self {
            high_water: 0.85,
            min_dwell: 4,
            demote_after_idle: 60,
            hysteresis: 0.3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Maintenance,
    Capacity,
    Performance,
    Time,
    Cost,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub volume: usize,
    pub from: usize,
    pub to: usize,
    pub policy: Policy,
    pub reason: String,
}

/// Pool occupancy while planning (moves already planned count).
struct Room<'a> {
    pools: &'a [PoolState],
    used: Vec<u64>,
    high_water: f64,
}

impl Room<'_> {
    fn limit(&self, p: usize) -> u64 {
        (self.pools[p].capacity_bytes as f64 * self.high_water) as u64
    }

    /// Whether volume `v` may be in pool `p` at all.
    fn fits(&self, v: &VolumeState, p: usize) -> bool {
        v.needs_shared.is_none_or(|s| self.pools[p].shared == s)
    }

    /// The cheapest pool of `tier` (not draining, not `except`, one `v` may be in) that takes
    /// `v` under its high-water mark.
    fn cheapest(&self, tier: Tier, v: &VolumeState, except: usize) -> Option<usize> {
        (0..self.pools.len())
            .filter(|p| {
                *p != except
                    && self.pools[*p].tier == tier
                    && !self.pools[*p].draining
                    && self.fits(v, *p)
                    && self.used[*p] + v.size_bytes <= self.limit(*p)
            })
            .min_by(|a, b| {
                self.pools[*a]
                    .cost_per_gib_month
                    .total_cmp(&self.pools[*b].cost_per_gib_month)
                    .then(a.cmp(b))
            })
    }

    fn shift(&mut self, from: usize, to: usize, size: u64) {
        self.used[from] = self.used[from].saturating_sub(size);
        self.used[to] += size;
    }
}

/// Plans the moves for window `now`.
pub fn plan(
    pools: &[PoolState],
    volumes: &[VolumeState],
    policies: &Policies,
    now: u64,
) -> Vec<PlannedMove> {
    let mut room = Room {
        pools,
        used: pools.iter().map(|p| p.used_bytes).collect(),
        high_water: policies.high_water,
    };
    let mut moved = vec![false; volumes.len()];
    let mut out = Vec::new();
    let settled = |v: &VolumeState| {
        v.moved_at
            .is_some_and(|m| now.saturating_sub(m) < policies.min_dwell)
    };
    let take = |out: &mut Vec<PlannedMove>,
                moved: &mut Vec<bool>,
                room: &mut Room,
                v: usize,
                to: usize,
                policy: Policy,
                reason: String| {
        let from = volumes[v].pool;
        room.shift(from, to, volumes[v].size_bytes);
        moved[v] = true;
        out.push(PlannedMove {
            volume: v,
            from,
            to,
            policy,
            reason,
        });
    };

    // 1. Maintenance: out of draining pools, to the same tier if possible, else colder, else
    // warmer.
    for (v, vol) in volumes.iter().enumerate() {
        let here = &pools[vol.pool];
        if !here.draining {
            continue;
        }
        let order = [here.tier, Tier::Warm, Tier::Cold, Tier::Hot];
        if let Some(to) = order.iter().find_map(|t| room.cheapest(*t, vol, vol.pool)) {
            let reason = format!("pool '{}' is draining", here.name);
            take(
                &mut out,
                &mut moved,
                &mut room,
                v,
                to,
                Policy::Maintenance,
                reason,
            );
        }
    }

    // 2. Capacity: coldest volumes out of pools above their high-water mark.
    let mut by_score: Vec<usize> = (0..volumes.len()).collect();
    by_score.sort_by(|a, b| {
        volumes[*a]
            .score
            .total_cmp(&volumes[*b].score)
            .then(a.cmp(b))
    });
    for (p, pool) in pools.iter().enumerate() {
        if room.used[p] <= room.limit(p) {
            continue;
        }
        if pool.tier.colder().is_none() {
            continue;
        }
        for &v in &by_score {
            if room.used[p] <= room.limit(p) {
                break;
            }
            let vol = &volumes[v];
            if vol.pool != p || moved[v] || settled(vol) {
                continue;
            }
            if let Some(to) = pool
                .tier
                .colder_all()
                .find_map(|t| room.cheapest(t, vol, p))
            {
                let reason = format!(
                    "pool '{}' is above {:.0}% of its capacity; coldest volume first",
                    pool.name,
                    policies.high_water * 100.0
                );
                take(
                    &mut out,
                    &mut moved,
                    &mut room,
                    v,
                    to,
                    Policy::Capacity,
                    reason,
                );
            }
        }
    }

    // 3. Performance: predicted hot onto the hot tier, hottest first.
    let hot_now: Vec<usize> = by_score
        .iter()
        .copied()
        .filter(|v| pools[volumes[*v].pool].tier == Tier::Hot)
        .collect();
    let mut weakest = hot_now
        .into_iter()
        .filter(|v| !settled(&volumes[*v]))
        .peekable();
    for &v in by_score.iter().rev() {
        let vol = &volumes[v];
        if moved[v]
            || settled(vol)
            || vol.predicted != Temperature::Hot
            || pools[vol.pool].tier == Tier::Hot
        {
            continue;
        }
        if let Some(to) = room.cheapest(Tier::Hot, vol, vol.pool) {
            let reason = format!("predicted hot (score {:.2})", vol.score);
            take(
                &mut out,
                &mut moved,
                &mut room,
                v,
                to,
                Policy::Performance,
                reason,
            );
            continue;
        }
        // Full: displace the coldest hot volume if clearly colder.
        while let Some(&w) = weakest.peek() {
            if moved[w] {
                weakest.next();
                continue;
            }
            break;
        }
        let Some(&w) = weakest.peek() else {
            continue;
        };
        // Displacing makes room only in a pool this volume may be in.
        if !room.fits(vol, volumes[w].pool) || vol.score <= volumes[w].score + policies.hysteresis {
            continue;
        }
        let hot_pool = volumes[w].pool;
        let Some(down) = room.cheapest(Tier::Warm, &volumes[w], hot_pool) else {
            continue;
        };
        let reason = format!(
            "makes room for a hotter volume (score {:.2} against {:.2})",
            vol.score, volumes[w].score
        );
        take(
            &mut out,
            &mut moved,
            &mut room,
            w,
            down,
            Policy::Performance,
            reason,
        );
        weakest.next();
        if room.fits(vol, hot_pool) && room.used[hot_pool] + vol.size_bytes <= room.limit(hot_pool)
        {
            let reason = format!(
                "predicted hot (score {:.2}), displacing a colder volume",
                vol.score
            );
            take(
                &mut out,
                &mut moved,
                &mut room,
                v,
                hot_pool,
                Policy::Performance,
                reason,
            );
        }
    }

    // 4. Time: idle long enough, one tier colder. 5. Cost: predicted cold, cold tier.
    for (v, vol) in volumes.iter().enumerate() {
        if moved[v] || settled(vol) {
            continue;
        }
        let tier = pools[vol.pool].tier;
        let (policy, targets, reason): (_, Vec<Tier>, _) =
            if vol.idle_windows >= policies.demote_after_idle {
                // One tier colder: the nearest colder tier that has a pool with room.
                (
                    Policy::Time,
                    tier.colder_all().collect(),
                    format!("idle for {} windows", vol.idle_windows),
                )
            } else if vol.predicted == Temperature::Cold && tier < Tier::Cold {
                (
                    Policy::Cost,
                    vec![Tier::for_class(vol.predicted)],
                    "predicted cold: the cheapest tier will do".to_string(),
                )
            } else {
                continue;
            };
        if let Some(to) = targets
            .iter()
            .find_map(|t| room.cheapest(*t, vol, vol.pool))
        {
            take(&mut out, &mut moved, &mut room, v, to, policy, reason);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, tier: Tier, capacity_gib: u64, cost: f64) -> PoolState {
        PoolState {
            name: name.into(),
            tier,
            capacity_bytes: capacity_gib << 30,
            used_bytes: 0,
            cost_per_gib_month: cost,
            draining: false,
            shared: false,
        }
    }

    fn vol(name: &str, pool: usize, predicted: Temperature, score: f64) -> VolumeState {
        VolumeState {
            name: name.into(),
            pool,
            size_bytes: 1 << 30,
            predicted,
            score,
            idle_windows: 0,
            moved_at: None,
            needs_shared: None,
        }
    }

    fn with_usage(mut pools: Vec<PoolState>, volumes: &[VolumeState]) -> Vec<PoolState> {
        for v in volumes {
            pools[v.pool].used_bytes += v.size_bytes;
        }
        pools
    }

    #[test]
    fn hot_goes_up_cold_goes_down_and_each_move_says_why() {
        let vols = vec![
            vol("a", 1, Temperature::Hot, 5.0),
            vol("b", 0, Temperature::Cold, 0.0),
            vol("c", 1, Temperature::Warm, 1.0),
        ];
        let pools = with_usage(
            vec![
                pool("nvme", Tier::Hot, 10, 0.3),
                pool("ssd", Tier::Warm, 10, 0.1),
                pool("hdd", Tier::Cold, 10, 0.02),
            ],
            &vols,
        );
        let plan = plan(&pools, &vols, &Policies::default(), 100);
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(
            (plan[0].volume, plan[0].to, plan[0].policy),
            (0, 0, Policy::Performance)
        );
        assert!(plan[0].reason.contains("predicted hot"));
        assert_eq!(
            (plan[1].volume, plan[1].to, plan[1].policy),
            (1, 2, Policy::Cost)
        );
    }

    #[test]
    fn priorities_maintenance_then_capacity() {
        let mut vols: Vec<VolumeState> = (0..9)
            .map(|i| vol(&format!("v{i}"), 1, Temperature::Warm, i as f64))
            .collect();
        vols.push(vol("on-drained", 3, Temperature::Hot, 9.0));
        let mut pools = with_usage(
            vec![
                pool("nvme", Tier::Hot, 1, 0.3),
                pool("ssd", Tier::Warm, 10, 0.1),
                pool("hdd", Tier::Cold, 100, 0.02),
                pool("old-ssd", Tier::Warm, 10, 0.1),
            ],
            &vols,
        );
        pools[3].draining = true;
        let plan = plan(&pools, &vols, &Policies::default(), 100);
        // The drained pool's volume goes first; the other warm pool is above its high-water
        // mark (9 of 10 GiB), so it goes colder, to hdd.
        assert_eq!(
            (plan[0].volume, plan[0].to, plan[0].policy),
            (9, 2, Policy::Maintenance)
        );
        assert!(plan[0].reason.contains("'old-ssd' is draining"));
        // ssd sheds its coldest volume until under 85%: one is enough (8 GiB).
        let shed: Vec<(usize, usize)> = plan
            .iter()
            .filter(|m| m.policy == Policy::Capacity)
            .map(|m| (m.volume, m.to))
            .collect();
        assert_eq!(shed, vec![(0, 2)], "{plan:?}");
    }

    #[test]
    fn hysteresis_keeps_volumes_from_bouncing() {
        // The hot pool holds one volume (1 GiB, high water 85% of 2 GiB).
        let mut vols = vec![
            vol("resident", 0, Temperature::Hot, 3.0),
            vol("slightly-hotter", 1, Temperature::Hot, 3.2),
        ];
        let pools = with_usage(
            vec![
                pool("nvme", Tier::Hot, 2, 0.3),
                pool("ssd", Tier::Warm, 10, 0.1),
            ],
            &vols,
        );
        let p = Policies::default();
        assert!(
            plan(&pools, &vols, &p, 100).is_empty(),
            "within the margin: nothing moves"
        );
        vols[1].score = 4.0;
        let moves = plan(&pools, &vols, &p, 100);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!((moves[0].volume, moves[0].to), (0, 1));
        assert_eq!((moves[1].volume, moves[1].to), (1, 0));
        // Just moved: the dwell time holds it, even though it is predicted cold now.
        vols[1].moved_at = Some(98);
        vols[1].predicted = Temperature::Cold;
        vols[1].pool = 0;
        vols[0].pool = 1;
        let pools = with_usage(
            vec![
                pool("nvme", Tier::Hot, 2, 0.3),
                pool("ssd", Tier::Warm, 10, 0.1),
            ],
            &vols,
        );
        assert!(plan(&pools, &vols, &p, 100).iter().all(|m| m.volume != 1));
    }

    #[test]
    fn idle_volumes_age_down_a_tier_to_the_cheapest_pool() {
        let mut vols = vec![vol("old", 0, Temperature::Warm, 0.5)];
        vols[0].idle_windows = 100;
        let pools = with_usage(
            vec![
                pool("nvme", Tier::Hot, 10, 0.3),
                pool("ssd-a", Tier::Warm, 10, 0.12),
                pool("ssd-b", Tier::Warm, 10, 0.08),
            ],
            &vols,
        );
        let plan = plan(&pools, &vols, &Policies::default(), 100);
        assert_eq!((plan[0].to, plan[0].policy), (2, Policy::Time));
        assert!(plan[0].reason.contains("idle for 100 windows"));
    }

    #[test]
    fn a_vms_own_disk_keeps_to_its_kind_of_pool() {
        // A cheap shared cold pool and a dearer local one: a VM's local disk goes to the
        // local one, any other volume to the cheaper.
        let mut nfs = pool("nfs-cold", Tier::Cold, 100, 0.01);
        nfs.shared = true;
        let pools = vec![
            pool("hot", Tier::Hot, 100, 0.2),
            nfs,
            pool("cold", Tier::Cold, 100, 0.02),
        ];
        let mut disk = vol("web-root", 0, Temperature::Cold, 0.0);
        disk.needs_shared = Some(false);
        let other = vol("logs", 0, Temperature::Cold, 0.0);
        let vols = vec![disk, other];
        let moves = plan(&with_usage(pools, &vols), &vols, &Policies::default(), 100);
        let to: Vec<(usize, usize)> = moves.iter().map(|m| (m.volume, m.to)).collect();
        assert_eq!(to, vec![(0, 2), (1, 1)]);
    }

    #[test]
    fn nothing_is_displaced_for_a_volume_that_may_not_go_there() {
        // The only hot pool is shared; a hot VM disk on a local pool may not go there, so the
        // cold volume in it stays.
        let mut nfs = pool("nfs-hot", Tier::Hot, 100, 0.2);
        nfs.shared = true;
        let pools = vec![nfs, pool("warm", Tier::Warm, 100, 0.05)];
        let weak = vol("weak", 0, Temperature::Hot, 0.1);
        let mut disk = vol("db-root", 1, Temperature::Hot, 5.0);
        disk.needs_shared = Some(false);
        let vols = vec![weak, disk];
        let moves = plan(&with_usage(pools, &vols), &vols, &Policies::default(), 100);
        assert!(moves.is_empty(), "{moves:?}");
    }

    #[test]
    fn a_missing_tier_is_skipped_not_a_dead_end() {
        // Hot and cold pools only: an idle volume demotes straight to cold; a full hot pool
        // sheds to cold.
        let pools = vec![
            pool("fast", Tier::Hot, 10, 0.2),
            pool("archive", Tier::Cold, 10, 0.01),
        ];
        let mut idle = vol("idle", 0, Temperature::Warm, 0.5);
        idle.idle_windows = 100;
        let moves = plan(&pools, &[idle], &Policies::default(), 1000);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].to, moves[0].policy), (1, Policy::Time));

        let mut full = pools.clone();
        full[0].capacity_bytes = 1 << 30;
        let vols = [
            vol("a", 0, Temperature::Warm, 1.0),
            vol("b", 0, Temperature::Warm, 2.0),
        ];
        let full = with_usage(full, &vols);
        let moves = plan(&full, &vols, &Policies::default(), 1000);
        assert!(
            moves
                .iter()
                .any(|m| m.volume == 0 && m.to == 1 && m.policy == Policy::Capacity),
            "{moves:?}"
        );
    }
}
