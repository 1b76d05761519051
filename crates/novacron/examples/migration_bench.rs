//! Live-migration benchmark (run by `scripts/bench-migration.sh`, release build), the same demo
//! guest (1 vCPU, 128 MiB, its 8 MiB data disk mirrored) on the same machine, TCG:
//!
//!  1. The floor: QEMU to QEMU driven over QMP by the driver alone (`novacron-hypervisor`, two
//!     VM roots, loopback): the same steps any live migration with local disks needs (NBD
//!     export, mirror, pause before switch-over, mirrors ended, continue), and nothing else.
//!     Total = first command on the target to the guest running there.
//!  2. NovaCron: a 2-host `novacron dev-cluster`; `POST /api/v1/vms/{vm}/actions/migrate` to the
//!     operation's success (API, placement, Raft records, host-to-host calls included), back and
//!     forth.
//!
//!  Downtime, both: from the guest seen paused for the switch-over until the target runs it, or
//!  QEMU's own figure if longer.
//!  3. Bandwidth: NovaCron migrations capped at 10, 50 and 200 MiB/s; achieved = RAM bytes sent
//!     / time RAM was moving.
//!
//! Usage: migration_bench [--runs N] [--caps 10,50,200] [--novacron PATH] [--demo-image DIR]

#[path = "bench_util/mod.rs"]
mod bench_util;

use bench_util::{arg, free_port, percentile};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_client::Client;
use novacron_hypervisor::accel::Accel;
use novacron_hypervisor::qemu::{QemuConfig, QemuHypervisor};
use novacron_hypervisor::{Hypervisor, IncomingPlan, MigrationTuning, RuntimeSpec};
use novacron_types::{CreateVmRequest, MigrateVmRequest, NodeId, OperationStatus};

const PASSWORD: &str = "bench-password";

fn summary(name: &str, v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
    println!(
        "  {name:<28} p50 {p50:8.1} ms   p99 {p99:8.1} ms   max {:8.1} ms",
        v.last().copied().unwrap_or(f64::NAN)
    );
    (p50, p99)
}

async fn wait_text(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One driver-only migration from `from` to `to`: (total ms, downtime ms).
async fn floor_once(from: &QemuHypervisor, to: &QemuHypervisor, spec: &RuntimeSpec) -> (f64, f64) {
    let plan = IncomingPlan {
        host: "127.0.0.1".into(),
        migration_port: free_port(),
        nbd_port: free_port(),
        postcopy: false,
    };
    let tuning = MigrationTuning {
        max_bandwidth: Some(1024 << 20),
        downtime_limit_ms: Some(300),
        auto_converge: true,
        ..Default::default()
    };
    let id = spec.id;
    let t0 = Instant::now();
    to.incoming_start(spec, &plan).await.expect("incoming");
    from.outgoing_mirror(spec, &plan, &tuning)
        .await
        .expect("mirror");
    let mut seen = 0;
    while !from.outgoing_status(id).await.expect("status").disks_ready {
        seen = from
            .outgoing_wait(id, seen, Duration::from_millis(100))
            .await;
    }
    from.outgoing_migrate(id, &plan, &tuning)
        .await
        .expect("migrate");
    let mut paused_at = None;
    let st = loop {
        let st = from.outgoing_status(id).await.expect("status");
        match st.status.as_str() {
            "completed" => break st,
            "pre-switchover" => {
                paused_at.get_or_insert_with(Instant::now);
                from.outgoing_switchover(spec).await.expect("switchover")
            }
            "failed" => panic!("floor migration failed: {st:?}"),
            _ => {}
        }
        seen = from
            .outgoing_wait(id, seen, Duration::from_millis(100))
            .await;
    };
    to.incoming_finish(id).await.expect("finish");
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    // The guest's real pause, measured as NovaCron measures it: from the switch-over until the
    // target runs it (QEMU's own figure ends at completion), whichever is longer.
    let ours = paused_at.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64() * 1000.0);
    from.outgoing_complete(id).await.expect("complete");
    from.force_stop(id).await.expect("stop source");
    from.undefine(id).await.expect("remove source copy");
    (total, (st.downtime_ms.unwrap_or(0) as f64).max(ours))
}

