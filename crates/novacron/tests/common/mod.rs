//! Test harness: real `novacron serve` processes on free loopback ports with temporary data dirs.
//! Dropping a [`Node`] kills the process and every QEMU it started (they run in their own process
//! groups and would otherwise outlive the test).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod chaos;
pub mod cluster;

use novacron_client::Client;
use novacron_types::{CreateVmRequest, Vm, VmState};

pub const ADMIN_PASSWORD: &str = "test-admin-password";

pub fn demo_dir() -> PathBuf {
    std::env::var_os("NOVACRON_DEMO_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.novacron/demo-image")
        })
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub url: String,
    child: Option<Child>,
    pub stdout_lines: Vec<String>,
    /// Extra `serve` arguments, kept for restarts.
    extra: Vec<String>,
}

impl Node {
    pub fn start() -> Node {
        let dir = tempfile::Builder::new()
            .prefix("nc")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, "127.0.0.1:0", Vec::new())
    }

    /// Starts a node with extra `serve` arguments (cluster timings, `--join`, ...).
    pub fn start_with(extra: Vec<String>) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("nc")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, "127.0.0.1:0", extra)
    }

    /// A stand-in with no process, for moving a real node out of a struct for a while.
    pub fn placeholder() -> Node {
        Node {
            dir: tempfile::tempdir().expect("tempdir"),
            url: String::new(),
            child: None,
            stdout_lines: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Starts a node listening on `listen` (`IP:PORT`).
    pub fn start_listening(listen: &str, extra: Vec<String>) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("nc")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, listen, extra)
    }

    fn start_in(dir: tempfile::TempDir, listen: &str, extra: Vec<String>) -> Node {
        let (child, url, lines) = spawn(dir.path(), listen, &extra);
        Node {
            dir,
            url,
            child: Some(child),
            stdout_lines: lines,
            extra,
        }
    }

    /// The address the process listens on (differs from `url` behind a proxy).
    pub fn bound(&self) -> String {
        self.stdout_lines
            .iter()
            .find_map(|l| l.split("(bound ").nth(1))
            .and_then(|r| r.split([',', ')']).next())
            .map(str::to_string)
            .unwrap_or_else(|| self.url.trim_start_matches("http://").to_string())
    }

    /// Sends a signal to the `novacron` process (SIGSTOP/SIGCONT for pauses).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills `novacron` (SIGKILL, like a crash) and starts it again on the same data dir and port.
    pub fn restart(mut self) -> Node {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        let listen = self.url.trim_start_matches("http://").to_string();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("placeholder"));
        // A joined node has its identity now; it must not try to join again.
        let extra = without_join(std::mem::take(&mut self.extra));
        // `self` drops here with a placeholder dir and no child: nothing of the real node is killed.
        Self::start_in(dir, &listen, extra)
    }

    /// Kills `novacron` with SIGKILL and leaves it down (see [`Node::start_again`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a killed node again on its data dir and port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        let listen = self.bound();
        self.extra = without_join(std::mem::take(&mut self.extra));
        let (child, url, lines) = spawn(self.dir.path(), &listen, &self.extra);
        assert_eq!(url, self.url, "restarted on another address");
        self.child = Some(child);
        self.stdout_lines = lines;
    }

    pub async fn admin(&self) -> Client {
        let c = Client::new(&self.url, None);
        let token = c.login("admin", ADMIN_PASSWORD).await.expect("login");
        c.with_token(token)
    }

    /// What the node has logged so far (its standard error, every run on this data dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(STDERR_LOG)).unwrap_or_default()
    }

    /// PIDs of QEMU processes this node started (from pidfiles).
    pub fn qemu_pids(&self) -> Vec<i32> {
        qemu_pids(&self.data_dir().join("vms"))
    }
}

/// Starts `novacron serve` on `dir` and waits for its "listening on" line.
fn spawn(dir: &Path, listen: &str, extra: &[String]) -> (Child, String, Vec<String>) {
    let (mut child, rx) = launch(dir, listen, extra);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lines = Vec::new();
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("novacron did not report its address; output: {lines:?}")
        });
        lines.push(line.clone());
        if let Some(rest) = line.split(" listening on ").nth(1) {
            break rest.split_whitespace().next().expect("url").to_string();
        }
    };
    (child, url, lines)
}

