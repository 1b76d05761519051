//! Live migration with QEMU's own machinery, the way libvirt drives it with local disks:
//!
//! ```text
//!  target                                   source
//!  incoming_start: disks created empty,
//!    QEMU -S -incoming defer, NBD server,
//!    each disk exported, migrate-incoming
//!                                           outgoing_mirror: blockdev-add nbd:<disk>,
//!                                             blockdev-mirror (root: top layer only, the
//!                                             image is on both hosts; others: full)
//!                                           outgoing_status … until every mirror is ready
//!                                           outgoing_migrate: capabilities (pause-before-
//!                                             switchover, auto-converge, post-copy),
//!                                             parameters (bandwidth, downtime), migrate
//!                                           outgoing_status … until `pre-switchover`
//!                                           outgoing_switchover: cancel the ready mirrors
//!                                             (the target's disks are now complete, the guest
//!                                             is paused), migrate-continue
//!                                           outgoing_status … until `completed`
//!                                           (the server records the new owner here)
//!  incoming_finish: NBD server stopped,
//!    cont
//!                                           outgoing_complete: mirror targets removed
//! ```
//!
//! Failure at any point before `incoming_finish`: `outgoing_cancel` on the source (the guest
//! keeps running there) and `incoming_abort` on the target (its QEMU and files go).
//! Every QMP call has a deadline; all commands go through the VM's runner, which owns QMP.

use std::time::Duration;

use serde_json::{Value, json};

use novacron_types::VmId;

use super::qmp_raw::{RawCommand, none};
use super::{QMP_DEADLINE, QemuHypervisor};
use crate::{HvError, Hypervisor, IncomingPlan, MigrationStats, MigrationTuning, RuntimeSpec};

/// The block node names of a VM's disks, as `args::command_line` names them.
fn disk_nodes(extra_disks: usize) -> Vec<String> {
    std::iter::once("root".to_string())
        .chain((1..=extra_disks).map(|i| format!("disk{i}")))
        .collect()
}

/// Prefix of everything migration adds to a QEMU (exports, NBD client nodes, mirror jobs).
fn mig(node: &str) -> String {
    format!("mig-{node}")
}

pub(super) async fn raw(hv: &QemuHypervisor, id: VmId, cmd: RawCommand) -> Result<Value, HvError> {
    let h = hv.running(id)?;
    // The runner owns the command; dropping our wait on timeout is safe.
    tokio::time::timeout(QMP_DEADLINE, h.raw(cmd))
        .await
        .map_err(|_| HvError::Timeout {
            what: "a migration QMP command",
            after: QMP_DEADLINE,
        })?
}

async fn run_state(hv: &QemuHypervisor, id: VmId) -> Result<String, HvError> {
    let st = raw(hv, id, RawCommand::QueryStatus(none())).await?;
    Ok(st["status"].as_str().unwrap_or("unknown").to_string())
}

pub(super) async fn incoming_start(
    hv: &QemuHypervisor,
    spec: &RuntimeSpec,
    plan: &IncomingPlan,
) -> Result<(), HvError> {
    if hv.handle(spec.id).is_some() || hv.live_pid(spec.id).is_some() {
        return Err(HvError::AlreadyRunning(spec.id));
    }
    if hv.paths(spec.id).dir.exists() {
        return Err(HvError::WrongState {
            op: "receiving a migration",
            state: "already present on this host (its files exist)",
        });
    }
    if !spec.base_image.exists() {
        return Err(HvError::StartFailed(format!(
            "the VM's image {} is not on this host",
            spec.base_image.display()
        )));
    }
    if spec.shared_disks {
        // The same files as the source's: QEMU opens them inactive (no locks, no writes)
        // until the migration completes and the source has let go of them.
        hv.link_disks(spec).await?;
    } else {
        // Empty disks: the root an overlay on the same image, the others blank of the same
        // size.
        hv.define(spec).await?;
    }
    let result = async {
        // -S: the guest stays paused here after loading until `incoming_finish`, which the
        // source calls only once ownership has moved. Until then the source may always resume
        // its own copy: this one cannot have run.
        hv.launch(spec, &["-S", "-incoming", "defer"]).await?;
        if plan.postcopy {
            raw(
                hv,
                spec.id,
                RawCommand::MigrateSetCapabilities(json!({
                    "capabilities": [{ "capability": "postcopy-ram", "state": true }]
                })),
            )
            .await?;
        }
        if !spec.shared_disks {
            export_disks(hv, spec, plan).await?;
        }
        raw(
            hv,
            spec.id,
            RawCommand::MigrateIncoming(json!({
                "uri": format!("tcp:{}:{}", plan.host, plan.migration_port)
            })),
        )
        .await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = incoming_abort(hv, spec.id).await;
    }
    result
}

