//! Live migration between two QEMU drivers (two "hosts": separate VM roots, loopback ports) with
//! the real demo guest: disks mirrored over NBD, RAM over TCP, the guest's tick counter going on
//! on the target without a reboot, the disk's data there; and a cancelled migration that leaves
//! the guest running on the source and nothing on the target.

mod common;

use std::time::{Duration, Instant};

use common::*;
use novacron_hypervisor::qemu::QemuHypervisor;
use novacron_hypervisor::{Hypervisor, IncomingPlan, MigrationStats, MigrationTuning};
use novacron_types::{VmId, VmState};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn plan() -> IncomingPlan {
    IncomingPlan {
        host: "127.0.0.1".into(),
        migration_port: free_port(),
        nbd_port: free_port(),
        postcopy: false,
    }
}

/// The highest `tick N` on the console.
fn last_tick(hv: &dyn Hypervisor, id: VmId) -> u64 {
    let text = String::from_utf8_lossy(&std::fs::read(hv.console_path(id)).unwrap_or_default())
        .into_owned();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Polls the source's migration status until `pred` holds; fails on `failed`.
async fn wait_status(
    hv: &QemuHypervisor,
    id: VmId,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&MigrationStats) -> bool,
) -> MigrationStats {
    let deadline = Instant::now() + timeout;
    loop {
        let s = hv.outgoing_status(id).await.expect("migration status");
        if pred(&s) {
            return s;
        }
        assert!(s.status != "failed", "migration failed: {s:?}");
        assert!(
            Instant::now() < deadline,
            "no {what} after {timeout:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn qemu_io(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "qemu-io {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_with_its_disks_and_keeps_ticking() {
    let (root_a, root_b) = (VmRoot::new(), VmRoot::new());
    let (a, b) = (qemu(root_a.path()).await, qemu(root_b.path()).await);
    let spec = demo_spec();
    let id = spec.id;

    // Data on the extra disk before the guest starts: it must be on the target afterwards.
    a.define(&spec).await.expect("define");
    let disk_a = root_a.path().join(id.to_string()).join("disk1.qcow2");
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0xa7 1M 2M",
        disk_a.to_str().expect("path"),
    ]);
    a.start(&spec).await.expect("start");
    wait_console(&a, id, "tick 2", Duration::from_secs(60)).await;

    let plan = plan();
    let tuning = MigrationTuning {
        max_bandwidth: Some(1 << 30),
        downtime_limit_ms: Some(100),
        ..Default::default()
    };
    b.incoming_start(&spec, &plan).await.expect("incoming");
    assert_eq!(
        b.observe(id).await,
        VmState::Starting,
        "waiting for the RAM"
    );
    a.outgoing_mirror(&spec, &plan, &tuning)
        .await
        .expect("mirror");
    let s = wait_status(&a, id, "ready mirrors", Duration::from_secs(60), |s| {
        s.disks_ready
    })
    .await;
    assert!(s.disk_total_bytes > 0, "{s:?}");
    a.outgoing_migrate(id, &plan, &tuning)
        .await
        .expect("migrate");
    let s = wait_status(&a, id, "pre-switchover", Duration::from_secs(60), |s| {
        s.status == "pre-switchover"
    })
    .await;
    assert!(s.ram_total_bytes >= 128 << 20, "{s:?}");
    let before = last_tick(&a, id);
    a.outgoing_switchover(&spec).await.expect("switchover");
    let s = wait_status(&a, id, "completion", Duration::from_secs(30), |s| {
        s.status == "completed"
    })
    .await;
    b.incoming_finish(id).await.expect("finish incoming");
    a.outgoing_complete(id).await.expect("complete");
    a.force_stop(id).await.expect("stop the source");
    println!(
        "migrated: total {:?} ms, downtime {:?} ms, {} bytes of RAM",
        s.total_time_ms, s.downtime_ms, s.ram_transferred_bytes
    );

    // The guest goes on where it was: later ticks on the target, no second boot.
    assert_eq!(b.observe(id).await, VmState::Running);
    let want = format!("tick {}", before + 3);
    let text = wait_console(&b, id, &want, Duration::from_secs(30)).await;
    assert!(
        !text.contains("READY"),
        "the guest rebooted on the target:\n{text}"
    );
    assert!(last_tick(&b, id) > before);
    // The disk data came along (read while the target's QEMU holds the image).
    let disk_b = root_b.path().join(id.to_string()).join("disk1.qcow2");
    let out = qemu_io(&[
        "-U",
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0xa7 1M 2M",
        disk_b.to_str().expect("path"),
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    b.force_stop(id).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_leaves_the_guest_on_the_source() {
    let (root_a, root_b) = (VmRoot::new(), VmRoot::new());
    let (a, b) = (qemu(root_a.path()).await, qemu(root_b.path()).await);
    let spec = demo_spec();
    let id = spec.id;
    boot_demo(&a, &spec).await;

    let plan = plan();
    // 1 MiB/s: 128 MiB of RAM would take minutes, so the cancel lands mid-copy.
    let tuning = MigrationTuning {
        max_bandwidth: Some(1 << 20),
        ..Default::default()
    };
    b.incoming_start(&spec, &plan).await.expect("incoming");
    a.outgoing_mirror(&spec, &plan, &tuning)
        .await
        .expect("mirror");
    wait_status(&a, id, "ready mirrors", Duration::from_secs(60), |s| {
        s.disks_ready
    })
    .await;
    a.outgoing_migrate(id, &plan, &tuning)
        .await
        .expect("migrate");
    wait_status(&a, id, "RAM moving", Duration::from_secs(30), |s| {
        s.status == "active" && s.ram_transferred_bytes > 0
    })
    .await;
    a.outgoing_cancel(id).await.expect("cancel");
    b.incoming_abort(id).await.expect("abort incoming");

    let s = a.outgoing_status(id).await.expect("status");
    assert_eq!(s.status, "cancelled", "{s:?}");
    assert!(
        !s.disks_ready && s.disk_total_bytes == 0,
        "mirrors gone: {s:?}"
    );
    assert_eq!(a.observe(id).await, VmState::Running);
    let before = last_tick(&a, id);
    wait_console(
        &a,
        id,
        &format!("tick {}", before + 2),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !root_b.path().join(id.to_string()).exists(),
        "the target's files are gone"
    );
    assert_eq!(b.observe(id).await, VmState::Stopped);
    a.force_stop(id).await.expect("stop");
}
