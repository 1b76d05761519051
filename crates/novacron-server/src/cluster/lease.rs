//! Leases and fencing.
//!
//! Every host, the leader included, renews its lease once per heartbeat: a follower sends a
//! heartbeat to the leader, which confirms its leadership with a quorum (a read-index round)
//! *after* receiving it and only then answers. The lease then runs from the moment the
//! heartbeat was *sent*. The leader notes when it received it. See ARCHITECTURE.md, "Leases and
//! fencing", for why this means no other host can take over a VM before its old host has
//! fenced it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_hypervisor::Hypervisor;
use novacron_types::{ApiError, ErrorCode, VmState, now_millis};

use super::{Cluster, FenceAction, FenceRecord, Heartbeat, Inventory, LeaseGrant, PeerReach, host};

/// What the lease keeper needs of this host beyond the cluster layer and the hypervisor: the
/// service layer implements it, so the cluster layer never names the layer built on it.
#[async_trait::async_trait]
pub trait LocalHost: Send + Sync + 'static {
    /// Free bytes of every storage pool this host sees (sent with each heartbeat). Must not
    /// block: the lease keeper calls it every heartbeat.
    fn visible_pools(&self) -> BTreeMap<String, u64>;

    /// This host is back in the cluster after it was isolated: take stock of its VMs again
    /// and resume what fencing paused (see [`Cluster::take_paused_by_fence`]). Runs in its own
    /// task; the lease keeper goes on renewing meanwhile.
    async fn rejoined(&self);
}

impl Cluster {
    /// Leader side of a heartbeat: confirm leadership with a quorum, then grant.
    pub async fn receive_heartbeat(&self, beat: Heartbeat) -> Result<LeaseGrant, ApiError> {
        // A removed host gets no lease: it isolates itself (and fences anything it still runs).
        let known = self.state.read(|s| {
            s.nodes.contains_key(&beat.node.0) && !s.meta.removed_nodes.contains(&beat.node.0)
        });
        if !known && beat.node != self.node {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("host {} is not a member of this cluster", beat.node),
            ));
        }
        self.state.serve_read_index().await?;
        self.record_heartbeat(beat);
        Ok(LeaseGrant {
            leader: self.node,
            term: self.state.metrics().term,
            lease_ms: self.settings.lease.as_millis() as u64,
        })
    }

    /// Renews this host's lease once. Returns the grant.
    async fn renew(&self, beat: Heartbeat) -> Result<LeaseGrant, ApiError> {
        match self.state.leader() {
            Some((id, _)) if id == self.node.0 => self.receive_heartbeat(beat).await,
            Some((_, addr)) => self
                .transport
                .call(
                    &addr.api_addr,
                    "/internal/v1/heartbeat",
                    &beat,
                    self.settings.heartbeat,
                )
                .await
                .map_err(|e| ApiError::unavailable(e.to_string())),
            None => Err(ApiError::unavailable("no leader is known")),
        }
    }

    fn on_renewed(&self, sent: Instant) -> bool {
        let mut l = self.local();
        l.renewed_at = Some(l.renewed_at.map_or(sent, |r| r.max(sent)));
        l.isolated_since.take().is_some()
    }

    /// Has the lease run out to the point where this host must fence? Returns the moment the
    /// lease itself runs out, when so and not already isolated.
    fn should_isolate(&self) -> Option<Instant> {
        let l = self.local();
        if l.isolated_since.is_some() {
            return None;
        }
        // Before the first renewal the host holds whatever lease it could have had before it
        // started; count from start-up.
        let from = l.renewed_at.unwrap_or(self.started);
        (from.elapsed() >= self.settings.isolate_after()).then_some(from + self.settings.lease)
    }

    async fn ping_peers(&self) {
        let members = self.state.membership().nodes;
        let timeout = self.settings.heartbeat.min(Duration::from_millis(500));
        let pings = members
            .into_iter()
            .filter(|(id, _)| *id != self.node.0)
            .map(|(id, addr)| async move {
                let t = Instant::now();
                let ok = self
                    .transport
                    .get::<serde_json::Value>(&addr.api_addr, "/internal/v1/ping", timeout)
                    .await
                    .is_ok();
                (id, ok, t.elapsed())
            });
        let results = futures::future::join_all(pings).await;
        let mut l = self.local();
        l.reach
            .retain(|id, _| results.iter().any(|(r, _, _)| r == id));
        for (id, ok, rtt) in results {
            let e = l.reach.entry(id).or_insert(PeerReach {
                reachable: false,
                rtt_us: None,
                last_ok_ms_ago: None,
                last_ok: None,
            });
            e.reachable = ok;
            if ok {
                e.rtt_us = Some(rtt.as_micros() as u64);
                e.last_ok = Some(Instant::now());
            }
        }
    }
}

