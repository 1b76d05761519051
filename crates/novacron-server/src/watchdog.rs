//! The fencing watchdog: a small process beside `novacron serve` (`novacron fence-watchdog`),
//! in the role Proxmox gives `watchdog-mux`.
//!
//! In-process fencing (`cluster::lease`) needs a live `novacron`. A `novacron` that crashed,
//! was killed or hangs cannot fence, yet its QEMUs (own process groups) keep running, and once
//! its lease has run out plus the margin, HA starts its `ha` VMs on another host. So after every
//! lease renewal `novacron` tells the watchdog, over a Unix socket in its data dir, when the
//! host must have fenced (`fence_in_ms`: halfway through the fencing budget, still before the
//! lease runs out) and which VMs are HA VMs here. If no newer word comes by then, the watchdog
//! kills those VMs' QEMUs (verified by UUID, like re-adoption) by itself.
//!
//! The watchdog outlives `novacron` (its own process group). A restarted `novacron` connects to
//! the one still running (or starts one), so a quick restart within the lease loses nothing.
//! It exits once nobody is connected and nothing is left to fence.
//!
//! Invariants: the watchdog never starts anything and never touches the replicated state; it
//! only ends QEMUs of VMs it was told about, and only after the deadline it was given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use novacron_types::VmId;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "watchdog.sock";
/// The watchdog's PID, in the data dir.
pub const PIDFILE: &str = "watchdog.pid";
/// How long a new watchdog waits for its first `novacron` before giving up.
const FIRST_CONTACT: Duration = Duration::from_secs(30);

/// One word from `novacron`: fence `vms` in `fence_in_ms` unless told again before.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Feed {
    pub fence_in_ms: u64,
    pub vms: Vec<VmId>,
}

fn log(msg: &str) {
    eprintln!("{} fence-watchdog: {msg}", novacron_types::now_millis());
}

/// The watchdog process (`novacron fence-watchdog --data-dir DIR`).
pub async fn run(data_dir: &Path) -> std::io::Result<()> {
    let sock = data_dir.join(SOCKET);
    if UnixStream::connect(&sock).await.is_ok() {
        log("another watchdog already serves this data dir");
        return Ok(());
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    std::fs::write(data_dir.join(PIDFILE), std::process::id().to_string())?;
    let vms_root = data_dir.join("vms");
    let mut deadline: Option<Instant> = None;
    let mut vms: Vec<VmId> = Vec::new();
    let mut conn: Option<tokio::io::Lines<BufReader<UnixStream>>> = None;
    let mut idle_until = Some(Instant::now() + FIRST_CONTACT);
    log(&format!("watching {}", data_dir.display()));
    loop {
        if conn.is_none() && deadline.is_none() {
            match idle_until {
                Some(t) if Instant::now() < t => {}
                _ => break,
            }
        }
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((s, _)) = accepted {
                    conn = Some(BufReader::new(s).lines());
                    idle_until = None;
                }
            }
            line = next_line(&mut conn) => match line {
                Some(text) => match serde_json::from_str::<Feed>(&text) {
                    Ok(feed) => {
                        deadline = Some(Instant::now() + Duration::from_millis(feed.fence_in_ms));
                        vms = feed.vms;
                    }
                    Err(e) => log(&format!("ignoring a malformed feed ({e}): {text}")),
                },
                None => {
                    conn = None;
                    if deadline.is_some() && !vms.is_empty() {
                        log("novacron went away; fencing at the deadline unless it returns");
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                deadline = None;
                for id in &vms {
                    if novacron_hypervisor::qemu::kill_vm_process(&vms_root, *id) {
                        log(&format!("no lease renewal in time: killed the QEMU of HA VM {id}"));
                    }
                }
            }
            // Wake now and then to notice a data dir that is gone (a removed host).
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !data_dir.exists() {
            break;
        }
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(data_dir.join(PIDFILE));
    log("exiting: nobody connected and nothing to fence");
    Ok(())
}

async fn next_line(conn: &mut Option<tokio::io::Lines<BufReader<UnixStream>>>) -> Option<String> {
    match conn {
        Some(lines) => lines.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// `novacron`'s side: feeds the watchdog, starting it when none runs.
pub struct Watchdog {
    data_dir: PathBuf,
    /// The `novacron` binary (`None`: no watchdog, for in-process test nodes).
    exe: Option<PathBuf>,
    conn: tokio::sync::Mutex<Option<UnixStream>>,
}

impl Watchdog {
    pub fn new(data_dir: PathBuf, exe: Option<PathBuf>) -> Self {
        Self {
            data_dir,
            exe,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Tells the watchdog the new fencing deadline and the HA VMs here.
    pub async fn feed(&self, fence_in: Duration, vms: Vec<VmId>) {
        if self.exe.is_none() {
            return;
        }
        let mut line = match serde_json::to_vec(&Feed {
            fence_in_ms: fence_in.as_millis() as u64,
            vms,
        }) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut conn = self.conn.lock().await;
        for _ in 0..2 {
            if conn.is_none() {
                *conn = self.connect().await;
            }
            let Some(s) = conn.as_mut() else {
                return;
            };
            if s.write_all(&line).await.is_ok() {
                return;
            }
            *conn = None;
        }
    }

    async fn connect(&self) -> Option<UnixStream> {
        let sock = self.data_dir.join(SOCKET);
        if let Ok(s) = UnixStream::connect(&sock).await {
            return Some(s);
        }
        let exe = self.exe.as_ref()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("watchdog.log"))
            .ok()?;
        let spawned = tokio::process::Command::new(exe)
            .arg("fence-watchdog")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: it must outlive this process and its signals.
            .process_group(0)
            .kill_on_drop(false)
            .spawn();
        if let Err(e) = spawned {
            tracing::error!("cannot start the fencing watchdog: {e}");
            return None;
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(s) = UnixStream::connect(&sock).await {
                tracing::info!("fencing watchdog started");
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::error!("the fencing watchdog did not come up");
        None
    }
}
