//! The fencing watchdog: a small process beside `novacron serve` (`novacron fence-watchdog`),
//! in the role Proxmox gives `watchdog-mux`.
//!
//! In-process fencing (`cluster::lease`) needs a live `novacron`. A `novacron` that crashed,
//! was killed or hangs cannot fence, yet its QEMUs (own process groups) keep running, and once
//! its lease has run out plus the margin, HA starts its `ha` VMs on another host. So after every
//! lease renewal `novacron` tells the watchdog, over a Unix socket in its data dir, when the
//! host must have fenced: an absolute `CLOCK_MONOTONIC` time (halfway through the fencing
//! budget, still before the lease runs out), so a slow delivery cannot move it later. If no
//! newer word comes by then, the watchdog kills the QEMU of every VM here whose disks are on a
//! shared pool (any of them could be started elsewhere: HA now, or an operator turning HA on
//! for a VM of a dead host), verified by UUID like re-adoption, and keeps doing so every 100 ms
//! until a new deadline comes (a start that was stalled past the deadline dies at once).
//!
//! The watchdog outlives `novacron` (its own process group). A restarted `novacron` connects to
//! the one still running (or starts one), so a quick restart within the lease loses nothing.
//! It exits once nobody is connected and nothing is left to fence. A `novacron` that stops
//! cleanly says so last: the watchdog then exits at once if no VM on a shared pool runs here,
//! and otherwise still fences them at the deadline (their lease runs out all the same), then
//! exits. A `novacron` killed or hung never says so, and the watchdog keeps its purpose.
//!
//! Invariants: the watchdog never starts anything and never touches the replicated state; it
//! only ends QEMUs of VMs on shared pools, and only after the deadline it was given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "watchdog.sock";
/// The watchdog's PID, in the data dir.
pub const PIDFILE: &str = "watchdog.pid";
/// How long a new watchdog waits for its first `novacron` before giving up.
const FIRST_CONTACT: Duration = Duration::from_secs(30);

/// One word from `novacron`: fence at `fence_at_ns` (`CLOCK_MONOTONIC`) unless told again.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Feed {
    pub fence_at_ns: u64,
    /// `novacron` is stopping cleanly and will not feed again (its last word). An older
    /// watchdog ignores the field and keeps the deadline, which is also safe.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the same clock in every process of the host).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How often the watchdog sweeps once its deadline has passed.
