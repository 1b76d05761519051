//! Volumes on a running VM: hot-plug into a free PCIe root port, unplug (the guest releases the
//! device through ACPI), grow, snapshot, and move to another file while the guest writes.
//!
//! A move is QEMU's `blockdev-mirror` (sync `full`, or `top` for a boot disk, whose target
//! overlays the same image; with its `speed` limit) from the disk's
//! current node into a new node on the target file; once the job is ready (caught up, writes
//! mirrored), `block-job-complete` switches the guest's device to the new node between two
//! requests, so the guest sees nothing. The old node is then closed, and the caller may delete
//! the old file.
//!
//! The mirror copies with a 256 KiB buffer (`buf-size`): with QEMU 7.2's default of 1 MiB, a
//! running guest's mirror ignored its `speed` (16 MiB capped at 1 MB/s was ready in 1.5 s; with
//! 256 KiB, in 17 s). A `throttle` filter on the target was tried too: it held the rate but
//! blocked QEMU's monitor for the whole copy.
//!
//! Disks are named as `query-blockstats` reports them: `root`, `disk1`, ..., `vol-<volume id>`;
//! the guest device of disk `d` has the ID `d-dev`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use novacron_types::{VmId, VolumeFormat, VolumeId};

use super::QemuHypervisor;
use super::migration::raw;
use super::qmp_raw::{RawCommand, none};
use crate::{AttachedVolume, HvError, MirrorStatus, VOLUME_SLOTS, disks};

/// The mirror's copy buffer (see the module doc).
const MIRROR_BUFFER: u64 = 256 * 1024;

/// How long the guest has to release an unplugged disk.
const UNPLUG_WAIT: Duration = Duration::from_secs(20);

fn qmp_err(command: &'static str, e: HvError) -> HvError {
    match e {
        HvError::Qmp { message, .. } => HvError::Qmp { command, message },
        other => other,
    }
}

/// The guest device's entry of `query-block`, if the disk is there.
async fn block_entry(hv: &QemuHypervisor, id: VmId, disk: &str) -> Result<Option<Value>, HvError> {
    let qdev = format!("{disk}-dev");
    let blocks = raw(hv, id, RawCommand::QueryBlock(none())).await?;
    Ok(blocks
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .find(|b| {
            b["qdev"]
                .as_str()
                .is_some_and(|q| q == qdev || q.split('/').any(|p| p == qdev))
        })
        .cloned())
}

/// The block node the guest's disk `disk` reads and writes now.
pub(super) async fn disk_node(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
) -> Result<(String, u64), HvError> {
    let entry = block_entry(hv, id, disk)
        .await?
        .ok_or_else(|| HvError::Missing(format!("VM {id} has no disk '{disk}'")))?;
    let node = entry["inserted"]["node-name"]
        .as_str()
        .ok_or_else(|| HvError::Missing(format!("disk '{disk}' of VM {id} has no medium")))?;
    let size = entry["inserted"]["image"]["virtual-size"]
        .as_u64()
        .unwrap_or(0);
    Ok((node.to_string(), size))
}

/// The file a running VM's disk uses now (while a mirror runs, QEMU shows a filter over both
/// files; callers check for a running mirror first).
pub(super) async fn disk_file(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
) -> Result<Option<std::path::PathBuf>, HvError> {
    Ok(block_entry(hv, id, disk)
        .await?
        .and_then(|e| e["inserted"]["file"].as_str().map(std::path::PathBuf::from)))
}

fn job_id(disk: &str) -> String {
    format!("move-{disk}")
}

/// The node a move of `disk` writes into: alternates between two names, so the next move's
/// target never clashes with the node the last one left in use.
fn target_node(disk: &str, current: &str) -> String {
    let base = match disk.strip_prefix("vol-") {
        Some(rest) => format!("t{}", &rest.replace('-', "")[..12]),
        None => format!("t-{disk}"),
    };
    if current == format!("{base}a") {
        format!("{base}b")
    } else {
        format!("{base}a")
    }
}

fn file_node(node: &str, path: &Path, format: VolumeFormat) -> Value {
    json!({
        "driver": format.as_str(),
        "node-name": node,
        "file": { "driver": "file", "filename": path.display().to_string() },
        "cache": { "direct": false },
    })
}

