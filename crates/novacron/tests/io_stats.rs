//! The I/O collector on a real node: a guest writing to its disk shows up in the statistics its
//! host collects from QEMU, an idle guest's writes stay at zero, and the CLI prints both.

mod common;

use std::time::{Duration, Instant};

use common::*;
use novacron_types::VmState;

fn written(r: &novacron_types::DiskIoReport, disk: &str) -> (u64, u64) {
    r.disks
        .iter()
        .filter(|d| d.disk == disk)
        .flat_map(|d| d.buckets.iter())
        .fold((0, 0), |(b, o), x| (b + x.wr_bytes, o + x.wr_ops))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_writing_to_its_disk_shows_in_the_collected_statistics() {
    let node = Node::start_with(vec!["--stats-interval".into(), "1".into()]);
    let c = node.admin().await;
    // 4 x 64 KiB a second to /dev/vda, flushed (`novacron.diskwrite`).
    c.create_vm(&demo_vm_with("writer", "novacron.diskwrite=4"))
        .await
        .expect("create writer");
    c.create_vm(&demo_vm("idle")).await.expect("create idle");
    for vm in ["writer", "idle"] {
        let op = c.vm_action(vm, "start").await.expect("start");
        c.wait_success(&op, Duration::from_secs(60))
            .await
            .expect("started");
    }
    wait_state(&c, "writer", VmState::Running, Duration::from_secs(10)).await;
    wait_console(
        &c,
        "writer",
        "writing 4 x 64 KiB/s",
        1,
        Duration::from_secs(60),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let r = c.disk_stats("writer", None).await.expect("stats");
        // At least 3 seconds' worth of the guest's writes.
        if written(&r, "root").0 >= 3 * 4 * 65536 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's writes never showed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(report.sample_interval_s, 1);
    let root = report
        .disks
        .iter()
        .find(|d| d.disk == "root")
        .expect("root");
    assert_eq!(root.step_s, 1, "the finest resolution is the sampling step");
    assert!(root.buckets.windows(2).all(|w| w[0].start < w[1].start));
    // The same data at one minute per bucket adds up to the same writes (or more, later).
    let minute = c.disk_stats("writer", Some(60)).await.expect("minute");
    assert_eq!(minute.disks[0].step_s, 60);
    assert!(written(&minute, "root").0 >= written(&report, "root").0);

    let idle = c.disk_stats("idle", None).await.expect("idle stats");
    assert!(!idle.disks.is_empty(), "the idle guest is sampled too");
    assert_eq!(
        written(&idle, "root"),
        (0, 0),
        "an idle guest writes nothing: {idle:?}"
    );

    let e = c
        .disk_stats("writer", Some(100_000))
        .await
        .expect_err("step too big");
    assert_eq!(e.status(), Some(400));

    let cli = Cli {
        server: node.url.clone(),
        config: node.dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    let out = cli.ok(&["vm", "stats", "writer"]);
    assert!(out.contains("WRITE MiB") && out.contains("root"), "{out}");
    let (code, _, err) = cli.run(&["vm", "stats", "nope"], None);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}