/// Serves the target's empty disks over NBD for the source's mirrors to write into.
async fn export_disks(
    hv: &QemuHypervisor,
    spec: &RuntimeSpec,
    plan: &IncomingPlan,
) -> Result<(), HvError> {
    raw(
        hv,
        spec.id,
        RawCommand::NbdServerStart(json!({
            "addr": { "type": "inet",
                      "data": { "host": plan.host, "port": plan.nbd_port.to_string() } }
        })),
    )
    .await?;
    for node in disk_nodes(spec.extra_disks_mib.len()) {
        raw(
            hv,
            spec.id,
            RawCommand::BlockExportAdd(json!({
                "type": "nbd", "id": mig(&node), "node-name": node, "name": node,
                "writable": true
            })),
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn incoming_finish(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    // The RAM and device state have arrived when QEMU leaves `inmigrate` (paused: -S; running
    // already in post-copy, which starts the guest here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match run_state(hv, id).await?.as_str() {
            "inmigrate" if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            "paused" | "prelaunch" | "postmigrate" => break,
            "running" => return stop_exports(hv, id).await,
            other => {
                return Err(HvError::Qmp {
                    command: "migrate-incoming",
                    message: format!("the incoming VM is '{other}', not ready to run"),
                });
            }
        }
    }
    stop_exports(hv, id).await?;
    raw(hv, id, RawCommand::Cont(none())).await?;
    Ok(())
}

/// The disks are complete here: nobody writes to them over NBD any more. With disks on a
/// shared pool no server was started, and QEMU says so.
async fn stop_exports(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    match raw(hv, id, RawCommand::NbdServerStop(none())).await {
        Ok(_) => Ok(()),
        Err(HvError::Qmp { message, .. }) if message.contains("not running") => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) async fn incoming_abort(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    match hv.force_stop(id).await {
        Ok(()) | Err(HvError::NotRunning(_)) => {}
        Err(e) => return Err(e),
    }
    hv.undefine(id).await
}

pub(super) async fn outgoing_mirror(
    hv: &QemuHypervisor,
    spec: &RuntimeSpec,
    plan: &IncomingPlan,
    tuning: &MigrationTuning,
) -> Result<(), HvError> {
    let id = spec.id;
    if spec.shared_disks {
        // The target opens the same files: nothing to copy.
        return Ok(());
    }
    let result = async {
        for node in disk_nodes(spec.extra_disks_mib.len()) {
            raw(
                hv,
                id,
                RawCommand::BlockdevAdd(json!({
                    "driver": "nbd", "node-name": mig(&node), "export": node,
                    "server": { "type": "inet", "host": plan.host,
                                "port": plan.nbd_port.to_string() }
                })),
            )
            .await?;
            // The disk's node now: a disk moved to another pool has a new one.
            let (device, _) = super::volumes::disk_node(hv, id, &node).await?;
            // The root disk is an overlay on an image both hosts have: only its own layer
            // moves. Other disks are copied whole.
            let mut args = json!({
                "job-id": mig(&node), "device": device, "target": mig(&node),
                "sync": if node == "root" { "top" } else { "full" }
            });
            if let Some(speed) = tuning.disk_bandwidth {
                args["speed"] = json!(speed);
            }
            raw(hv, id, RawCommand::BlockdevMirror(args)).await?;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = outgoing_cancel(hv, id).await;
    }
    result
}

pub(super) async fn outgoing_migrate(
    hv: &QemuHypervisor,
    id: VmId,
    plan: &IncomingPlan,
    tuning: &MigrationTuning,
) -> Result<(), HvError> {
    let caps = json!({ "capabilities": [
        // Stop before the device state goes, so the disk mirrors can be ended while the guest
        // is paused and its disks are quiet.
        { "capability": "pause-before-switchover", "state": true },
        // MIGRATION events, so the switch-over is handled the moment QEMU reaches it.
        { "capability": "events", "state": true },
        { "capability": "auto-converge", "state": tuning.auto_converge },
        { "capability": "postcopy-ram", "state": tuning.postcopy },
    ]});
    raw(hv, id, RawCommand::MigrateSetCapabilities(caps)).await?;
    let mut params = serde_json::Map::new();
    if let Some(b) = tuning.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(b));
    }
    if let Some(d) = tuning.downtime_limit_ms {
        params.insert("downtime-limit".into(), json!(d));
    }
    if !params.is_empty() {
        raw(
            hv,
            id,
            RawCommand::MigrateSetParameters(Value::Object(params)),
        )
        .await?;
    }
    raw(
        hv,
        id,
        RawCommand::Migrate(json!({
            "uri": format!("tcp:{}:{}", plan.host, plan.migration_port)
        })),
    )
    .await?;
    Ok(())
}

/// A block job as `query-block-jobs` shows it.
pub(super) struct BlockJob {
    pub id: String,
    pub len: u64,
    pub offset: u64,
    pub ready: bool,
    pub speed: u64,
}

/// The VM's block jobs (migration mirrors, volume moves).
pub(super) async fn block_jobs(hv: &QemuHypervisor, id: VmId) -> Result<Vec<BlockJob>, HvError> {
    let jobs = raw(hv, id, RawCommand::QueryBlockJobs(none())).await?;
    Ok(jobs
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|j| {
            Some(BlockJob {
                id: j["device"].as_str()?.to_string(),
                len: j["len"].as_u64().unwrap_or(0),
                offset: j["offset"].as_u64().unwrap_or(0),
                ready: j["ready"].as_bool().unwrap_or(false),
                speed: j["speed"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// The mirror jobs this migration started: `(job id, len, offset, ready)`.
async fn mirror_jobs(
    hv: &QemuHypervisor,
    id: VmId,
) -> Result<Vec<(String, u64, u64, bool)>, HvError> {
    Ok(block_jobs(hv, id)
        .await?
        .into_iter()
        .filter(|j| j.id.starts_with("mig-"))
        .map(|j| (j.id, j.len, j.offset, j.ready))
        .collect())
}

pub(super) async fn outgoing_status(
    hv: &QemuHypervisor,
    id: VmId,
) -> Result<MigrationStats, HvError> {
    let m = raw(hv, id, RawCommand::QueryMigrate(none())).await?;
    let jobs = mirror_jobs(hv, id).await?;
    let ram = &m["ram"];
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    Ok(MigrationStats {
        status: m["status"].as_str().unwrap_or("none").to_string(),
        ram_total_bytes: u(&ram["total"]),
        ram_transferred_bytes: u(&ram["transferred"]),
        ram_remaining_bytes: u(&ram["remaining"]),
        mbps: ram["mbps"].as_f64().unwrap_or(0.0),
        dirty_bytes_rate: u(&ram["dirty-pages-rate"]) * ram["page-size"].as_u64().unwrap_or(4096),
        expected_downtime_ms: m["expected-downtime"].as_u64(),
        downtime_ms: m["downtime"].as_u64(),
        total_time_ms: m["total-time"].as_u64(),
        disk_total_bytes: jobs.iter().map(|j| j.1).sum(),
        disk_remaining_bytes: jobs.iter().map(|j| j.1.saturating_sub(j.2)).sum(),
        disks_ready: !jobs.is_empty() && jobs.iter().all(|j| j.3),
        disk_jobs: jobs.len(),
        error: m["error-desc"].as_str().map(str::to_string),
    })
}

/// Cancels the mirror jobs and waits until they are gone. A ready mirror that is cancelled
/// leaves its target complete as of that moment.
async fn end_mirrors(hv: &QemuHypervisor, id: VmId, force: bool) -> Result<(), HvError> {
    // At the switch-over this runs while the guest is paused: every round trip is downtime. So
    // look once, cancel, and look again only when QEMU reports a job event.
    let mut seen = hv.job_events(id);
    for (job, ..) in mirror_jobs(hv, id).await? {
        raw(
            hv,
            id,
            RawCommand::BlockJobCancel(json!({ "device": job, "force": force })),
        )
        .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !mirror_jobs(hv, id).await?.is_empty() {
        if tokio::time::Instant::now() >= deadline {
            return Err(HvError::Timeout {
                what: "ending the disk mirrors",
                after: Duration::from_secs(30),
            });
        }
        seen = hv.outgoing_wait(id, seen, Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Removes the NBD client nodes (the mirror targets) this migration added.
async fn drop_targets(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    let nodes = raw(
        hv,
        id,
        RawCommand::QueryNamedBlockNodes(json!({ "flat": true })),
    )
    .await?;
    let ours: Vec<String> = nodes
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("mig-"))
        .map(str::to_string)
        .collect();
    for node in ours {
        raw(
            hv,
            id,
            RawCommand::BlockdevDel(json!({ "node-name": node })),
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn outgoing_switchover(
    hv: &QemuHypervisor,
    spec: &RuntimeSpec,
) -> Result<(), HvError> {
    let id = spec.id;
    if spec.shared_disks {
        // No mirrors; QEMU itself hands the disks over (the source lets go of them before
        // the target takes them).
        raw(
            hv,
            id,
            RawCommand::MigrateContinue(json!({ "state": "pre-switchover" })),
        )
        .await?;
        return Ok(());
    }
    // Every disk's mirror must still be there and caught up: a mirror that failed has vanished
    // (auto-dismissed), and cancelling one that is not ready aborts it. Either way the target's
    // disk would be incomplete, so refuse here, where the migration can still be cancelled.
    let jobs = mirror_jobs(hv, id).await?;
    for node in disk_nodes(spec.extra_disks_mib.len()) {
        match jobs.iter().find(|j| j.0 == mig(&node)) {
            Some(j) if j.3 => {}
            Some(_) => {
                return Err(HvError::WrongState {
                    op: "switching over",
                    state: "with a disk mirror not caught up",
                });
            }
            None => {
                return Err(HvError::Disk {
                    action: "mirror",
                    message: format!("the mirror of disk '{node}' ended early (an I/O error?)"),
                });
            }
        }
    }
    end_mirrors(hv, id, false).await?;
    raw(
        hv,
        id,
        RawCommand::MigrateContinue(json!({ "state": "pre-switchover" })),
    )
    .await?;
    Ok(())
}

pub(super) async fn outgoing_cancel(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    let status = raw(hv, id, RawCommand::QueryMigrate(none())).await?;
    match status["status"].as_str().unwrap_or("none") {
        "postcopy-active" | "postcopy-paused" | "postcopy-recover" => {
            return Err(HvError::WrongState {
                op: "cancelling the migration",
                state: "in post-copy (the target already runs the guest)",
            });
        }
        "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" => {
            raw(hv, id, RawCommand::MigrateCancel(none())).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let m = raw(hv, id, RawCommand::QueryMigrate(none())).await?;
                match m["status"].as_str().unwrap_or("none") {
                    "cancelled" | "failed" | "none" | "completed" => break,
                    _ if tokio::time::Instant::now() >= deadline => {
                        return Err(HvError::Timeout {
                            what: "cancelling the migration",
                            after: Duration::from_secs(30),
                        });
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        // Completed, failed, cancelled or never started: nothing to stop; QEMU resumes a guest
        // that ran before a failed or cancelled migration by itself.
        _ => {}
    }
    // The mirrors and their NBD nodes go in every case, or the next migration of this VM
    // would find their names taken.
    end_mirrors(hv, id, true).await?;
    drop_targets(hv, id).await
}

pub(super) async fn outgoing_complete(hv: &QemuHypervisor, id: VmId) -> Result<(), HvError> {
    let m = raw(hv, id, RawCommand::QueryMigrate(none())).await?;
    if m["status"].as_str() != Some("completed") {
        return Err(HvError::WrongState {
            op: "completing the migration",
            state: "not completed",
        });
    }
    end_mirrors(hv, id, true).await?;
    drop_targets(hv, id).await
}
