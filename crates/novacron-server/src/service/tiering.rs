//! Automatic tiering: once per policy window (when the policy is enabled) each host
//! 1. sums the I/O operations of the volumes it answers for over the window that just closed
//!    (from the collector's store; a detached volume did none),
//! 2. feeds them to its forecaster (`novacron_tiering::online`: the three models and the
//!    ensemble learn from the window and forecast the next),
//! 3. hands forecasts, pools and policies to the pure planner (`novacron_tiering::planner`),
//! 4. starts each planned move as a `volume.move` operation (the move scheduler paces them),
//!    with the policy and reason in the operation's message and the log.
//!
//! A host answers for the volumes attached to its VMs and the detached ones on its local pools;
//! the leader answers for detached volumes on shared pools. A VM's own disks move with their
//! VM, not here.
//!
//! Invariants: decisions come from the planner only (this file gathers inputs and carries the
//! plan out); only pools usable on this host are planned for; a volume moving is left alone.

use std::collections::BTreeMap;
use std::time::Duration;

use novacron_tiering::features::Temperature;
use novacron_tiering::online::{Forecaster, NAMES};
use novacron_tiering::planner::{self, PoolState, Tier, VolumeState};
use novacron_types::{
    ApiError, MoveVolumeRequest, PlannedVolumeMove, PoolTier, StoragePool, TieringPolicy,
    TieringReport, UserId, Volume, VolumeForecast, now_millis,
};

use super::Service;
use crate::auth::Principal;
use crate::metrics::{ClassLabels, ModelLabels};

/// The forecaster and the settings it was made for (a new window length or hot threshold
/// starts a new one).
#[derive(Default)]
pub(crate) struct Tiering {
    forecaster: Option<((u64, u64), Forecaster)>,
    last: Option<TieringReport>,
}

fn system() -> Principal {
    Principal {
        user: UserId::new_random(),
        username: "tiering".into(),
        role: novacron_types::Role::Admin,
        token: None,
    }
}

fn tier(t: PoolTier) -> Tier {
    match t {
        PoolTier::Hot => Tier::Hot,
        PoolTier::Warm => Tier::Warm,
        PoolTier::Cold => Tier::Cold,
    }
}

impl Service {
    /// The volumes this host plans for.
    fn my_volumes(&self) -> Vec<Volume> {
        let me = self.inner.node;
        let leader = self.inner.state.leader().map(|(id, _)| id) == Some(me.0);
        self.inner.state.read(|s| {
            s.volumes
                .values()
                .filter(|v| v.moving_to.is_none())
                .filter(|v| match s.volume_host(v) {
                    Some(h) => h == me,
                    None => leader,
                })
                .cloned()
                .collect()
        })
    }

    /// Operations each volume did in the `window_s` seconds up to `now_s`.
    fn window_ops(&self, vols: &[Volume], now_s: u64, window_s: u64) -> BTreeMap<String, u64> {
        let store = self
            .inner
            .io_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        vols.iter()
            .map(|v| {
                let ops = v
                    .attached_to
                    .and_then(|vm| store.get(&format!("{vm}/{}", super::volumes::device_of(v))))
                    .map(|series| {
                        let (_, buckets) = series.buckets(0);
                        buckets
                            .iter()
                            .filter(|b| b.start + window_s > now_s)
                            .map(|b| b.ops())
                            .sum()
                    })
                    .unwrap_or(0);
                (v.id.to_string(), ops)
            })
            .collect()
    }

