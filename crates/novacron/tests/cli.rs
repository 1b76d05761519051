//! The CLI against a real node: login writes the config file, commands print tables or JSON,
//! errors exit non-zero with the server's message.

mod common;

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_logs_in_manages_vms_and_fails_clearly() {
    let node = Node::start();
    let cli = Cli {
        server: node.url.clone(),
        config: node.dir.path().join("client.toml"),
    };

    // Without a session every command is refused with the server's reason.
    let (code, _, err) = cli.run(&["vm", "list"], None);
    assert_ne!(code, 0);
    assert!(err.contains("unauthenticated"), "{err}");

    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some("wrong-password\n"));
    assert_ne!(code, 0);
    assert!(err.contains("invalid username or password"), "{err}");
    let (code, _, err) = cli.run(
        &["login", "--password-stdin"],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert_eq!(code, 0, "{err}");
    let saved = std::fs::read_to_string(&cli.config).expect("config written");
    assert!(saved.contains("token"), "{saved}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cli.config)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let table = cli.ok(&["image", "list"]);
    assert!(
        table.lines().next().is_some_and(|h| h.starts_with("NAME")),
        "{table}"
    );
    assert!(table.contains("demo"));

    cli.ok(&[
        "vm", "create", "cli-vm", "--image", "demo", "--vcpus", "1", "--memory", "96", "--disk",
        "16",
    ]);
    let listed: Value = serde_json::from_str(&cli.ok(&["vm", "list", "-o", "json"])).expect("json");
    assert_eq!(listed[0]["name"], "cli-vm");
    assert_eq!(listed[0]["state"], "stopped");
    assert_eq!(listed[0]["spec"]["memory_mib"], 96);
    assert_eq!(listed[0]["spec"]["disks"].as_array().map(Vec::len), Some(2));

    // Errors: a non-zero exit and the server's message.
    let (code, _, err) = cli.run(&["vm", "create", "cli-vm"], None);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = cli.run(&["vm", "stop", "cli-vm"], None);
    assert_ne!(code, 0);
    assert!(err.contains("cannot stop a VM that is stopped"), "{err}");
    let (code, _, err) = cli.run(&["vm", "show", "ghost"], None);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = cli.run(&["vm", "create", "x", "--memory", "lots"], None);
    assert_ne!(code, 0);
    assert!(err.contains("invalid value"), "{err}");

    // Start waits for the operation; the op is then visible to `op show`.
    cli.ok(&["vm", "start", "cli-vm"]);
    let vm: Value =
        serde_json::from_str(&cli.ok(&["vm", "show", "cli-vm", "-o", "json"])).expect("json");
    assert_eq!(vm["state"], "running");
    let ops: Value = serde_json::from_str(&cli.ok(&["op", "list", "-o", "json"])).expect("json");
    let id = ops[0]["id"].as_str().expect("op id");
    let op: Value = serde_json::from_str(&cli.ok(&["op", "show", id, "-o", "json"])).expect("json");
    assert_eq!(op["status"], "success");
    cli.ok(&["vm", "force-stop", "cli-vm"]);
    cli.ok(&["vm", "delete", "cli-vm"]);
    assert!(cli.ok(&["vm", "list", "-o", "json"]).trim() == "[]");

    // Importing a user's own image from a local file.
    let raw = node.dir.path().join("mine.raw");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    cli.ok(&["image", "import", "mine", raw.to_str().expect("utf8")]);
    let images: Value =
        serde_json::from_str(&cli.ok(&["image", "list", "-o", "json"])).expect("json");
    let mine = images
        .as_array()
        .expect("list")
        .iter()
        .find(|i| i["name"] == "mine")
        .expect("imported");
    assert_eq!(mine["format"], "raw");
    assert_eq!(mine["virtual_size"], 8 * 1024 * 1024);
    let stored = std::path::PathBuf::from(mine["path"].as_str().expect("path"));
    assert!(
        stored.starts_with(node.data_dir()),
        "copied into the image store: {stored:?}"
    );
    cli.ok(&["vm", "create", "from-mine", "--image", "mine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_a_cluster() {
    let cluster = common::cluster::TestCluster::start(&["full", "full", "full"], &[]).await;
    let cli = Cli {
        server: cluster.nodes[1].url.clone(),
        config: cluster.nodes[1].dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");

    // Status through a follower shows the leader's view, as a table and as JSON.
    let table = cli.ok(&["cluster", "status"]);
    assert!(table.contains("Leader: host"), "{table}");
    assert_eq!(table.matches("online").count(), 3, "{table}");
    let s: Value =
        serde_json::from_str(&cli.ok(&["cluster", "status", "-o", "json"])).expect("json");
    assert_eq!(s["voters"], 3);
    assert_eq!(s["members"].as_array().map(Vec::len), Some(3));
    let local: Value =
        serde_json::from_str(&cli.ok(&["cluster", "status", "--stale", "-o", "json"]))
            .expect("json");
    assert_eq!(local["reported_by"], 2);

    // A join token: printed once, usable with `serve --join`.
    let t: Value = serde_json::from_str(&cli.ok(&[
        "cluster", "token", "--role", "witness", "--ttl", "60", "-o", "json",
    ]))
    .expect("json");
    assert!(
        t["token"].as_str().is_some_and(|t| t.starts_with("ncj1-")),
        "{t}"
    );
    assert_eq!(t["role"], "witness");

    // Leadership moves where it is asked to.
    let out = cli.ok(&["cluster", "leader", "--to", "3"]);
    assert!(out.contains("host 3"), "{out}");
    let s: Value =
        serde_json::from_str(&cli.ok(&["cluster", "status", "-o", "json"])).expect("json");
    assert_eq!(s["leader"]["id"], 3);

    // Errors: non-zero exit and the server's reason.
    let (code, _, err) = cli.run(&["cluster", "remove", "99"], None);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = cli.run(&["cluster", "leader", "--to", "42"], None);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

/// `novacron dev-cluster ARGS` with its standard output and error on receivers.
fn dev_cluster(
    base: &std::path::Path,
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_novacron"))
        .arg("dev-cluster")
        .args(args)
        .arg("--base-dir")
        .arg(base)
        .args(["--", "--accel", "tcg", "--demo-image"])
        .arg(common::demo_dir())
        .env("NOVACRON_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, like a job in a terminal: `signal` sends to the group.
        .process_group(0)
        .spawn()
        .expect("spawn dev-cluster");
    let out = common::stdout_lines(&mut child);
    let stderr = child.stderr.take().expect("stderr");
    let (tx, err) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("dev-cluster: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, out, err)
}

/// Reads dev-cluster's host lines ("  node-1   full     http://127.0.0.1:PORT") up to the
/// password line.
fn host_urls(rx: &std::sync::mpsc::Receiver<String>) -> Vec<(String, String)> {
    let mut hosts = Vec::new();
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("dev-cluster output");
        let name = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let host_line = name.starts_with("node-") || name == "witness";
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
            && host_line
        {
            hosts.push((name, url.to_string()));
        }
        if line.starts_with("admin password") {
            return hosts;
        }
    }
}

/// Waits for a line containing `needle` on `rx`.
fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: std::time::Duration,
) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?} within {within:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

/// Kills host `name`'s `novacron serve` with SIGKILL, as a crash would.
fn kill_host(base: &std::path::Path, name: &str) {
    let serve = pids_with(&format!("serve --data-dir {}", base.join(name).display()));
    assert_eq!(serve.len(), 1, "{serve:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

/// Signals dev-cluster's whole process group, as Ctrl-C in its terminal does.
fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

/// Whether the host's process answers at all (`/healthz`).
async fn alive(url: &str) -> bool {
    reqwest::get(format!("{url}/healthz"))
        .await
        .is_ok_and(|r| r.status().as_u16() == 200)
}

async fn ready(url: &str) -> bool {
    reqwest::get(format!("{url}/readyz"))
        .await
        .is_ok_and(|r| r.status().as_u16() == 200)
}

/// Kills every process whose command line names the directory (dev-cluster, its hosts, their
/// watchdogs and guests) when dropped, so a failing test leaves nothing running.
struct Reap(std::path::PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in pids_with(&self.0.display().to_string()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Waits until no process of ours (command line naming `base`) is left, at most `within`.
fn wait_none_left(base: &std::path::Path, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = pids_with(&base.display().to_string());
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left {within:?} after the stop: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_survives_a_host_kill_and_stops_them_all() {
    use std::time::Duration;
    let base = tempfile::tempdir().expect("tempdir");
    let _reap = Reap(base.path().to_path_buf());
    let (mut child, out, err) = dev_cluster(base.path(), &["--nodes", "2", "--witness"]);
    let hosts = host_urls(&out);
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let admin = {
        let c = novacron_client::Client::new(&hosts[2].1, None);
        let t = c.login("admin", ADMIN_PASSWORD).await.expect("login");
        c.with_token(t)
    };
    // Hosts join as learners and are promoted one at a time: wait for three voters.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s: Value = admin.get("/api/v1/cluster").await.expect("status");
        if s["voters"] == 3 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never three voters: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s["members"].as_array().map(Vec::len), Some(3), "{s}");
    assert!(
        s["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["role"] == "witness")),
        "{s}"
    );

    // Kill one host the hard way: the others keep running, and dev-cluster says what happened
    // and how to start it again.
    kill_host(base.path(), "node-1");
    let line = wait_line(&err, "host node-1 exited", Duration::from_secs(10));
    assert!(line.contains("killed by SIGKILL"), "{line}");
    let hint = wait_line(&err, "start it again with", Duration::from_secs(5));
    assert!(hint.contains("novacron dev-cluster --base-dir"), "{hint}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "dev-cluster stopped when one host died"
    );
    assert!(ready(&hosts[1].1).await, "node-2 is no longer ready");
    assert!(ready(&hosts[2].1).await, "the witness is no longer ready");
    // Two of three voters: still writable (once a new leader is elected, if node-1 led).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while let Err(e) = admin
        .post::<_, Value>(
            "/api/v1/tokens",
            &serde_json::json!({ "name": "two-of-three" }),
        )
        .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no write with one host down: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Lose node-2 as well: only the witness is left, no quorum.
    kill_host(base.path(), "node-2");
    wait_line(&err, "host node-2 exited", Duration::from_secs(10));

    // Running it again starts only the hosts that are down, both at once (neither can be
    // ready without the other).
    let (mut again, out2, _err2) = dev_cluster(base.path(), &["--nodes", "2", "--witness"]);
    let listed = host_urls(&out2);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(ready(&hosts[0].1).await, "node-1 did not come back");
    assert!(ready(&hosts[1].1).await, "node-2 did not come back");
    let witness = format!("serve --data-dir {}", base.path().join("witness").display());
    assert_eq!(
        pids_with(&witness).len(),
        1,
        "the witness was started twice"
    );

    // Ctrl-C (SIGINT to the job's process group) of each stops the hosts it started; nothing
    // of ours is left after.
    signal(&again, nix::sys::signal::Signal::SIGINT);
    assert!(again.wait().expect("wait").success());
    assert!(!alive(&hosts[0].1).await, "node-1 still answers");
    assert!(
        alive(&hosts[2].1).await,
        "the second dev-cluster stopped the witness"
    );
    signal(&child, nix::sys::signal::Signal::SIGINT);
    assert!(child.wait().expect("wait").success());
    wait_none_left(base.path(), Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_restarts_a_dead_host_on_request() {
    use std::time::Duration;
    let base = tempfile::tempdir().expect("tempdir");
    let _reap = Reap(base.path().to_path_buf());
    let (mut child, out, err) =
        dev_cluster(base.path(), &["--nodes", "1", "--restart", "on-failure"]);
    let hosts = host_urls(&out);
    kill_host(base.path(), "node-1");
    wait_line(&err, "restarting node-1", Duration::from_secs(10));
    wait_line(&err, "node-1 is back", Duration::from_secs(60));
    assert!(ready(&hosts[0].1).await, "node-1 is back but not ready");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait().expect("wait").success());
    wait_none_left(base.path(), Duration::from_secs(5));
}

/// `tiering eval` needs no server: the real CloudPhysics trace in, one JSON entry per
/// predictor out; a malformed line is an error naming the file, line and field.
#[test]
fn tiering_eval_reports_every_predictor_and_names_bad_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cli = Cli {
        server: "http://127.0.0.1:9".into(),
        config: dir.path().join("client.toml"),
    };
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/traces/cloudphysics-io.csv");
    if trace.exists() {
        let out = cli.ok(&[
            "-o",
            "json",
            "tiering",
            "eval",
            "--trace",
            trace.to_str().expect("path"),
            "--format",
            "cloudphysics",
            "--extent-mib",
            "64",
            "--window",
            "60",
        ]);
        let v: Value = serde_json::from_str(&out).expect("json");
        let results = v["results"].as_array().expect("results");
        for name in [
            "ensemble",
            "holt-winters",
            "markov",
            "neural",
            "baseline-last-window",
            "baseline-moving-average",
            "baseline-frequency-recency",
            "oracle",
        ] {
            let r = results
                .iter()
                .find(|r| r["name"] == name)
                .unwrap_or_else(|| panic!("{name} missing: {out}"));
            for field in [
                "kind",
                "balanced_accuracy",
                "macro_f1",
                "hit_ratio",
                "bytes_moved",
            ] {
                assert!(!r[field].is_null(), "{name}.{field} missing");
            }
            let ba = r["balanced_accuracy"].as_f64().expect("number");
            assert!((0.0..=1.0).contains(&ba), "{name}: {ba}");
        }
        let oracle = results
            .iter()
            .find(|r| r["kind"] == "oracle")
            .expect("oracle");
        assert!(
            results
                .iter()
                .all(|r| r["hit_ratio"].as_f64() <= oracle["hit_ratio"].as_f64()),
            "nobody beats the oracle's hit ratio: {out}"
        );
    }
    // A synthetic trace written by `tiering synth`, evaluated as CSV.
    let synth = dir.path().join("scan.csv");
    let out = cli.ok(&[
        "tiering",
        "synth",
        "--shape",
        "scan",
        "--seed",
        "3",
        "--out",
        synth.to_str().expect("path"),
    ]);
    assert!(out.contains("requests"), "{out}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "timestamp_s,volume,op,offset,size\n0,a,R,0,4096\n1,a,X,0,4096\n",
    )
    .expect("write");
    let (bad, synth) = (bad.to_str().expect("path"), synth.to_str().expect("path"));
    for (args, want) in [
        (vec![bad, "--format", "csv"], "bad.csv:3: field 'op'"),
        (
            vec![bad, "--format", "parquet"],
            "unknown trace format 'parquet'",
        ),
        (
            vec![synth, "--format", "csv", "--window", "0"],
            "--window must be at least 1 second",
        ),
    ] {
        let mut all = vec!["tiering", "eval", "--trace"];
        all.extend(args);
        let (code, _, err) = cli.run(&all, None);
        assert_ne!(code, 0, "{all:?}");
        assert!(err.contains(want), "{all:?}: {err}");
    }
}
