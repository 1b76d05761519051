//! Shared storage pools and HA on real clusters (three full hosts behind fault-injecting
//! proxies, so a host can be cut off, not only killed) with the demo guest:
//! - a VM on a shared pool live-migrates without copying its disks;
//! - an `ha` VM whose host's `novacron` is killed -9 is fenced by that host's watchdog and
//!   restarted elsewhere only after the lease and margin; the host, restarted, drops its copy;
//! - an `ha` VM whose host is cut off is fenced by that host and restarted elsewhere; at no
//!   sampled moment does a QEMU of the VM live on two hosts, also not after the heal.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::chaos::ChaosCluster;
use common::{demo_vm, wait_console, wait_state};
use novacron_client::Client;
use novacron_types::{
    CreatePoolRequest, CreateVmRequest, MigrateVmRequest, NodeId, OperationStatus, PoolTier,
    VmState,
};

/// The test cluster's timings (`fast_args`): 3 s leases, a third of it each for the fencing
/// budget and the takeover margin, heartbeats every 200 ms.
const LEASE: Duration = Duration::from_millis(3000);
const MARGIN: Duration = Duration::from_millis(1000);
const HEARTBEAT: Duration = Duration::from_millis(200);

fn seed() -> u64 {
    std::env::var("NOVACRON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

/// The PID of the VM's QEMU on a host, if one is alive (pidfile, process alive and no zombie).
fn qemu_on(data_dir: &Path, vm: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(data_dir.join("vms").join(vm).join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = cmdline.split(|b| *b == 0).any(|a| a == vm.as_bytes());
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (ours && state != "Z" && state != "X").then_some(pid)
}

/// Every host's QEMU of the VM, as `(host, pid)`.
fn qemus(c: &ChaosCluster, vm: &str) -> Vec<(u32, i32)> {
    c.hosts
        .iter()
        .filter_map(|h| qemu_on(&h.node.data_dir(), vm).map(|p| (h.id, p)))
        .collect()
}

/// A cluster of three full hosts with a shared pool (one directory all of them see) and a
/// running HA VM on host 3, which does not lead. Returns the pool's directory and the VM's ID.
async fn cluster_with_ha_vm(name: &str) -> (ChaosCluster, tempfile::TempDir, String) {
    let c = ChaosCluster::start(3, seed(), &[]).await;
    let admin = c.admin(1).await;
    if c.leader(Duration::from_secs(10)).await == 3 {
        let _: serde_json::Value = admin
            .post("/api/v1/cluster/leader", &serde_json::json!({ "to": 1 }))
            .await
            .expect("transfer");
    }
    let pool_dir = tempfile::Builder::new()
        .prefix("ncpool")
        .tempdir()
        .expect("pool dir");
    admin
        .create_pool(&CreatePoolRequest {
            name: "shared".into(),
            path: pool_dir.path().display().to_string(),
            tier: PoolTier::Warm,
            shared: true,
            capacity_bytes: 10 << 30,
            cost_per_gib_month: 0.05,
            performance_class: None,
        })
        .await
        .expect("pool");
    // Every host must see the pool before placement offers it there.
    wait_pool_seen(&c, "shared").await;
    admin
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(3)),
            pool: Some("shared".into()),
            ha: true,
            ..demo_vm(name)
        })
        .await
        .expect("create");
    let op = admin.vm_action(name, "start").await.expect("start");
    admin
        .wait_success(&op, Duration::from_secs(60))
        .await
        .expect("started");
    wait_console(&admin, name, "tick 1", 1, Duration::from_secs(60)).await;
    let id = admin.get_vm(name).await.expect("vm").id.to_string();
    (c, pool_dir, id)
}