pub(super) async fn attach(
    hv: &QemuHypervisor,
    id: VmId,
    vol: &AttachedVolume,
) -> Result<(), HvError> {
    let node = AttachedVolume::node_name(vol.id);
    let device = AttachedVolume::device_id(vol.id);
    raw(
        hv,
        id,
        RawCommand::BlockdevAdd(file_node(&node, &vol.path, vol.format)),
    )
    .await
    .map_err(|e| qmp_err("blockdev-add", e))?;
    let mut last = None;
    for slot in 1..=VOLUME_SLOTS {
        let add = raw(
            hv,
            id,
            RawCommand::DeviceAdd(json!({
                "driver": "virtio-blk-pci",
                "drive": node,
                "id": device,
                "bus": format!("hp{slot}"),
            })),
        )
        .await;
        match add {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let _ = raw(
        hv,
        id,
        RawCommand::BlockdevDel(json!({ "node-name": node })),
    )
    .await;
    Err(HvError::Unsupported(format!(
        "no free hot-plug slot for the volume (a VM has {VOLUME_SLOTS}): {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

pub(super) async fn detach(hv: &QemuHypervisor, id: VmId, vol: VolumeId) -> Result<(), HvError> {
    let disk = format!("vol-{vol}");
    let node = match disk_node(hv, id, &disk).await {
        Ok((node, _)) => node,
        // Not plugged (a VM started before it was attached, or unplugged by a try that timed
        // out): close its node if it is still open.
        Err(HvError::Missing(_)) => {
            let _ = raw(
                hv,
                id,
                RawCommand::BlockdevDel(json!({ "node-name": AttachedVolume::node_name(vol) })),
            )
            .await;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    raw(
        hv,
        id,
        RawCommand::DeviceDel(json!({ "id": AttachedVolume::device_id(vol) })),
    )
    .await
    .map_err(|e| qmp_err("device_del", e))?;
    let deadline = tokio::time::Instant::now() + UNPLUG_WAIT;
    while block_entry(hv, id, &disk).await?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            return Err(HvError::Timeout {
                what: "the guest releasing the unplugged disk (does it handle ACPI hot-plug?)",
                after: UNPLUG_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    raw(
        hv,
        id,
        RawCommand::BlockdevDel(json!({ "node-name": node })),
    )
    .await
    .map_err(|e| qmp_err("blockdev-del", e))
    .map(drop)
}

pub(super) async fn resize(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
    size: u64,
) -> Result<(), HvError> {
    let (node, _) = disk_node(hv, id, disk).await?;
    raw(
        hv,
        id,
        RawCommand::BlockResize(json!({ "node-name": node, "size": size })),
    )
    .await
    .map_err(|e| qmp_err("block_resize", e))
    .map(drop)
}

pub(super) async fn snapshot(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
    name: &str,
) -> Result<(), HvError> {
    let (node, _) = disk_node(hv, id, disk).await?;
    raw(
        hv,
        id,
        RawCommand::BlockdevSnapshotInternalSync(json!({ "device": node, "name": name })),
    )
    .await
    .map_err(|e| qmp_err("blockdev-snapshot-internal-sync", e))
    .map(drop)
}

pub(super) async fn mirror_start(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
    target: &Path,
    format: VolumeFormat,
    backing: Option<&crate::Backing>,
    speed: u64,
) -> Result<(), HvError> {
    let (node, size) = disk_node(hv, id, disk).await?;
    let tnode = target_node(disk, &node);
    // A boot disk's target overlays the image (QEMU opens that backing with it), and only
    // the disk's own layer is copied.
    disks::create_copy_target(target, format, backing, size).await?;
    let cleanup = || async {
        let _ = std::fs::remove_file(target);
    };
    if let Err(e) = raw(
        hv,
        id,
        RawCommand::BlockdevAdd(file_node(&tnode, target, format)),
    )
    .await
    {
        cleanup().await;
        return Err(qmp_err("blockdev-add", e));
    }
    if let Err(e) = raw(
        hv,
        id,
        RawCommand::BlockdevMirror(json!({
            "job-id": job_id(disk),
            "device": node,
            "target": tnode,
            "sync": if backing.is_some() { "top" } else { "full" },
            "speed": speed,
            "buf-size": MIRROR_BUFFER,
        })),
    )
    .await
    {
        let _ = raw(
            hv,
            id,
            RawCommand::BlockdevDel(json!({ "node-name": tnode })),
        )
        .await;
        cleanup().await;
        return Err(qmp_err("blockdev-mirror", e));
    }
    Ok(())
}

pub(super) async fn mirror_status(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
) -> Result<Option<MirrorStatus>, HvError> {
    let job = job_id(disk);
    Ok(super::migration::block_jobs(hv, id)
        .await?
        .into_iter()
        .find(|j| j.id == job)
        .map(|j| MirrorStatus {
            len: j.len,
            offset: j.offset,
            ready: j.ready,
            speed: j.speed,
        }))
}

pub(super) async fn mirror_speed(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
    speed: u64,
) -> Result<(), HvError> {
    raw(
        hv,
        id,
        RawCommand::BlockJobSetSpeed(json!({ "device": job_id(disk), "speed": speed })),
    )
    .await
    .map_err(|e| qmp_err("block-job-set-speed", e))
    .map(drop)
}

async fn wait_job_gone(hv: &QemuHypervisor, id: VmId, disk: &str) -> Result<(), HvError> {
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    while mirror_status(hv, id, disk).await?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            return Err(HvError::Timeout {
                what: "the disk copy ending",
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub(super) async fn mirror_finish(
    hv: &QemuHypervisor,
    id: VmId,
    disk: &str,
) -> Result<(), HvError> {
    let (old, _) = disk_node(hv, id, disk).await?;
    raw(
        hv,
        id,
        RawCommand::BlockJobComplete(json!({ "device": job_id(disk) })),
    )
    .await
    .map_err(|e| qmp_err("block-job-complete", e))?;
    wait_job_gone(hv, id, disk).await?;
    let (now, _) = disk_node(hv, id, disk).await?;
    if now == old {
        return Err(HvError::Qmp {
            command: "block-job-complete",
            message: format!("disk '{disk}' did not switch to its copy (the copy failed)"),
        });
    }
    raw(hv, id, RawCommand::BlockdevDel(json!({ "node-name": old })))
        .await
        .map_err(|e| qmp_err("blockdev-del", e))
        .map(drop)
}

pub(super) async fn mirror_abort(hv: &QemuHypervisor, id: VmId, disk: &str) -> Result<(), HvError> {
    if mirror_status(hv, id, disk).await?.is_some() {
        raw(
            hv,
            id,
            RawCommand::BlockJobCancel(json!({ "device": job_id(disk), "force": true })),
        )
        .await
        .map_err(|e| qmp_err("block-job-cancel", e))?;
        wait_job_gone(hv, id, disk).await?;
    }
    let (current, _) = disk_node(hv, id, disk).await?;
    for cand in [
        target_node(disk, ""),
        target_node(disk, &target_node(disk, "")),
    ] {
        if cand != current {
            // Absent unless this move added it.
            let _ = raw(
                hv,
                id,
                RawCommand::BlockdevDel(json!({ "node-name": cand })),
            )
            .await;
        }
    }
    Ok(())
}

/// Sum of every disk's I/O time (ns) and operations.
pub(super) async fn io_latency(hv: &QemuHypervisor, id: VmId) -> Result<(u64, u64), HvError> {
    let stats = raw(hv, id, RawCommand::QueryBlockstats(none())).await?;
    let mut ns = 0;
    let mut ops = 0;
    for e in stats.as_array().map(|a| a.as_slice()).unwrap_or_default() {
        if e["qdev"].as_str().is_none() {
            continue;
        }
        let st = &e["stats"];
        for k in [
            "rd_total_time_ns",
            "wr_total_time_ns",
            "flush_total_time_ns",
        ] {
            ns += st[k].as_u64().unwrap_or(0);
        }
        for k in ["rd_operations", "wr_operations", "flush_operations"] {
            ops += st[k].as_u64().unwrap_or(0);
        }
    }
    Ok((ns, ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_never_writes_into_the_node_in_use() {
        let v = "vol-0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        let first = target_node(v, "v0a1b2c3d4e5f");
        assert_eq!(first, "t0a1b2c3d4e5fa");
        let second = target_node(v, &first);
        assert_eq!(second, "t0a1b2c3d4e5fb");
        assert_eq!(target_node(v, &second), first);
        assert!(first.len() <= 31);
        assert_eq!(target_node("root", "root"), "t-roota");
    }
}