const SWEEP: Duration = Duration::from_millis(100);

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
    // The deadline, and whether it has passed (from then on: sweep until a new one comes).
    let mut deadline: Option<Instant> = None;
    let mut expired = false;
    // The last word was a clean stop.
    let mut stopping = false;
    let mut conn: Option<tokio::io::Lines<BufReader<UnixStream>>> = None;
    let mut idle_until = Some(Instant::now() + FIRST_CONTACT);
    log(&format!("watching {}", data_dir.display()));
    loop {
        // Nobody left to start a QEMU, and nothing pending: done.
        if conn.is_none()
            && deadline.is_none()
            && (expired || idle_until.is_none_or(|t| Instant::now() >= t))
        {
            break;
        }
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((s, _)) = accepted {
                    conn = Some(BufReader::new(s).lines());
                    idle_until = None;
                    stopping = false;
                }
            }
            line = next_line(&mut conn) => match line {
                Some(text) => match serde_json::from_str::<Feed>(&text) {
                    Ok(feed) => {
                        let left = feed.fence_at_ns.saturating_sub(monotonic_ns());
                        deadline = Some(Instant::now() + Duration::from_nanos(left));
                        expired = false;
                        stopping = feed.stopping;
                    }
                    Err(e) => log(&format!("ignoring a malformed feed ({e}): {text}")),
                },
                None => {
                    conn = None;
                    if stopping {
                        let running = novacron_hypervisor::qemu::shared_disk_vms_running(&vms_root);
                        if running.is_empty() {
                            log("novacron stopped cleanly and no VM on a shared pool runs here");
                            deadline = None;
                            expired = true;
                        } else {
                            log(&format!(
                                "novacron stopped; {} VM(s) on shared pools still run here and \
                                 are fenced at the deadline unless it returns",
                                running.len()
                            ));
                        }
                    } else if deadline.is_some() {
                        log("novacron went away; fencing at the deadline unless it returns");
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                deadline = None;
                expired = true;
                log("no lease renewal in time: fencing the VMs on shared pools");
                sweep(&vms_root);
            }
            _ = tokio::time::sleep(SWEEP), if expired && conn.is_some() => sweep(&vms_root),
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

fn sweep(vms_root: &Path) {
    for id in novacron_hypervisor::qemu::kill_shared_disk_vms(vms_root) {
        log(&format!(
            "killed the QEMU of VM {id} (disks on a shared pool)"
        ));
    }
}

/// Sends each newest feed, (re)connecting (and starting the watchdog) as needed. Ends after
/// delivering a clean stop.
async fn deliver(w: std::sync::Arc<Watchdog>, mut rx: tokio::sync::watch::Receiver<Option<Feed>>) {
    let mut conn: Option<UnixStream> = None;
    while rx.changed().await.is_ok() {
        let Some(feed) = *rx.borrow_and_update() else {
            continue;
        };
        let Ok(mut line) = serde_json::to_vec(&feed) else {
            continue;
        };
        line.push(b'\n');
        for _ in 0..2 {
            if conn.is_none() {
                conn = w.connect().await;
            }
            let Some(s) = conn.as_mut() else {
                break;
            };
            if s.write_all(&line).await.is_ok() {
                break;
            }
            conn = None;
        }
        if feed.stopping {
            if let Some(mut s) = conn.take() {
                let _ = s.shutdown().await;
            }
            w.delivered_stop.notify_one();
            return;
        }
    }
}

async fn next_line(conn: &mut Option<tokio::io::Lines<BufReader<UnixStream>>>) -> Option<String> {
    match conn {
        Some(lines) => lines.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// `novacron`'s side: feeds the watchdog, starting it when none runs. Feeding never blocks
/// the caller: the newest deadline goes to a task that delivers it.
pub struct Watchdog {
    data_dir: PathBuf,
    /// The `novacron` binary (`None`: no watchdog, for in-process test nodes).
    exe: Option<PathBuf>,
    latest: tokio::sync::watch::Sender<Option<Feed>>,
    /// Told when the clean-stop word has gone out.
    delivered_stop: tokio::sync::Notify,
}

impl Watchdog {
    pub fn new(data_dir: PathBuf, exe: Option<PathBuf>) -> std::sync::Arc<Self> {
        let (latest, rx) = tokio::sync::watch::channel(None);
        let w = std::sync::Arc::new(Self {
            data_dir,
            exe,
            latest,
            delivered_stop: tokio::sync::Notify::new(),
        });
        if w.exe.is_some() {
            tokio::spawn(deliver(w.clone(), rx));
        }
        w
    }

    /// The host must have fenced within `fence_in` from now, unless fed again. Ignored once
    /// [`Watchdog::stop`] was called.
    pub fn feed(&self, fence_in: Duration) {
        let fence_at_ns = monotonic_ns() + fence_in.as_nanos() as u64;
        self.latest.send_if_modified(|latest| {
            if latest.is_some_and(|f| f.stopping) {
                return false;
            }
            *latest = Some(Feed {
                fence_at_ns,
                stopping: false,
            });
            true
        });
    }

    /// `novacron` is stopping cleanly: the last word to the watchdog, keeping the deadline it
    /// already has. Waits (briefly) until it has gone out.
    pub async fn stop(&self) {
        let mut sent = false;
        self.latest.send_if_modified(|latest| match latest {
            Some(f) if !f.stopping => {
                f.stopping = true;
                sent = true;
                true
            }
            _ => false,
        });
        if sent && self.exe.is_some() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.delivered_stop.notified()).await;
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