async fn floor(demo: &Path, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let roots = [
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    ];
    let mut hv = Vec::new();
    for r in &roots {
        hv.push(
            QemuHypervisor::new(QemuConfig {
                vms_root: r.path().to_path_buf(),
                qemu_binary: "qemu-system-x86_64".into(),
                accel: Accel::Tcg,
                start_timeout: Duration::from_secs(20),
                console_max_bytes: novacron_hypervisor::qemu::CONSOLE_MAX_BYTES,
            })
            .await
            .expect("driver"),
        );
    }
    let spec = bench_util::demo_spec(demo, vec![8]);
    hv[0].define(&spec).await.expect("define");
    hv[0].start(&spec).await.expect("start");
    wait_text(
        &hv[0].console_path(spec.id),
        "tick 2",
        Duration::from_secs(60),
    )
    .await;
    let (mut totals, mut downs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (from, to) = if i.is_multiple_of(2) {
            (&hv[0], &hv[1])
        } else {
            (&hv[1], &hv[0])
        };
        let (t, d) = floor_once(from, to, &spec).await;
        totals.push(t);
        downs.push(d);
    }
    let last = if runs.is_multiple_of(2) {
        &hv[0]
    } else {
        &hv[1]
    };
    let _ = last.force_stop(spec.id).await;
    (totals, downs)
}

/// A `novacron dev-cluster`, stopped (SIGTERM, then SIGKILL) when dropped.
struct DevCluster {
    child: Child,
    urls: Vec<String>,
    _base: tempfile::TempDir,
}

