//! The I/O collector: every `stats_interval`, each running VM of this host has its disks'
//! cumulative counters read from QEMU (`query-blockstats`) into the bounded, downsampled store
//! (`novacron_tiering::series`), keyed `VM/disk`. This is what the tiering models will learn
//! from; `GET /api/v1/vms/{vm}/disks/stats` shows it.
//!
//! Invariants: only VMs recorded on this host are sampled; a VM that left (deleted, moved) has
//! its series dropped, so the store is bounded by this host's VMs.

use std::collections::BTreeSet;

use novacron_tiering::series::{Bucket, Counters};
use novacron_types::{ApiError, DiskIoReport, DiskIoSeries, IoBucket, VmId, VmState, now_millis};

use super::Service;

impl Service {
    /// One round of sampling.
    pub(crate) async fn sample_io(&self) {
        let me = self.inner.node;
        let vms: Vec<VmId> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|v| v.node == me)
                .map(|v| v.id)
                .collect()
        });
        let t = (now_millis() / 1000).max(0) as u64;
        let mut samples = Vec::new();
        for id in &vms {
            if !matches!(
                self.inner.hv.observe(*id).await,
                VmState::Running | VmState::Paused
            ) {
                continue;
            }
            if let Ok(disks) = self.inner.hv.block_stats(*id).await {
                samples.extend(disks.into_iter().map(|(disk, c)| {
                    (
                        format!("{id}/{disk}"),
                        Counters {
                            rd_bytes: c.rd_bytes,
                            wr_bytes: c.wr_bytes,
                            rd_ops: c.rd_ops,
                            wr_ops: c.wr_ops,
                        },
                    )
                }));
            }
        }
        let here: BTreeSet<String> = vms.iter().map(|v| format!("{v}/")).collect();
        let mut store = self
            .inner
            .io_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (key, c) in samples {
            store.sample(&key, t, c);
        }
        let gone: Vec<String> = store
            .volumes()
            .map(|(k, _)| k.clone())
            .filter(|k| {
                !k.split_once('/')
                    .is_some_and(|(vm, _)| here.contains(&format!("{vm}/")))
            })
            .collect();
        for k in gone {
            store.forget(&k);
        }
    }

    /// The VM's collected disk I/O at the finest resolution of at least `step_s` seconds.
    pub fn disk_stats(&self, key: &str, step_s: Option<u64>) -> Result<DiskIoReport, ApiError> {
        let vm = self.find_vm(key)?;
        let step = step_s.unwrap_or(0);
        if step > 86_400 {
            return Err(ApiError::invalid(
                "step",
                format!("step must be at most 86400 seconds (got {step})"),
            ));
        }
        let prefix = format!("{}/", vm.id);
        let store = self
            .inner
            .io_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let disks = store
            .volumes()
            .filter_map(|(k, series)| {
                let disk = k.strip_prefix(&prefix)?;
                let (step_s, buckets) = series.buckets(step);
                Some(DiskIoSeries {
                    disk: disk.to_string(),
                    step_s,
                    buckets: buckets.iter().map(to_api).collect(),
                })
            })
            .collect();
        Ok(DiskIoReport {
            node: self.inner.node,
            sample_interval_s: self.inner.settings.stats_interval.as_secs().max(1),
            disks,
        })
    }
}

fn to_api(b: &Bucket) -> IoBucket {
    IoBucket {
        start: b.start,
        rd_bytes: b.rd_bytes,
        wr_bytes: b.wr_bytes,
        rd_ops: b.rd_ops,
        wr_ops: b.wr_ops,
    }
}

/// Runs for the life of the host.
pub async fn run(svc: Service) {
    let mut tick = tokio::time::interval(svc.inner.settings.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        svc.sample_io().await;
    }
}