async fn wait_pool_seen(c: &ChaosCluster, pool: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leader = c.leader(Duration::from_secs(10)).await;
        if let Some(s) = c.local_status(leader).await
            && s["members"].as_array().is_some_and(|ms| {
                ms.len() == 3
                    && ms
                        .iter()
                        .all(|m| m["inventory"]["disk_free_bytes"][pool].as_u64().is_some())
            })
        {
            return;
        }
        assert!(Instant::now() < deadline, "not every host sees pool {pool}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples every host's QEMUs of the VM every 10 ms until `done` says stop, checking there is
/// never more than one. Returns when the old one (on `old_host`) was last seen and when a new
/// one (elsewhere) was first seen, as offsets from `from`.
struct Watch {
    old_gone: Option<Duration>,
    new_seen: Option<(u32, Duration)>,
}

async fn watch_takeover(
    c: &ChaosCluster,
    vm: &str,
    old_host: u32,
    from: Instant,
    timeout: Duration,
) -> Watch {
    let mut w = Watch {
        old_gone: None,
        new_seen: None,
    };
    while w.new_seen.is_none() {
        let now = qemus(c, vm);
        assert!(
            now.len() <= 1,
            "the VM runs on two hosts at once {:?} after the fault: {now:?}",
            from.elapsed()
        );
        let t = from.elapsed();
        if w.old_gone.is_none() && !now.iter().any(|(h, _)| *h == old_host) {
            w.old_gone = Some(t);
        }
        if let Some((h, _)) = now.iter().find(|(h, _)| *h != old_host) {
            w.new_seen = Some((*h, t));
        }
        assert!(t < timeout, "no host took the VM over within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w
}

/// The VM runs (per the cluster) on `host`, its console ticks there, and its disks there are
/// the pool's files.
async fn check_running_on(
    c: &ChaosCluster,
    admin: &Client,
    name: &str,
    id: &str,
    host: u32,
    pool: &Path,
) {
    let vm = wait_state(admin, name, VmState::Running, Duration::from_secs(30)).await;
    assert_eq!(vm.node, NodeId(host as u64), "{vm:?}");
    assert_eq!(vm.recovered_from, None, "{vm:?}");
    let console = c
        .host(host)
        .node
        .data_dir()
        .join("vms")
        .join(id)
        .join("console.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console).is_ok_and(|t| t.contains("tick 1")) {
        assert!(
            Instant::now() < deadline,
            "the restarted guest never ticked on host {host}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let link = c
        .host(host)
        .node
        .data_dir()
        .join("vms")
        .join(id)
        .join("root.qcow2");
    assert_eq!(
        std::fs::read_link(&link).expect("root disk is a link"),
        pool.join("vms").join(id).join("root.qcow2")
    );
    let ops: Vec<novacron_types::Operation> =
        admin.list_all("/api/v1/operations").await.expect("ops");
    assert!(
        ops.iter().any(|o| o.kind == "vm.ha_restart"
            && o.status == OperationStatus::Success
            && o.node == NodeId(host as u64)),
        "no successful vm.ha_restart on host {host}: {ops:?}"
    );
}

/// Waits until host `host` holds nothing of the VM (no QEMU, no directory), while checking the
/// VM never has two QEMUs.
async fn wait_copy_gone(c: &ChaosCluster, id: &str, host: u32) {
    let dir: PathBuf = c.host(host).node.data_dir().join("vms").join(id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() {
        let now = qemus(c, id);
        assert!(now.len() <= 1, "two QEMUs of the VM: {now:?}");
        assert!(
            !now.iter().any(|(h, _)| *h == host),
            "host {host} runs the VM again after coming back"
        );
        assert!(
            Instant::now() < deadline,
            "host {host} kept its copy of the VM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_ha_vm_restarts_elsewhere_only_after_its_lease() {
    let (mut c, pool, id) = cluster_with_ha_vm("ha-kill").await;
    let admin = c.admin(1).await;
    assert!(
        pool.path()
            .join("vms")
            .join(&id)
            .join("root.qcow2")
            .exists(),
        "the disk is not in the pool"
    );
    let old = qemu_on(&c.host(3).node.data_dir(), &id).expect("QEMU on host 3");

    // Only `novacron` dies: its QEMU (own process group) would live on, were it not for the
    // watchdog.
    c.host_mut(3).node.kill();
    let killed = Instant::now();
    let w = watch_takeover(&c, &id, 3, killed, Duration::from_secs(30)).await;
    let old_gone = w.old_gone.expect("old QEMU gone");
    let (host, new_seen) = w.new_seen.expect("new QEMU");
    eprintln!(
        "QEMU {old} on host 3 killed {old_gone:?} after novacron; restarted on host {host} after {new_seen:?}"
    );
    assert!(
        old_gone < LEASE,
        "the watchdog fenced only after {old_gone:?}, later than the lease ({LEASE:?})"
    );
    assert!(
        new_seen >= LEASE + MARGIN - HEARTBEAT,
        "restarted after {new_seen:?}, before the lease and margin could have passed"
    );
    check_running_on(&c, &admin, "ha-kill", &id, host, pool.path()).await;
    let log =
        std::fs::read_to_string(c.host(3).node.data_dir().join("watchdog.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("killed the QEMU of VM {id}")),
        "{log}"
    );

    // Host 3 comes back: it removes its copy and leaves the VM where it is.
    c.host_mut(3).node.start_again();
    wait_copy_gone(&c, &id, 3).await;
    let vm = admin.get_vm("ha-kill").await.expect("vm");
    assert_eq!(vm.node, NodeId(host as u64));
    assert_eq!(vm.state, VmState::Running);
    assert!(
        pool.path()
            .join("vms")
            .join(&id)
            .join("root.qcow2")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_hosts_ha_vm_never_runs_on_two_hosts() {
    let (c, pool, id) = cluster_with_ha_vm("ha-cut").await;
    let admin = c.admin(1).await;

    c.net.partition(&[3], &[1, 2]);
    let cut = Instant::now();
    let w = watch_takeover(&c, &id, 3, cut, Duration::from_secs(30)).await;
    let old_gone = w.old_gone.expect("old QEMU gone");
    let (host, new_seen) = w.new_seen.expect("new QEMU");
    eprintln!(
        "host 3 fenced the VM {old_gone:?} after the cut; host {host} started it after {new_seen:?}"
    );
    assert!(old_gone < LEASE, "fenced only after {old_gone:?}");
    assert!(
        new_seen >= LEASE + MARGIN - HEARTBEAT,
        "restarted after {new_seen:?}, before the lease and margin could have passed"
    );
    check_running_on(&c, &admin, "ha-cut", &id, host, pool.path()).await;
    // While cut off, host 3 still believes it owns the VM; it must not start it again.
    let c3 = c.admin(3).await;
    let (code, body) = c3
        .raw(
            reqwest::Method::POST,
            "/api/v1/vms/ha-cut/actions/start",
            None,
        )
        .await
        .expect("raw");
    assert!(
        code >= 400,
        "an isolated host accepted a start: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(qemus(&c, &id).iter().all(|(h, _)| *h == host));

    // Healed: host 3 learns the VM moved and drops its copy; still never two QEMUs.
    c.net.heal();
    wait_copy_gone(&c, &id, 3).await;
    let vm = admin.get_vm("ha-cut").await.expect("vm");
    assert_eq!((vm.node, vm.state), (NodeId(host as u64), VmState::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_shared_pool_migrates_without_copying_and_pools_are_checked() {
    let (c, pool, id) = cluster_with_ha_vm("shared-mig").await;
    let admin = c.admin(1).await;

    // Pool errors: each names its field or reason, and changes nothing.
    let bad = |path: &str, shared: bool| CreatePoolRequest {
        name: "other".into(),
        path: path.into(),
        tier: PoolTier::Cold,
        shared,
        capacity_bytes: 1 << 30,
        cost_per_gib_month: 0.0,
        performance_class: None,
    };
    let e = admin
        .create_pool(&bad("relative/dir", false))
        .await
        .expect_err("relative");
    assert_eq!(
        (e.status(), e.api().map(|a| a.field.clone())),
        (Some(400), Some(Some("path".into()))),
        "{e}"
    );
    let e = admin
        .create_pool(&bad("/nonexistent/novacron-test", true))
        .await
        .expect_err("not mounted");
    assert_eq!(e.status(), Some(400), "{e}");
    let e = admin
        .create_pool(&bad(&pool.path().display().to_string(), true))
        .await
        .expect_err("same dir");
    assert_eq!(e.status(), Some(409), "{e}");
    let e = admin.delete_pool("shared").await.expect_err("in use");
    assert_eq!(
        e.api().and_then(|a| a.reason.clone()).as_deref(),
        Some("pool_in_use"),
        "{e}"
    );
    let e = admin
        .create_vm(&CreateVmRequest {
            ha: true,
            ..demo_vm("no-ha")
        })
        .await
        .expect_err("ha without shared pool");
    assert_eq!(
        e.api().and_then(|a| a.reason.clone()).as_deref(),
        Some("ha_needs_shared_pool"),
        "{e}"
    );
    assert_eq!(admin.list_pools().await.expect("pools").len(), 1);
    // The pool in Prometheus: capacity, what the VM's disks provision, free space seen here.
    let token = admin.token().expect("token").to_string();
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", c.host(1).direct))
        .bearer_auth(token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for want in [
        format!(
            "novacron_pool_capacity_bytes{{pool=\"shared\",tier=\"warm\"}} {}",
            10u64 << 30
        ),
        "novacron_pool_provisioned_bytes{pool=\"shared\",tier=\"warm\"}".to_string(),
        "novacron_pool_free_bytes{pool=\"shared\",tier=\"warm\"}".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} missing");
    }

    // The same through the CLI: a table, errors with a non-zero exit, HA switched off and on.
    let cli = common::Cli {
        server: c.host(1).direct.clone(),
        config: c.host(1).node.dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(common::ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    let out = cli.ok(&["pool", "list"]);
    assert!(
        out.contains("shared") && out.contains("warm") && out.contains("yes"),
        "{out}"
    );
    let (code, _, err) = cli.run(
        &[
            "pool",
            "create",
            "x",
            "--path",
            "/tmp/x",
            "--tier",
            "lukewarm",
            "--capacity-gib",
            "1",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--tier must be hot, warm or cold"), "{err}");
    let (code, _, err) = cli.run(&["vm", "create", "cli-ha", "--ha"], None);
    assert_ne!(code, 0);
    assert!(err.contains("needs its disks on a shared pool"), "{err}");
    assert!(
        cli.ok(&["vm", "ha", "shared-mig", "off"])
            .contains("HA off")
    );
    assert!(!admin.get_vm("shared-mig").await.expect("vm").spec.ha);
    assert!(cli.ok(&["vm", "ha", "shared-mig", "on"]).contains("HA on"));

    // Live migration: the target opens the same files, nothing is mirrored.
    let before = std::fs::metadata(pool.path().join("vms").join(&id).join("root.qcow2"))
        .expect("disk")
        .len();
    let op = admin
        .migrate_vm(
            "shared-mig",
            &MigrateVmRequest {
                target: Some(NodeId(2)),
                ..Default::default()
            },
        )
        .await
        .expect("migrate");
    let done = admin
        .wait_success(&op, Duration::from_secs(120))
        .await
        .expect("migrated");
    let m = done.migration.expect("figures");
    assert_eq!(m.disk_total_bytes, 0, "disks were copied: {m:?}");
    let vm = wait_state(
        &admin,
        "shared-mig",
        VmState::Running,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(vm.node, NodeId(2));
    assert!(qemus(&c, &id).iter().all(|(h, _)| *h == 2));
    assert!(!c.host(3).node.data_dir().join("vms").join(&id).exists());
    let after = std::fs::metadata(pool.path().join("vms").join(&id).join("root.qcow2"))
        .expect("the disk stays in the pool")
        .len();
    assert!(after >= before);
    // The target's console: ticks go on, no second boot.
    let text = common::console_text(&admin, "shared-mig").await;
    assert!(!text.contains("READY"), "the guest rebooted: {text}");
    let tick = common::last_tick(&text);
    wait_console(
        &admin,
        "shared-mig",
        &format!("tick {}", tick + 2),
        1,
        Duration::from_secs(30),
    )
    .await;

    // HA keeps it running where it is: its QEMU killed, host 2 starts it again.
    let (_, pid) = qemus(&c, &id)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = qemus(&c, &id);
        if now.len() == 1 && now[0].1 != pid {
            assert_eq!(now[0].0, 2, "restarted on another host: {now:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HA did not restart the killed guest: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_state(
        &admin,
        "shared-mig",
        VmState::Running,
        Duration::from_secs(30),
    )
    .await;

    // Deleted: the disks leave the pool, then the pool can go.
    admin
        .wait_success(
            &admin
                .vm_action("shared-mig", "force-stop")
                .await
                .expect("stop"),
            Duration::from_secs(60),
        )
        .await
        .expect("stopped");
    admin.delete_vm("shared-mig").await.expect("delete");
    assert!(!pool.path().join("vms").join(&id).exists());
    admin.delete_pool("shared").await.expect("pool deleted");
    assert!(!pool.path().join(".novacron-pool").exists());
}
