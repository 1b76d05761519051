//! HA: VMs marked `ha` whose host is lost are restarted on another host.
//!
//! Two halves:
//! - the **leader** ([`Service::ha_pass`], once per heartbeat) finds HA VMs that should run on
//!   a host whose lease may have run out: only after `lease + margin` since the leader last
//!   heard from that host (`Cluster::lease_safe_after`; see ARCHITECTURE.md, "Leases and
//!   fencing") has the host certainly fenced them. It picks a new host with the VM's own
//!   placement rules (the pool must be visible there) and records `RecoverVm`, which `apply`
//!   accepts once (the VM must still be on the lost host, HA, on a shared pool);
//! - the **owner** ([`Service::ha_start_recovered`]) starts VMs recorded as recovered to it,
//!   and its own HA VMs meant to run that are stopped or crashed (killed by fencing or the
//!   watchdog while the host came back in time, or powered off from inside), as a
//!   `vm.ha_restart` operation, with backoff when a start fails. The operation's first command
//!   records `starting` on this host: refused if the VM moved meanwhile, and it changes the
//!   record, so a `RecoverVm` decided before it (on an older `updated_at`) is refused.
//!
//! The lost host, if it comes back, removes its copy (`remove_stray_copies`): its lease ran out,
//! so it had already killed the QEMU (in-process fencing or the watchdog).
//!
//! Invariants: a VM is recovered only on the leader, only after its host's lease and margin
//! passed, and only through one `RecoverVm` per loss; this module never touches a QEMU of a
//! VM that is not recorded on this host.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use novacron_state::{CommandV1, placement};
use novacron_types::{ApiError, NodeId, PowerState, UserId, VmId, VmState, now_millis};

use super::Service;
use crate::auth::Principal;

/// Retry state of recovered VMs whose start failed on this host.
#[derive(Default)]
pub(crate) struct HaRetries {
    next: HashMap<VmId, (Instant, Duration)>,
}

fn system() -> Principal {
    Principal {
        user: UserId::new_random(),
        username: "ha".into(),
        role: novacron_types::Role::Admin,
        token: None,
    }
}