/// This host's heartbeat: inventory and what it can reach.
fn heartbeat(c: &Cluster, hv: &dyn Hypervisor, local: &dyn LocalHost) -> Heartbeat {
    let me = c.node;
    let info = hv.info();
    let (mem_total, mem_avail) = host::meminfo();
    let vms_running = c.state.read(|s| {
        s.vms
            .values()
            .filter(|v| v.node == me && v.state == VmState::Running)
            .count() as u32
    });
    let disk = local.visible_pools();
    Heartbeat {
        node: me,
        inventory: Inventory {
            cpus: host::cpus(),
            memory_mib: mem_total,
            memory_available_mib: mem_avail,
            disk_free_bytes: disk,
            qemu_version: info.qemu_version,
            accelerator: info.accelerator,
            cpu_model: host::cpu_model(),
            load1: host::load1(),
            vms_running,
        },
        reach: c
            .reach_snapshot()
            .into_iter()
            .map(|(id, r)| (id, r.reachable))
            .collect(),
        applied_index: c.state.metrics().applied_index,
        isolated: c.is_isolated(),
        lease_ms: c.settings.lease.as_millis() as u64,
    }
}

/// Runs for the life of the host: renew the lease every heartbeat, ping peers, and fence when
/// the lease is about to run out. After each renewal the watchdog learns the new deadline.
pub async fn run(
    c: Arc<Cluster>,
    hv: Arc<dyn Hypervisor>,
    local: Arc<dyn LocalHost>,
    watchdog: Arc<crate::watchdog::Watchdog>,
) {
    let mut tick = tokio::time::interval(c.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sent = Instant::now();
        let beat = heartbeat(&c, hv.as_ref(), local.as_ref());
        let (renewed, ()) = tokio::join!(
            tokio::time::timeout(c.settings.heartbeat, c.renew(beat)),
            c.ping_peers(),
        );
        match renewed {
            Ok(Ok(_grant)) => {
                // Halfway through the fencing budget: after in-process fencing would have
                // happened, still before the lease runs out.
                let fence_at = sent + c.settings.lease - c.settings.fence_budget / 2;
                watchdog.feed(fence_at.saturating_duration_since(Instant::now()));
                if c.on_renewed(sent) {
                    tracing::warn!("lease renewed: this host is back in the cluster");
                    c.state.refuse_writes(None);
                    // In its own task: the lease keeper must go on renewing meanwhile.
                    let local = local.clone();
                    tokio::spawn(async move { local.rejoined().await });
                }
            }
            Ok(Err(e)) => tracing::debug!("lease renewal failed: {}", e.message),
            Err(_) => tracing::debug!("lease renewal timed out"),
        }
        if let Some(expiry) = c.should_isolate() {
            isolate_and_fence(&c, hv.as_ref(), expiry).await;
        }
    }
}

async fn isolate_and_fence(c: &Cluster, hv: &dyn Hypervisor, lease_expiry: Instant) {
    let expiry_wall = Cluster::wall_in(lease_expiry.saturating_duration_since(Instant::now()));
    c.local().isolated_since = Some(Instant::now());
    let why = format!(
        "this host is isolated: it could not renew its lease with a quorum of the cluster for \
         {} ms, so it refuses changes{}",
        c.settings.isolate_after().as_millis(),
        match c.settings.fencing {
            FenceAction::Pause => " and has paused its VMs",
            FenceAction::Stop => " and has stopped its VMs",
            FenceAction::None => "",
        }
    );
    c.state
        .refuse_writes(Some(ApiError::new(ErrorCode::Isolated, why.clone())));
    tracing::error!("{why}");
    let me = c.node;
    // A VM on a shared pool could be started elsewhere (HA, or HA turned on while this host
    // is away): stopped, never paused.
    let vms: Vec<(novacron_types::VmId, String, bool)> = c.state.read(|s| {
        s.vms
            .values()
            .filter(|v| v.node == me)
            .map(|v| (v.id, v.name.clone(), v.spec.ha || s.on_shared_pool(v)))
            .collect()
    });
    let mut fenced = Vec::new();
    for (id, name, ha) in vms {
        let observed = hv.observe(id).await;
        // Such a VM is always stopped: another host may start it, and a paused QEMU would still
        // hold its disks.
        let action = if ha {
            FenceAction::Stop
        } else {
            c.settings.fencing
        };
        let r = match (action, observed) {
            (FenceAction::Pause, VmState::Running) => {
                let r = hv.pause(id).await;
                if r.is_ok() {
                    c.local().paused_by_fence.push(id);
                }
                r
            }
            (FenceAction::Stop, s) if s.has_process() => hv.force_stop(id).await,
            _ => continue,
        };
        match r {
            Ok(()) => fenced.push(name),
            // Pausing failed: stopping is the only safe thing left.
            Err(e) => {
                tracing::error!(vm = %name, "fencing failed ({e}); killing QEMU");
                let _ = hv.force_stop(id).await;
                fenced.push(name);
            }
        }
    }
    let record = FenceRecord {
        at: now_millis(),
        lease_expiry: expiry_wall,
        action: c.settings.fencing,
        vms: fenced,
    };
    tracing::error!(?record, "fenced");
    c.local().fenced.push(record);
}