    /// One planning pass; returns how many moves it started.
    pub(crate) async fn tiering_pass(&self, policy: &TieringPolicy) -> usize {
        let vols = self.my_volumes();
        let now_s = (now_millis() / 1000).max(0) as u64;
        let ops = self.window_ops(&vols, now_s, policy.window_s);
        let pools: Vec<StoragePool> = self
            .inner
            .state
            .read(|s| s.pools.values().cloned().collect());
        let pools: Vec<StoragePool> = pools
            .into_iter()
            .filter(|p| self.pool_usable_here(&p.name))
            .collect();
        let hot_capacity = vols.len().max(1);
        let mut accuracy = BTreeMap::new();
        let windows;
        let forecasts = {
            let mut t = self.inner.tiering.lock().unwrap_or_else(|p| p.into_inner());
            let key = (policy.window_s, policy.hot_ops_per_window);
            if t.forecaster.as_ref().is_none_or(|(k, _)| *k != key) {
                t.forecaster = Some((
                    key,
                    Forecaster::new(
                        policy.window_s as f64,
                        policy.hot_ops_per_window as f64,
                        hot_capacity,
                        self.inner.node.0,
                    ),
                ));
            }
            let Some((_, f)) = t.forecaster.as_mut() else {
                return 0;
            };
            let forecasts = f.push(&ops);
            let m = &self.inner.metrics;
            for (name, acc) in NAMES.iter().zip(f.accuracy()) {
                if let Some(a) = acc {
                    m.tiering_accuracy
                        .get_or_create(&ModelLabels {
                            model: name.to_string(),
                        })
                        .set(a);
                    accuracy.insert(name.to_string(), a);
                }
            }
            windows = f.windows() as u64;
            forecasts
        };
        let m = &self.inner.metrics;
        for class in Temperature::ALL {
            let n = vols
                .iter()
                .filter(|v| {
                    forecasts
                        .get(&v.id.to_string())
                        .is_some_and(|f| f.class == class)
                })
                .count();
            m.tiering_predictions
                .get_or_create(&ClassLabels {
                    class: class.as_str().to_string(),
                })
                .set(n as i64);
        }

        // The planner's view: pools usable here with what all volumes take there.
        let used: BTreeMap<String, u64> = self.inner.state.read(|s| {
            let mut used = BTreeMap::new();
            for v in s.volumes.values() {
                for p in std::iter::once(&v.pool).chain(v.moving_to.as_ref()) {
                    *used.entry(p.clone()).or_default() += v.size_mib << 20;
                }
            }
            used
        });
        let pool_states: Vec<PoolState> = pools
            .iter()
            .map(|p| PoolState {
                name: p.name.clone(),
                tier: tier(p.tier),
                capacity_bytes: p.capacity_bytes,
                used_bytes: used.get(&p.name).copied().unwrap_or(0),
                cost_per_gib_month: p.cost_per_gib_month,
                draining: policy.draining_pools.contains(&p.name),
                shared: p.shared,
            })
            .collect();
        let window = |ms: i64| (ms.max(0) as u64 / 1000) / policy.window_s.max(1);
        let mut planned_vols = Vec::new();
        let mut states = Vec::new();
        for v in &vols {
            let (Some(pool), Some(f)) = (
                pools.iter().position(|p| p.name == v.pool),
                forecasts.get(&v.id.to_string()),
            ) else {
                continue;
            };
            states.push(VolumeState {
                name: v.name.clone(),
                pool,
                size_bytes: v.size_mib << 20,
                predicted: f.class,
                score: f.score,
                idle_windows: f.idle_windows,
                moved_at: v.moved_at.map(window),
                // A VM's own disk keeps to its kind of pool (see `novacron_state::volumes`).
                needs_shared: v.is_vm_disk().then_some(v.node.is_none()),
            });
            planned_vols.push(v.clone());
        }
        let policies = planner::Policies {
            high_water: policy.high_water,
            min_dwell: policy.min_dwell_windows,
            demote_after_idle: policy.demote_after_idle_windows,
            hysteresis: policy.hysteresis,
        };
        let plan = planner::plan(&pool_states, &states, &policies, now_s / policy.window_s);
        let mut moves = Vec::new();
        for mv in plan {
            let v = &planned_vols[mv.volume];
            let to = pool_states[mv.to].name.clone();
            let policy_name = format!("{:?}", mv.policy).to_lowercase();
            let why = format!("{policy_name} policy: {}", mv.reason);
            let result = self
                .move_volume(
                    &v.id.to_string(),
                    MoveVolumeRequest {
                        pool: to.clone(),
                        rate_mb: None,
                    },
                    &why,
                    &system(),
                )
                .await;
            match &result {
                Ok(op) => {
                    tracing::info!(volume = v.name, from = v.pool, to, why, op = %op.id, "tiering move")
                }
                Err(e) => {
                    tracing::warn!(
                        volume = v.name,
                        to,
                        why,
                        "tiering move not started: {}",
                        e.message
                    )
                }
            }
            moves.push(PlannedVolumeMove {
                volume: v.id,
                name: v.name.clone(),
                from: v.pool.clone(),
                to,
                policy: policy_name,
                reason: mv.reason,
                operation: result.as_ref().ok().map(|op| op.id),
                error: result.err().map(|e| e.message),
            });
        }
        let started = moves.iter().filter(|m| m.operation.is_some()).count();
        let report = TieringReport {
            node: self.inner.node,
            at: now_millis(),
            window_s: policy.window_s,
            windows,
            volumes: vols
                .iter()
                .filter_map(|v| {
                    let f = forecasts.get(&v.id.to_string())?;
                    Some(VolumeForecast {
                        volume: v.id,
                        name: v.name.clone(),
                        pool: v.pool.clone(),
                        ops: ops.get(&v.id.to_string()).copied().unwrap_or(0),
                        predicted: f.class.as_str().to_string(),
                        score: f.score,
                        idle_windows: f.idle_windows,
                    })
                })
                .collect(),
            moves,
            accuracy,
        };
        self.inner
            .tiering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last = Some(report);
        started
    }

    /// This host's last tiering pass.
    pub fn tiering_report(&self) -> Result<TieringReport, ApiError> {
        self.inner
            .tiering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
            .clone()
            .ok_or_else(|| {
                ApiError::new(
                    novacron_types::ErrorCode::NotFound,
                    format!(
                        "host {} has made no tiering pass yet (the policy is off, or its first \
                         window has not closed)",
                        self.inner.node
                    ),
                )
                .with_reason("no_pass_yet")
            })
    }
}

/// Runs for the life of a full host: one pass per policy window while the policy is enabled.
pub async fn run(svc: Service) {
    loop {
        let policy = svc.tiering_policy();
        if !policy.enabled {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_secs(policy.window_s)).await;
        // The policy may have changed while waiting.
        let policy = svc.tiering_policy();
        if policy.enabled {
            svc.tiering_pass(&policy).await;
        }
    }
}