impl Service {
    /// Leader only: records a new host for each HA VM of a host that is lost for sure.
    pub(crate) async fn ha_pass(&self) {
        let me = self.inner.node;
        if self.inner.state.metrics().role != "leader" {
            return;
        }
        let cluster = self.cluster().clone();
        let now = Instant::now();
        let lost: Vec<(VmId, String, NodeId, i64)> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|v| {
                    v.spec.ha
                        && v.desired == PowerState::Running
                        && v.node != me
                        && cluster
                            .lease_safe_after(v.node.0)
                            .is_some_and(|safe| now >= safe)
                })
                .map(|v| (v.id, v.name.clone(), v.node, v.updated_at))
                .collect()
        });
        if lost.is_empty() {
            return;
        }
        let mut live = match self.live_view().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("HA: no live view of the hosts: {}", e.message);
                return;
            }
        };
        // A host not heard from for a few heartbeats is no target, even before it counts as
        // offline (several hosts may be lost together).
        let quiet = cluster.settings.heartbeat * 3;
        for (n, l) in live.iter_mut() {
            if *n != me.0 && cluster.last_heard(*n).is_some_and(|t| t.elapsed() > quiet) {
                l.health = "offline".into();
            }
        }
        for (id, name, from, seen) in lost {
            let Some(vm) = self.inner.state.read(|s| s.vms.get(&id).cloned()) else {
                continue;
            };
            let demand = placement::Demand {
                vcpus: vm.spec.vcpus,
                memory_mib: vm.spec.memory_mib,
                disk_mib: 0,
                rules: &vm.spec.placement,
                pool: vm.spec.pool.as_deref(),
                vm: Some(id),
            };
            let report = self
                .inner
                .state
                .read(|s| placement::rank(s, &live, &demand, self.inner.settings.placement, None));
            let Some(to) = report
                .candidates
                .iter()
                .map(|c| c.node)
                .find(|n| *n != from)
            else {
                let (_, why) = placement::explain(&report, Some(from));
                tracing::warn!(vm = %name, "HA: host {from} is lost, but no host can take the VM: {why}");
                continue;
            };
            // Lost in the middle of a migration: its target's waiting copy must go first (it
            // never ran the guest before ownership moved, and ownership did not move). If the
            // target cannot be told, try again next pass.
            if let Some(target) = vm.migrating_to
                && !self.abort_incoming_on(target, id).await
            {
                tracing::warn!(vm = %name, "HA: host {from} is lost mid-migration; waiting until host {target} drops its incoming copy");
                continue;
            }
            let cmd = CommandV1::RecoverVm {
                id,
                from,
                to,
                seen,
                at: now_millis(),
            };
            match self.inner.state.propose(cmd).await {
                Ok(()) => {
                    tracing::warn!(vm = %name, "HA: host {from} is lost (lease and margin passed); restarting the VM on host {to}");
                    self.inner.metrics.ha_recoveries.inc();
                }
                Err(e) => {
                    tracing::warn!(vm = %name, "HA: recording the move failed: {}", e.message)
                }
            }
        }
    }

    /// Asks `target` to remove its incoming copy of `vm`; true once it has (or never had one).
    async fn abort_incoming_on(&self, target: NodeId, vm: VmId) -> bool {
        if target == self.inner.node {
            return self.incoming_abort(vm).await.is_ok();
        }
        let Some(addr) = self
            .inner
            .state
            .read(|s| s.nodes.get(&target.0).map(|n| n.api_address.clone()))
        else {
            return true;
        };
        self.cluster()
            .transport
            .call::<_, serde_json::Value>(
                &addr,
                &format!("/internal/v1/migrations/{vm}/abort"),
                &serde_json::json!({}),
                std::time::Duration::from_secs(10),
            )
            .await
            .is_ok()
    }

    /// Every host: starts the VMs HA moved here (each once at a time; failed starts are tried
    /// again with backoff, up to a minute apart).
    pub(crate) async fn ha_start_recovered(&self) {
        let me = self.inner.node;
        let mine: Vec<VmId> = self.inner.state.read(|s| {
            s.vms
                .values()
                .filter(|v| {
                    v.node == me
                        && v.desired == PowerState::Running
                        && v.migrating_to.is_none()
                        && (v.recovered_from.is_some()
                            || (v.spec.ha
                                && matches!(v.state, VmState::Stopped | VmState::Crashed)))
                })
                .map(|v| v.id)
                .collect()
        });
        for id in mine {
            {
                let retries = self
                    .inner
                    .ha_retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if retries
                    .next
                    .get(&id)
                    .is_some_and(|(t, _)| Instant::now() < *t)
                {
                    continue;
                }
            }
            let Some(vm) = self.inner.state.read(|s| s.vms.get(&id).cloned()) else {
                continue;
            };
            let Ok(guard) = self.lock_vm(id, &vm.name) else {
                continue;
            };
            let svc = self.clone();
            let from = vm.recovered_from;
            let started = self
                .spawn_operation(
                    "vm.ha_restart",
                    vec![super::vms::vm_path(id)],
                    &system(),
                    // Refused if the VM is no longer this host's when it applies; and it
                    // changes the record, so an HA move decided before it is refused.
                    vec![CommandV1::RecordVmObservedOn {
                        node: me,
                        id,
                        state: VmState::Starting,
                        reason: None,
                        at: now_millis(),
                    }],
                    move |ctx| async move {
                        let _guard = guard;
                        ctx.progress(
                            10,
                            format!(
                                "host {} was lost; starting the VM here",
                                from.map(|n| n.to_string()).unwrap_or_default()
                            ),
                        )
                        .await;
                        let r = svc.start_recovered(&vm).await;
                        svc.note_ha_attempt(id, r.is_ok());
                        r
                    },
                )
                .await;
            if let Err(e) = started {
                tracing::warn!(vm = %id, "HA: cannot start the restart operation: {}", e.message);
            }
        }
    }

    async fn start_recovered(&self, vm: &novacron_types::Vm) -> Result<(), ApiError> {
        let spec = self.runtime_spec(vm)?;
        let hv = &self.inner.hv;
        if hv.observe(vm.id).await.has_process() {
            return Err(ApiError::conflict(format!(
                "VM '{}' already has a QEMU on this host",
                vm.name
            )));
        }
        self.require_pool_here(vm)?;
        self.require_lease(vm)?;
        self.require_disks_settled(vm)?;
        hv.link_disks(&spec).await.map_err(super::hv_error)?;
        let r = hv.start(&spec).await;
        self.sync_vm_observed(vm.id).await;
        r.map_err(super::hv_error)
    }

    /// A VM on a shared pool starts only while this host holds a lease with time to spare: a
    /// start stalled past the lease (a hung mount, a stopped process) could otherwise come to
    /// life after HA gave the VM to another host.
    pub(crate) fn require_lease(&self, vm: &novacron_types::Vm) -> Result<(), ApiError> {
        let shared = vm.spec.ha || self.inner.state.read(|s| s.on_shared_pool(vm));
        let c = self.cluster();
        if shared && c.lease_left() < c.settings.heartbeat {
            return Err(ApiError::unavailable(format!(
                "host {} does not hold a cluster lease with time to spare ({} ms left); a VM on \
                 a shared pool starts only then",
                self.inner.node,
                c.lease_left().as_millis()
            )));
        }
        Ok(())
    }

    fn note_ha_attempt(&self, id: VmId, ok: bool) {
        let mut retries = self
            .inner
            .ha_retries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if ok {
            retries.next.remove(&id);
            return;
        }
        let wait = retries
            .next
            .get(&id)
            .map(|(_, w)| (*w * 2).min(Duration::from_secs(60)))
            .unwrap_or(Duration::from_secs(1));
        retries.next.insert(id, (Instant::now() + wait, wait));
    }
}

/// Runs for the life of the host: the leader's HA pass once per heartbeat, and this host's
/// recovered VMs started as soon as their move is applied.
pub async fn run(svc: Service) {
    let heartbeat = svc.cluster().settings.heartbeat;
    let mut events = svc.state().subscribe();
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => svc.ha_pass().await,
            ev = events.recv() => {
                if matches!(ev, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
        }
        svc.ha_start_recovered().await;
    }
}