/// Starts `novacron serve` on `dir`; its standard output comes line by line on the receiver.
fn launch(
    dir: &Path,
    listen: &str,
    extra: &[String],
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let demo = demo_dir();
    assert!(
        demo.join("image.json").exists(),
        "demo image missing at {}: run scripts/build-demo-image.sh (scripts/test.sh does)",
        demo.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_novacron"))
        .args([
            "serve",
            "--accel",
            "tcg",
            "--listen",
            listen,
            "--shutdown-timeout",
            "20",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--demo-image")
        .arg(&demo)
        .args(extra)
        .env("NOVACRON_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("NOVACRON_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn novacron");
    keep_stderr(&mut child, &dir.join(STDERR_LOG), listen);
    let rx = stdout_lines(&mut child);
    (child, rx)
}

/// A free TCP port on `ip` (bound and released: another process could take it in between,
/// which on loopback in a test run does not happen in practice).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Node {
    /// Starts a node on a free port without waiting for it to be ready; its standard output
    /// comes on the returned receiver (for tests of start-up itself).
    pub fn start_unready(extra: Vec<String>) -> (Node, std::sync::mpsc::Receiver<String>) {
        let dir = tempfile::Builder::new()
            .prefix("nc")
            .tempdir()
            .expect("tempdir");
        let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let (child, rx) = launch(dir.path(), &listen, &extra);
        let node = Node {
            dir,
            url: format!("http://{listen}"),
            child: Some(child),
            stdout_lines: Vec::new(),
            extra,
        };
        (node, rx)
    }

    /// Stops `novacron` the way a service manager or Ctrl-C does (SIGINT) and waits for it to
    /// exit, at most `within`. Returns whether it did.
    pub fn stop_gracefully(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// PIDs of processes whose command line contains `needle` (for example a data dir).
pub fn pids_with(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Where a node's log (its standard error) is kept, in the node's temporary directory, across
/// restarts.
pub const STDERR_LOG: &str = "novacron.stderr";

/// Copies the child's standard error to the test's (so a failing test shows it), each line
/// prefixed with `label` (which host said it), and appends it to `file` (so a test can read
/// what the node logged).
pub fn keep_stderr(child: &mut Child, file: &Path, label: &str) {
    let label = label.to_string();
    use std::io::Write;
    let stderr = child.stderr.take().expect("stderr piped");
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .expect("stderr log");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            let _ = writeln!(out, "{line}");
        }
    });
}

/// The child's standard output, line by line, read on a thread so the test can wait with a
/// timeout.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn without_join(extra: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = extra.into_iter();
    while let Some(a) = it.next() {
        if a == "--join" || a == "--token" {
            it.next();
        } else {
            out.push(a);
        }
    }
    out
}

pub fn qemu_pids(vms: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        if let Some(pid) = std::fs::read_to_string(entry.path().join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut pids = qemu_pids(&self.data_dir().join("vms"));
        // The fencing watchdog `serve` started beside itself.
        pids.extend(
            std::fs::read_to_string(self.data_dir().join("watchdog.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.windows(14).any(|w| w == b"fence-watchdog"))
                }),
        );
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub fn demo_vm(name: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        image: "demo".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![],
        boot: None,
        node: None,
        placement: Default::default(),
        pool: None,
        ha: false,
    }
}

/// The demo VM booted with `extra` on its kernel command line (`novacron.diskwrite=4`,
/// `novacron.dirty=16`, `novacron.seqwrite=vdb`: see `scripts/build-demo-image.sh`).
pub fn demo_vm_with(name: &str, extra: &str) -> CreateVmRequest {
    let demo = demo_dir();
    let path = |f: &str| demo.join(f).to_string_lossy().into_owned();
    CreateVmRequest {
        boot: Some(novacron_types::KernelBoot {
            kernel: path("vmlinuz"),
            initrd: Some(path("initrd.img")),
            cmdline: Some(format!("console=ttyS0 quiet panic=-1 {extra}")),
        }),
        ..demo_vm(name)
    }
}

/// Polls the VM until `pred` holds, or panics after `timeout`.
pub async fn wait_vm(
    c: &Client,
    vm: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Vm) -> bool,
) -> Vm {
    let deadline = Instant::now() + timeout;
    loop {
        let v = c.get_vm(vm).await.expect("get vm");
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm} not {what} after {timeout:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_state(c: &Client, vm: &str, state: VmState, timeout: Duration) -> Vm {
    wait_vm(c, vm, timeout, state.as_str(), |v| v.state == state).await
}

pub async fn console_text(c: &Client, vm: &str) -> String {
    let (bytes, _) = c.console(vm, Some(0), None).await.expect("console");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Waits until the console contains `needle` `count` times.
/// Starts VM `vm` and waits for the start to succeed.
#[allow(dead_code)]
pub async fn start_vm(c: &Client, vm: &str) {
    let op = c.vm_action(vm, "start").await.expect("start");
    c.wait_success(&op, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("starting {vm}: {e}"));
}

pub async fn wait_console(
    c: &Client,
    vm: &str,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console_text(c, vm).await;
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "console of {vm} lacks {count}x {needle:?} after {timeout:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The highest `tick N` on the console since the last READY line (the current boot).
pub fn last_tick(text: &str) -> u64 {
    let boot = text
        .rsplit("NOVACRON-DEMO-GUEST READY")
        .next()
        .unwrap_or("");
    boot.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// The CLI binary pointed at one host, with its own config file.
pub struct Cli {
    pub server: String,
    pub config: std::path::PathBuf,
}

impl Cli {
    /// Runs `novacron ARGS`: exit code, stdout, stderr.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_novacron"))
            .args(args)
            .env("NOVACRON_SERVER", &self.server)
            .env("NOVACRON_CONFIG", &self.config)
            .env_remove("NOVACRON_TOKEN")
            .env_remove("NOVACRON_PASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cli");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs it and insists on exit code 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args, None);
        assert_eq!(code, 0, "novacron {args:?} failed: {err}");
        out
    }
}
