//! Live migration on a real cluster (two full hosts and a witness) with the demo guest: the VM moves with its disks and
//! keeps ticking without a reboot, ownership switches once, the source's copy goes; a cancel
//! mid-copy and a target killed mid-copy both leave the guest running where it was, with no
//! leftovers on the target; pre-flight refusals carry a reason; a VM whose disks were moved
//! into a local pool migrates live and cold into the target's directory of that pool.

mod common;

use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::{console_text, demo_vm, wait_console, wait_state};
use novacron_client::{Client, ClientError};
use novacron_types::{
    CreateVmRequest, MigrateVmRequest, NodeId, Operation, OperationStatus, VmState,
};

/// The highest `tick N` in a console text.
fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits for the operation to finish; rides out an election (503) on the way.
async fn wait_op(c: &Client, op: &Operation, timeout: Duration) -> Operation {
    let deadline = Instant::now() + timeout;
    loop {
        match c.wait_operation(&op.id.to_string(), 5).await {
            Ok(now) if now.status.is_final() => return now,
            Ok(_) => {}
            Err(e) if e.status() == Some(503) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("waiting for {}: {e}", op.id),
        }
        assert!(
            Instant::now() < deadline,
            "operation {} still running",
            op.id
        );
    }
}

/// Polls the operation until its migration reaches `phase`.
async fn wait_phase(c: &Client, op: &Operation, phase: &str) -> Operation {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = c.get_operation(&op.id.to_string()).await.expect("op");
        if now.migration.as_ref().is_some_and(|m| m.phase == phase) {
            return now;
        }
        assert!(!now.status.is_final(), "ended before '{phase}': {now:?}");
        assert!(
            Instant::now() < deadline,
            "never reached '{phase}': {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the VM's console shows ticks beyond `after + 1`: the counter kept going.
async fn wait_ticks_past(c: &Client, vm: &str, after: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = console_text(c, vm).await;
        if last_tick(&text) > after + 1 {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no tick past {} on {vm}'s console:\n{text}",
            after + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A migration capped at 1 MiB/s (the RAM would take minutes), once it copies memory.
async fn slow_migration(c: &Client, vm: &str) -> Operation {
    let op = c
        .migrate_vm(
            vm,
            &MigrateVmRequest {
                max_bandwidth_mib: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("migrate");
    wait_phase(c, &op, "copying memory").await;
    op
}

fn reason(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Api { error, .. } => error.reason.clone(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_between_hosts_and_back_out_of_failures() {
    // A witness keeps the quorum when host 1 is killed below.
    let mut cluster = TestCluster::start(&["full", "full", "witness"], &[]).await;
    let c = cluster.admin(1).await;
    let vm = c
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(1)),
            disks: vec![novacron_types::DiskRequest { size_mib: 16 }],
            ..demo_vm("mover")
        })
        .await
        .expect("create");
    // Data on its extra disk, to find on every host it moves to.
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x3d 2M 3M",
        &disk1(&cluster.nodes[0], &vm.id.to_string()),
    ]);
    let op = c.vm_action("mover", "start").await.expect("start");
    assert_eq!(
        wait_op(&c, &op, Duration::from_secs(60)).await.status,
        OperationStatus::Success
    );
    wait_console(&c, "mover", "tick 2", 1, Duration::from_secs(60)).await;

    // Pre-flight refusals, before anything moves.
    let e = c
        .migrate_vm(
            "mover",
            &MigrateVmRequest {
                target: Some(NodeId(1)),
                ..Default::default()
            },
        )
        .await
        .expect_err("same host");
    assert_eq!(reason(&e).as_deref(), Some("same_host"), "{e}");
    let e = c
        .migrate_vm(
            "mover",
            &MigrateVmRequest {
                max_bandwidth_mib: Some(0),
                ..Default::default()
            },
        )
        .await
        .expect_err("zero bandwidth");
    assert_eq!(e.status(), Some(400), "{e}");

    // A console follower through the witness (which runs no VMs): it streams from the VM's
    // host and follows the VM when it moves.
    let cli = common::Cli {
        server: cluster.nodes[2].url.clone(),
        config: cluster.nodes[2].dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(common::ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_novacron"))
        .args(["vm", "console", "mover", "--follow"])
        .env("NOVACRON_SERVER", &cli.server)
        .env("NOVACRON_CONFIG", &cli.config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("console follower");
    let follower_err = follower.stderr.take().expect("stderr");
    let notices = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = std::io::BufReader::new(follower_err).read_to_string(&mut s);
        s
    });
    let followed = common::stdout_lines(&mut follower);

    // 1. Live migration (asked through host 2, which forwards to the VM's host).
    let before = last_tick(&console_text(&c, "mover").await);
    let op = c
        .migrate_vm("mover", &MigrateVmRequest::default())
        .await
        .expect("migrate");
    let done = wait_op(&c, &op, Duration::from_secs(120)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
    let m = done.migration.clone().expect("migration figures");
    assert_eq!(
        (m.source, m.target, m.phase.as_str()),
        (NodeId(1), NodeId(2), "completed")
    );
    assert!(m.downtime_ms.is_some() && m.ram_total_bytes > 0, "{m:?}");
    println!("migration: {m:?}");
    let moved = c.get_vm("mover").await.expect("vm");
    assert_eq!(moved.node, NodeId(2));
    assert_eq!(moved.state, VmState::Running);
    // The guest goes on: later ticks on host 2's console, and no second boot.
    let text = wait_ticks_past(&c, "mover", before + 1).await;
    assert!(!text.contains("READY"), "rebooted on the target:\n{text}");
    // The follower went on with the VM on host 2: ticks past the migration reach it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while last_tick(&seen.join("\n")) <= before + 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        match followed.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = follower.kill();
                let _ = follower.wait();
                panic!(
                    "the console follower stopped at:\n{}\nits errors: {}",
                    seen.join("\n"),
                    notices.join().unwrap_or_default()
                );
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let notices = notices.join().expect("stderr reader");
    assert!(notices.contains("moved to host 2"), "{notices}");
    let id = vm.id.to_string();
    assert!(
        !cluster.nodes[0].data_dir().join("vms").join(&id).exists(),
        "the source's copy is gone"
    );
    assert!(
        cluster.nodes[0].qemu_pids().is_empty(),
        "no QEMU left on host 1"
    );
    assert_eq!(cluster.nodes[1].qemu_pids().len(), 1);
    // The disk's data came along (read beside the running QEMU).
    assert_data(true, "read -P 0x3d 2M 3M", &disk1(&cluster.nodes[1], &id));

    // 2. Cancel mid-copy (1 MiB/s: the RAM would take minutes): the guest stays on host 2.
    let op = slow_migration(&c, "mover").await;
    assert_eq!(
        c.get_vm("mover").await.expect("vm").migrating_to,
        Some(NodeId(1)),
        "the target's room is held while the VM moves"
    );
    c.cancel_operation(&op.id.to_string())
        .await
        .expect("cancel");
    let done = wait_op(&c, &op, Duration::from_secs(60)).await;
    assert_eq!(done.status, OperationStatus::Failure, "{done:?}");
    assert_eq!(
        done.error.as_ref().and_then(|e| e.reason.as_deref()),
        Some("cancelled")
    );
    assert_eq!(
        done.migration.as_ref().map(|m| m.phase.as_str()),
        Some("cancelled")
    );
    let vm_now = c.get_vm("mover").await.expect("vm");
    assert_eq!((vm_now.node, vm_now.state), (NodeId(2), VmState::Running));
    assert_eq!(
        vm_now.migrating_to, None,
        "the hold on the target is released"
    );
    let t = last_tick(&console_text(&c, "mover").await);
    wait_ticks_past(&c, "mover", t).await;
    assert!(
        !cluster.nodes[0].data_dir().join("vms").join(&id).exists(),
        "the target's copy is gone after the cancel"
    );
    assert!(cluster.nodes[0].qemu_pids().is_empty());
    // A finished operation cannot be cancelled.
    let e = c
        .cancel_operation(&op.id.to_string())
        .await
        .expect_err("already over");
    assert_eq!(e.status(), Some(409), "{e}");

    // 3. The target dies mid-copy (novacron and its QEMUs): the guest keeps running on host 2.
    let op = slow_migration(&c, "mover").await;
    let doomed = cluster.nodes[0].qemu_pids();
    assert_eq!(doomed.len(), 1, "the incoming QEMU waits on host 1");
    cluster.nodes[0].kill();
    for pid in doomed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let done = wait_op(&c, &op, Duration::from_secs(120)).await;
    assert_eq!(done.status, OperationStatus::Failure, "{done:?}");
    let vm_now = wait_state(&c, "mover", VmState::Running, Duration::from_secs(10)).await;
    assert_eq!(vm_now.node, NodeId(2));
    let t = last_tick(&console_text(&c, "mover").await);
    wait_ticks_past(&c, "mover", t).await;
    let op = c.vm_action("mover", "force-stop").await.expect("stop");
    wait_op(&c, &op, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_dirtying_memory_faster_than_the_cap_finishes_by_post_copy() {
    let cluster = TestCluster::start(&["full", "full"], &[]).await;
    let c = cluster.admin(0).await;
    // The demo guest rewrites 16 MiB of random data in a loop (`novacron.dirty`).
    c.create_vm(&CreateVmRequest {
        node: Some(NodeId(1)),
        ..common::demo_vm_with("dirty", "novacron.dirty=16")
    })
    .await
    .expect("create");
    let op = c.vm_action("dirty", "start").await.expect("start");
    assert_eq!(
        wait_op(&c, &op, Duration::from_secs(60)).await.status,
        OperationStatus::Success
    );
    wait_console(&c, "dirty", "dirtying 16 MiB", 1, Duration::from_secs(60)).await;
    wait_console(&c, "dirty", "tick 2", 1, Duration::from_secs(60)).await;
    let before = last_tick(&console_text(&c, "dirty").await);

    // 8 MiB/s cannot keep up with the guest: after 3 s the migration switches to post-copy.
    let op = c
        .migrate_vm(
            "dirty",
            &MigrateVmRequest {
                max_bandwidth_mib: Some(8),
                auto_converge: Some(false),
                timeout_seconds: Some(3),
                on_timeout: Some(novacron_types::MigrationTimeoutAction::Postcopy),
                ..Default::default()
            },
        )
        .await
        .expect("migrate");
    let mid = wait_phase(&c, &op, "copying memory").await;
    let done = wait_op(&c, &op, Duration::from_secs(120)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
    let m = done.migration.expect("figures");
    println!("dirty guest: {m:?} (mid-way: {:?})", mid.migration);
    assert!(
        m.elapsed_ms >= 3000,
        "it should have needed the post-copy switch: {m:?}"
    );
    let vm = c.get_vm("dirty").await.expect("vm");
    assert_eq!((vm.node, vm.state), (NodeId(2), VmState::Running));
    let text = wait_ticks_past(&c, "dirty", before).await;
    assert!(!text.contains("READY"), "rebooted:\n{text}");
    let op = c.vm_action("dirty", "force-stop").await.expect("stop");
    wait_op(&c, &op, Duration::from_secs(30)).await;
}

fn qemu_io(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "qemu-io {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads the data back with `qemu-io` (`beside_qemu`: while a QEMU holds the image) and fails
/// unless it matches the pattern.
fn assert_data(beside_qemu: bool, read: &str, file: &str) {
    let mut args = vec!["-r", "-f", "qcow2", "-c", read, file];
    if beside_qemu {
        args.insert(0, "-U");
    }
    let out = qemu_io(&args);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// The file of a VM's first extra disk on a host.
fn disk1(node: &common::Node, vm: &str) -> String {
    node.data_dir()
        .join("vms")
        .join(vm)
        .join("disk1.qcow2")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuating_a_host_moves_running_vms_live_and_stopped_ones_cold() {
    let cluster = TestCluster::start(&["full", "full", "full"], &[]).await;
    let c = cluster.admin(1).await;
    let on_1 = |name: &str| CreateVmRequest {
        node: Some(NodeId(1)),
        disks: vec![novacron_types::DiskRequest { size_mib: 8 }],
        ..demo_vm(name)
    };
    let mut ids = std::collections::BTreeMap::new();
    for name in ["ev-a", "ev-b", "ev-c"] {
        let vm = c.create_vm(&on_1(name)).await.expect("create");
        ids.insert(name, vm.id.to_string());
    }
    // Data on the stopped VM's disk, to find on its new host.
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5c 0 1M",
        &disk1(&cluster.nodes[0], &ids["ev-c"]),
    ]);
    for name in ["ev-a", "ev-b"] {
        let op = c.vm_action(name, "start").await.expect("start");
        assert_eq!(
            wait_op(&c, &op, Duration::from_secs(60)).await.status,
            OperationStatus::Success
        );
    }
    for name in ["ev-a", "ev-b"] {
        wait_console(&c, name, "tick 1", 1, Duration::from_secs(60)).await;
    }
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for name in ["ev-a", "ev-b"] {
            v.push(last_tick(&console_text(&c, name).await));
        }
        v
    };

    // The CLI, through host 2 (host 1 carries the evacuation).
    let cli = common::Cli {
        server: cluster.nodes[1].url.clone(),
        config: cluster.nodes[1].dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(common::ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli.run(&["node", "evacuate", "1", "--timeout", "300"], None);
    assert_eq!(code, 0, "evacuate failed: {err}");
    assert!(err.contains("host 1 is empty and in maintenance"), "{err}");

    for name in ["ev-a", "ev-b", "ev-c"] {
        let vm = c.get_vm(name).await.expect("vm");
        assert_ne!(vm.node, NodeId(1), "{name} is still on host 1");
    }
    for (name, t) in ["ev-a", "ev-b"].iter().zip(before) {
        assert_eq!(c.get_vm(name).await.expect("vm").state, VmState::Running);
        let text = wait_ticks_past(&c, name, t).await;
        assert!(!text.contains("READY"), "{name} rebooted:\n{text}");
    }
    let ev_c = c.get_vm("ev-c").await.expect("vm");
    assert_eq!(ev_c.state, VmState::Stopped);
    let there = &cluster.nodes[ev_c.node.0 as usize - 1];
    assert_data(false, "read -P 0x5c 0 1M", &disk1(there, &ids["ev-c"]));
    assert!(
        cluster.nodes[0].qemu_pids().is_empty(),
        "QEMUs left on host 1"
    );
    for id in ids.values() {
        assert!(
            !cluster.nodes[0].data_dir().join("vms").join(id).exists(),
            "files of {id} left on host 1"
        );
    }
    // In maintenance: not a leader, and placement keeps new VMs away.
    let s: serde_json::Value = c.get("/api/v1/cluster").await.expect("status");
    assert_ne!(s["leader"]["id"], 1, "{s}");
    let e = c
        .create_vm(&on_1("not-now"))
        .await
        .expect_err("maintenance");
    assert_eq!(reason(&e).as_deref(), Some("maintenance"), "{e}");

    // Restored, it takes VMs again: the stopped one moves back cold, data and all.
    let out = cli.ok(&["node", "restore", "1"]);
    let _ = out;
    let op = c
        .migrate_vm(
            "ev-c",
            &MigrateVmRequest {
                target: Some(NodeId(1)),
                disk_bandwidth_mib: Some(64),
                ..Default::default()
            },
        )
        .await
        .expect("cold back");
    let done = wait_op(&c, &op, Duration::from_secs(60)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
    assert_eq!(c.get_vm("ev-c").await.expect("vm").node, NodeId(1));
    assert_data(
        false,
        "read -P 0x5c 0 1M",
        &disk1(&cluster.nodes[0], &ids["ev-c"]),
    );
    for name in ["ev-a", "ev-b"] {
        let op = c.vm_action(name, "force-stop").await.expect("stop");
        wait_op(&c, &op, Duration::from_secs(30)).await;
    }
}

/// Migrates `vm` to host `to` (live or cold, as it is) and waits for success.
async fn migrate_to(c: &Client, vm: &str, to: u64) {
    let op = c
        .migrate_vm(
            vm,
            &MigrateVmRequest {
                target: Some(NodeId(to)),
                ..Default::default()
            },
        )
        .await
        .expect("migrate");
    let done = wait_op(c, &op, Duration::from_secs(120)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
}

/// Moves `volume` to `pool` and waits for the move.
async fn move_volume(c: &Client, volume: &str, pool: &str) {
    let op = c
        .move_volume(
            volume,
            &novacron_types::MoveVolumeRequest {
                pool: pool.into(),
                rate_mb: None,
            },
        )
        .await
        .expect("move");
    let done = wait_op(c, &op, Duration::from_secs(60)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_disks_moved_to_a_pool_migrates_live_and_cold_with_them() {
    let cluster = TestCluster::start(&["full", "full"], &[]).await;
    let c = cluster.admin(1).await;
    let pools = tempfile::tempdir().expect("tmp");
    c.create_pool(&novacron_types::CreatePoolRequest {
        name: "fast".into(),
        path: pools.path().join("fast").display().to_string(),
        tier: novacron_types::PoolTier::Hot,
        shared: false,
        capacity_bytes: 1 << 30,
        cost_per_gib_month: 0.2,
        performance_class: None,
    })
    .await
    .expect("pool");
    let vm = c
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(1)),
            disks: vec![novacron_types::DiskRequest { size_mib: 8 }],
            ..demo_vm("mover")
        })
        .await
        .expect("create");
    let id = vm.id.to_string();
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5c 0 1M",
        &disk1(&cluster.nodes[0], &id),
    ]);
    let op = c.vm_action("mover", "start").await.expect("start");
    wait_op(&c, &op, Duration::from_secs(60)).await;
    wait_console(&c, "mover", "tick 1", 1, Duration::from_secs(60)).await;

    // Both disks into the pool while the guest runs; the VM's directory links to them.
    move_volume(&c, "mover-disk1", "fast").await;
    move_volume(&c, "mover-root", "fast").await;
    let in_pool = |host: u64, disk: &str| {
        pools
            .path()
            .join("fast")
            .join(format!("host-{host}"))
            .join("vms")
            .join(&id)
            .join(disk)
    };
    let link = |host: usize| std::path::PathBuf::from(disk1(&cluster.nodes[host - 1], &id));
    assert_eq!(
        std::fs::read_link(link(1)).expect("link"),
        in_pool(1, "disk1.qcow2")
    );

    // The boot disk grown past its image: the target's copy must be as large.
    c.volume_action(
        "mover-root",
        "resize",
        &novacron_types::ResizeVolumeRequest { size_mib: 80 },
    )
    .await
    .expect("grow the boot disk");

    // Live to host 2: each disk is mirrored into host 2's directory of the same pool.
    let before = last_tick(&console_text(&c, "mover").await);
    migrate_to(&c, "mover", 2).await;
    let text = wait_ticks_past(&c, "mover", before).await;
    assert!(!text.contains("READY"), "rebooted:\n{text}");
    for disk in ["root.qcow2", "disk1.qcow2"] {
        assert!(in_pool(2, disk).exists(), "{disk} not in host 2's pool");
        assert!(!in_pool(1, disk).exists(), "{disk} left in host 1's pool");
    }
    assert_eq!(
        std::fs::read_link(link(2)).expect("link on host 2"),
        in_pool(2, "disk1.qcow2")
    );
    assert_data(true, "read -P 0x5c 0 1M", &link(2).to_string_lossy());
    let disk = c.get_volume("mover-disk1").await.expect("volume");
    assert_eq!((disk.pool.as_str(), disk.node), ("fast", Some(NodeId(2))));

    // Stopped, back to host 1: the files are copied into host 1's directory of the pool.
    let op = c.vm_action("mover", "force-stop").await.expect("stop");
    wait_op(&c, &op, Duration::from_secs(30)).await;
    migrate_to(&c, "mover", 1).await;
    assert_eq!(
        std::fs::read_link(link(1)).expect("link on host 1"),
        in_pool(1, "disk1.qcow2")
    );
    assert_data(false, "read -P 0x5c 0 1M", &link(1).to_string_lossy());
    assert!(!in_pool(2, "disk1.qcow2").exists(), "left on host 2");
    // And it boots there from the pool (a console of its own on this host: its first boot
    // here).
    let op = c.vm_action("mover", "start").await.expect("start");
    let done = wait_op(&c, &op, Duration::from_secs(60)).await;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
    wait_console(&c, "mover", "READY", 1, Duration::from_secs(60)).await;
    let op = c.vm_action("mover", "force-stop").await.expect("stop");
    wait_op(&c, &op, Duration::from_secs(30)).await;
}