impl DevCluster {
    fn start(bin: &Path, demo: &Path) -> DevCluster {
        let base = tempfile::tempdir().expect("tmp");
        let mut child = Command::new(bin)
            .args(["dev-cluster", "--nodes", "2", "--fresh", "--base-dir"])
            .arg(base.path())
            .args(["--", "--accel", "tcg", "--demo-image"])
            .arg(demo)
            .env("NOVACRON_ADMIN_PASSWORD", PASSWORD)
            .env("NOVACRON_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dev-cluster");
        let out = child.stdout.take().expect("stdout");
        let mut urls = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let line = line.expect("line");
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
                && line.trim_start().starts_with("node-")
            {
                urls.push(url.to_string());
            }
            if line.starts_with("admin password") {
                break;
            }
        }
        assert_eq!(urls.len(), 2, "dev-cluster printed {urls:?}");
        DevCluster {
            child,
            urls,
            _base: base,
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One migration through NovaCron: (total ms from the request to success, the progress record).
async fn novacron_once(
    c: &Client,
    to: u64,
    cap_mib: Option<u64>,
) -> (f64, novacron_types::MigrationProgress) {
    let t0 = Instant::now();
    let op = c
        .migrate_vm(
            "bench",
            &MigrateVmRequest {
                target: Some(NodeId(to)),
                max_bandwidth_mib: cap_mib,
                ..Default::default()
            },
        )
        .await
        .expect("migrate");
    let done = loop {
        let now = c
            .wait_operation(&op.id.to_string(), 120)
            .await
            .expect("wait");
        if now.status.is_final() {
            break now;
        }
    };
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(done.status, OperationStatus::Success, "{done:?}");
    (total, done.migration.expect("figures"))
}

#[tokio::main]
async fn main() {
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(10);
    let caps: Vec<u64> = arg("--caps")
        .unwrap_or_else(|| "10,50,200".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let bin = arg("--novacron")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/novacron"));
    let demo =
        std::path::absolute(arg("--demo-image").unwrap_or_else(|| ".novacron/demo-image".into()))
            .expect("demo path");
    assert!(
        demo.join("image.json").exists(),
        "no demo image at {}",
        demo.display()
    );
    println!(
        "Live-migration benchmark: demo guest (1 vCPU, 128 MiB, 8 MiB data disk mirrored), TCG, \
         loopback, {runs} runs each\n"
    );

    let (mut f_total, mut f_down) = floor(&demo, runs).await;

    let cluster = DevCluster::start(&bin, &demo);
    let c = Client::new(&cluster.urls[0], None);
    let token = c.login("admin", PASSWORD).await.expect("login");
    let c = c.with_token(token);
    c.create_vm(&CreateVmRequest {
        name: "bench".into(),
        image: "demo".into(),
        vcpus: 1,
        memory_mib: 128,
        // The same layout as the floor's: the overlay on the demo image and an 8 MiB disk.
        disks: vec![novacron_types::DiskRequest { size_mib: 8 }],
        boot: None,
        node: Some(NodeId(1)),
        placement: Default::default(),
        pool: None,
        ha: false,
    })
    .await
    .expect("create");
    let op = c.vm_action("bench", "start").await.expect("start");
    c.wait_success(&op, Duration::from_secs(60))
        .await
        .expect("started");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut n_total, mut n_down) = (Vec::new(), Vec::new());
    let mut on = 1;
    for i in 0..=runs {
        let to = 3 - on;
        let (t, m) = novacron_once(&c, to, None).await;
        if i > 0 {
            n_total.push(t);
            n_down.push(m.downtime_ms.unwrap_or(0) as f64);
        }
        on = to;
    }

    println!("(1) total migration time and downtime, {runs} runs each");
    let (ft50, ft99) = summary("floor total", &mut f_total);
    let (nt50, nt99) = summary("NovaCron total", &mut n_total);
    let (fd50, fd99) = summary("floor downtime", &mut f_down);
    let (nd50, nd99) = summary("NovaCron downtime", &mut n_down);
    println!(
        "  orchestration overhead: p50 {:+.1} ms, p99 {:+.1} ms; total ratio p50 {:.2}, p99 {:.2}",
        nt50 - ft50,
        nt99 - ft99,
        nt50 / ft50,
        nt99 / ft99
    );
    println!(
        "  downtime ratio NovaCron/floor: p50 {:.2}, p99 {:.2}",
        nd50 / fd50.max(1.0),
        nd99 / fd99.max(1.0)
    );

    println!(
        "\n(2) achieved RAM bandwidth against the cap (NovaCron): the iterative phase the cap \
         governs, and, for information, the whole copy (QEMU sends what is left at the \
         switch-over unthrottled, within the downtime limit)"
    );
    let mut worst: f64 = 0.0;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for cap in &caps {
        let to = 3 - on;
        let (_, m) = novacron_once(&c, to, Some(*cap)).await;
        on = to;
        let achieved = mib(m.precopy_bytes) / (m.precopy_ms.max(1) as f64 / 1000.0);
        let overall = mib(m.ram_transferred_bytes) / (m.ram_copy_ms.max(1) as f64 / 1000.0);
        let off = (achieved - *cap as f64) / *cap as f64 * 100.0;
        worst = worst.max(off.abs());
        println!(
            "  cap {cap:>4} MiB/s: {achieved:7.1} MiB/s ({off:+.1}%; {:.1} MiB in {} ms); whole \
             copy {overall:.1} MiB/s ({:.1} MiB in {} ms)",
            mib(m.precopy_bytes),
            m.precopy_ms,
            mib(m.ram_transferred_bytes),
            m.ram_copy_ms
        );
    }
    let stop = c.vm_action("bench", "force-stop").await.expect("stop");
    let _ = c.wait_operation(&stop.id.to_string(), 30).await;

    println!(
        "\nGoals: overhead < 100 ms over the floor: {} (p50 {:+.1} ms, p99 {:+.1} ms); \
         downtime p99 < 50 ms: {} ({nd99:.1} ms); bandwidth within 5% of the cap: {} (worst {worst:.1}%)",
        if nt99 - ft99 < 100.0 {
            "met"
        } else {
            "NOT met"
        },
        nt50 - ft50,
        nt99 - ft99,
        if nd99 < 50.0 { "met" } else { "NOT met" },
        if worst <= 5.0 { "met" } else { "NOT met" },
    );
}
