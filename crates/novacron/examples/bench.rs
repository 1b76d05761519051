//! NovaCron benchmark (run by `scripts/bench.sh`, release build). Prints:
//!  1. VM create → running through NovaCron against the floor: the same disk overlay and the
//!     same QEMU command line started directly, over N runs; both "QMP reports running" and
//!     "guest printed READY" as end points; ratios of the medians.
//!  2. `GET /api/v1/vms` latency (p50/p99) from concurrent clients with 100 VMs defined.
//!
//! Usage: bench [--runs N] [--clients C] [--seconds S]

#[path = "bench_util/mod.rs"]
mod bench_util;

use bench_util::percentile;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use novacron_client::Client;
use novacron_hypervisor::accel::Accel;
use novacron_hypervisor::qemu::args::{VmPaths, command_line};
use novacron_hypervisor::qemu::runner;
use novacron_types::{CreateVmRequest, VmState};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.iter().sum::<f64>() / v.len() as f64,
    )
}

async fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .map(|s| s.contains(needle))
            .unwrap_or(false)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The floor: what NovaCron does for a start, done by hand — overlay, spawn, QMP, query-status.
async fn floor_run(demo: &Path, root: &Path) -> (f64, f64) {
    let spec = bench_util::demo_spec(demo, vec![]);
    let paths = VmPaths::new(root, spec.id);
    std::fs::create_dir_all(&paths.dir).expect("dir");
    let t0 = Instant::now();
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&spec.base_image)
        .args(["-F", "qcow2"])
        .arg(paths.root_disk())
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let mut child = Command::new("qemu-system-x86_64")
        .args(command_line(&spec, &paths, Accel::Tcg))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let socket = paths.qmp_socket();
    let (qmp, _events) = loop {
        if let Ok(c) = runner::connect(&socket).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (state, _) = runner::query_state(&qmp).await.expect("query-status");
    assert_eq!(state, VmState::Running);
    let running = t0.elapsed().as_secs_f64();
    assert!(
        wait_file_contains(
            &paths.console_log(),
            "NOVACRON-DEMO-GUEST READY",
            Duration::from_secs(60)
        )
        .await
    );
    let ready = t0.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    (running, ready)
}

async fn novacron_run(c: &Client, data: &Path, i: u64) -> (f64, f64) {
    let name = format!("bench-{i}");
    let t0 = Instant::now();
    let vm = c
        .create_vm(&CreateVmRequest {
            name: name.clone(),
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            boot: None,
            node: None,
            placement: Default::default(),
            pool: None,
            ha: false,
        })
        .await
        .expect("create");
    let op = c.vm_action(&name, "start").await.expect("start");
    c.wait_success(&op, Duration::from_secs(120))
        .await
        .expect("start op");
    let running = t0.elapsed().as_secs_f64();
    let console = data.join("vms").join(vm.id.to_string()).join("console.log");
    assert!(
        wait_file_contains(
            &console,
            "NOVACRON-DEMO-GUEST READY",
            Duration::from_secs(60)
        )
        .await
    );
    let ready = t0.elapsed().as_secs_f64();
    c.wait_success(
        &c.vm_action(&name, "force-stop").await.expect("stop"),
        Duration::from_secs(60),
    )
    .await
    .expect("stop op");
    c.delete_vm(&name).await.expect("delete");
    (running, ready)
}

#[tokio::main]
async fn main() {
    let runs = arg("--runs", 10);
    let clients = arg("--clients", 16);
    let seconds = arg("--seconds", 10);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let demo = std::env::var_os("NOVACRON_DEMO_IMAGE")
        .map(PathBuf::from)
        .unwrap_or(repo.join(".novacron/demo-image"));
    let bin = std::env::var_os("NOVACRON_BIN")
        .map(PathBuf::from)
        .unwrap_or(repo.join("target/release/novacron"));
    let tmp = tempfile::Builder::new()
        .prefix("ncb")
        .tempdir()
        .expect("tmp");
    let data = tmp.path().join("data");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let mut server = Command::new(&bin)
        .args([
            "serve",
            "--accel",
            "tcg",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--demo-image")
        .arg(&demo)
        .env("NOVACRON_ADMIN_PASSWORD", "bench-password")
        .env("NOVACRON_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("novacron serve");
    let url = format!("http://127.0.0.1:{port}");
    let anon = Client::new(&url, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        match anon.login("admin", "bench-password").await {
            Ok(t) => break t,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("novacron did not come up: {e}"),
        }
    };
    let c = anon.with_token(token);

    println!("== 1. VM create -> running, {runs} runs each, TCG, 1 vCPU, 128 MiB, demo guest ==");
    let floor_root = tmp.path().join("floor");
    let (mut f_run, mut f_ready, mut n_run, mut n_ready) = (vec![], vec![], vec![], vec![]);
    // Warm-up (page cache, first QEMU start) for both, not counted.
    floor_run(&demo, &floor_root).await;
    novacron_run(&c, &data, 1000).await;
    for i in 0..runs {
        // Interleave so both see the same machine conditions.
        let (r, d) = floor_run(&demo, &floor_root).await;
        f_run.push(r);
        f_ready.push(d);
        let (r, d) = novacron_run(&c, &data, i).await;
        n_run.push(r);
        n_ready.push(d);
    }
    let show = |label: &str, v: &[f64]| {
        let (p50, p99, mean) = summary(v.to_vec());
        println!(
            "  {label:<44} p50 {:>8.1} ms  p99 {:>8.1} ms  mean {:>8.1} ms",
            p50 * 1e3,
            p99 * 1e3,
            mean * 1e3
        );
        p50
    };
    let fr = show("floor (qemu-img + QEMU direct) to running", &f_run);
    let nr = show("novacron (POST vm + start + op wait) to running", &n_run);
    let fd = show("floor to guest READY", &f_ready);
    let nd = show("novacron to guest READY", &n_ready);
    println!(
        "  ratio to running (p50):     {:.3}  (overhead {:+.1} ms)",
        nr / fr,
        (nr - fr) * 1e3
    );
    println!(
        "  ratio to guest READY (p50): {:.3}  (goal: within 1.10)",
        nd / fd
    );

    println!(
        "== 2. GET /api/v1/vms with 100 VMs defined, {clients} concurrent clients, {seconds} s =="
    );
    for i in 0..100 {
        c.create_vm(&CreateVmRequest {
            name: format!("idle-{i}"),
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            boot: None,
            node: None,
            placement: Default::default(),
            pool: None,
            ha: false,
        })
        .await
        .expect("create idle");
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = reqwest::Client::new();
        let url = format!("{url}/api/v1/vms");
        let token = c.token().expect("token").to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let resp = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("get");
                assert!(resp.status().is_success());
                let body = resp.bytes().await.expect("body");
                assert!(body.len() > 1000);
                lat.push(t.elapsed().as_secs_f64());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    let n = all.len();
    let (p50, p99, _) = summary(all);
    println!(
        "  {n} requests, {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms (goal: p99 < 5 ms)",
        n as f64 / seconds as f64,
        p50 * 1e3,
        p99 * 1e3
    );

    let _ = server.kill();
    let _ = server.wait();
    for pid in std::fs::read_dir(data.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
        })
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
