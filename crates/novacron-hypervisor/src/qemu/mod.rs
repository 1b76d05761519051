//! The QEMU driver: one `qemu-system-x86_64` per VM, in its own process group so it outlives
//! `novacron`, with a QMP socket, a pidfile and a console log in the VM's directory.

pub mod args;
pub mod console;
pub mod copy;
mod migration;
pub mod qmp_raw;
pub mod runner;
pub mod state_map;
mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{broadcast, mpsc, watch};

use novacron_types::{VmId, VmState};

use crate::accel::Accel;
use crate::{HvError, Hypervisor, HypervisorInfo, RuntimeSpec, StateChange, disks};
use args::VmPaths;
use runner::{QmpAction, Registry, Request, Runner, VmHandle, pid_alive, sigkill};

/// Unix socket paths are limited to 107 bytes.
const MAX_SOCKET_PATH: usize = 107;
/// How long a single QMP command may take before the driver stops waiting for it.
const QMP_DEADLINE: Duration = Duration::from_secs(10);
/// How often a graceful stop presses the ACPI power button again.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(3);
/// The default size at which a running VM's console log is rotated.
pub const CONSOLE_MAX_BYTES: u64 = 4 << 20;

pub struct QemuConfig {
    /// Directory holding one sub-directory per VM.
    pub vms_root: PathBuf,
    pub qemu_binary: String,
    pub accel: Accel,
    /// How long `start` waits for QMP to answer.
    pub start_timeout: Duration,
    /// A running VM's console log is rotated to `console.log.1` once it grows past this (so a
    /// guest writing to its serial port cannot fill the host's disk).
    pub console_max_bytes: u64,
}

pub struct QemuHypervisor {
    cfg: QemuConfig,
    version: String,
    registry: Registry,
    generation: AtomicU64,
    bus: broadcast::Sender<StateChange>,
    /// Held (shared) by every launch from its check to its QEMU being registered; `true` once
    /// `detach_all` has closed the driver (taken exclusively, so it waits for launches in
    /// flight).
    launches: tokio::sync::RwLock<bool>,
}

impl QemuHypervisor {
    pub async fn new(cfg: QemuConfig) -> Result<Self, HvError> {
        std::fs::create_dir_all(&cfg.vms_root)?;
        let out = Command::new(&cfg.qemu_binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                HvError::StartFailed(format!(
                    "cannot run {}: {e} (is qemu-system-x86 installed?)",
                    cfg.qemu_binary
                ))
            })?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.split("version ").nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or(v).to_string())
            .unwrap_or_else(|| "unknown".into());
        let (bus, _) = broadcast::channel(1024);
        Ok(Self {
            cfg,
            version,
            registry: Arc::new(Mutex::new(HashMap::new())),
            generation: AtomicU64::new(1),
            bus,
            launches: tokio::sync::RwLock::new(false),
        })
    }

    fn paths(&self, id: VmId) -> VmPaths {
        VmPaths::new(&self.cfg.vms_root, id)
    }

    fn handle(&self, id: VmId) -> Option<VmHandle> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn running(&self, id: VmId) -> Result<VmHandle, HvError> {
        self.handle(id).ok_or(HvError::NotRunning(id))
    }

    /// The PID in the VM's pidfile, if that process is alive and really is this VM's QEMU.
    fn live_pid(&self, id: VmId) -> Option<i32> {
        verified_pid(&self.cfg.vms_root, id)
    }

    /// Connects to a QEMU that is up and starts its runner.
    async fn attach(
        &self,
        id: VmId,
        pid: i32,
        child: Option<tokio::process::Child>,
        connect_timeout: Duration,
    ) -> Result<VmState, HvError> {
        let paths = self.paths(id);
        let socket = paths.qmp_socket();
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut child = child;
        let (qmp, events) = loop {
            match runner::connect(&socket).await {
                Ok(c) => break c,
                Err(e) => {
                    if let Some(c) = &mut child {
                        if let Ok(Some(status)) = c.try_wait() {
                            return Err(HvError::StartFailed(format!(
                                "QEMU exited ({status}) before QMP was ready: {}",
                                last_lines(&paths.qemu_log(), 5)
                            )));
                        }
                    } else if !pid_alive(pid) {
                        return Err(HvError::NotRunning(id));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        if let Some(c) = &mut child {
                            let _ = c.kill().await;
                        }
                        return Err(HvError::Timeout {
                            what: "connecting to QMP",
                            after: connect_timeout,
                        })
                        .map_err(|t| HvError::StartFailed(format!("{t}: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let (state, _reason) = match runner::query_state(&qmp).await {
            Ok(s) => s,
            Err(e) => {
                // A QEMU we just spawned and cannot manage must not be left behind.
                if let Some(c) = &mut child {
                    let _ = c.kill().await;
                }
                return Err(e);
            }
        };
        let (state_tx, state_rx) = watch::channel(state);
        let (jobs_tx, jobs_rx) = watch::channel(0);
        let (tx, rx) = mpsc::channel(16);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let handle = VmHandle {
            generation,
            pid,
            tx,
            state: state_rx,
            job_events: jobs_rx,
        };
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, handle);
        let runner = Runner {
            id,
            generation,
            pid,
            child,
            qmp,
            events,
            socket,
            qemu_log: paths.qemu_log(),
            pidfile: paths.pidfile(),
            state_tx,
            jobs_tx,
            bus: self.bus.clone(),
            registry: self.registry.clone(),
            console: console::Rotation::new(paths.console_log(), self.cfg.console_max_bytes),
            stop_requested: false,
            quit_sent: false,
            guest_shutdown: false,
            qmp_lost: false,
        };
        let _ = self.bus.send(StateChange {
            id,
            state,
            reason: None,
        });
        tokio::spawn(runner.run(rx));
        Ok(state)
    }
}

/// `query-blockstats`' reply as (disk name, counters): the name is the block node's
/// (`root`, `disk1`, ... as `args::command_line` names them); nodes of migrations are left out.
fn parse_blockstats(reply: &serde_json::Value) -> Vec<(String, crate::DiskCounters)> {
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    reply
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            // The guest device's name first: a disk moved to another file has a new node.
            let name = e["qdev"]
                .as_str()
                .and_then(|q| q.split('/').find(|p| p.ends_with("-dev")))
                .map(|p| p.trim_end_matches("-dev"))
                .or_else(|| e["node-name"].as_str().filter(|n| !n.is_empty()))?;
            if name.starts_with("mig-") {
                return None;
            }
            let st = &e["stats"];
            Some((
                name.to_string(),
                crate::DiskCounters {
                    rd_bytes: u(&st["rd_bytes"]),
                    wr_bytes: u(&st["wr_bytes"]),
                    rd_ops: u(&st["rd_operations"]),
                    wr_ops: u(&st["wr_operations"]),
                },
            ))
        })
        .collect()
}

/// The PID in the pidfile of VM `id` under `vms_root`, if that process is alive and really is
/// this VM's QEMU (its UUID is on the command line).
fn verified_pid(vms_root: &Path, id: VmId) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(VmPaths::new(vms_root, id).pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = id.to_string();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == needle.as_bytes());
    (ours && pid_alive(pid)).then_some(pid)
}

/// Kills the QEMU of VM `id` under `vms_root`, if one runs, without a driver (the fencing
/// watchdog runs outside `novacron`). Returns whether a process was killed.
pub fn kill_vm_process(vms_root: &Path, id: VmId) -> bool {
    match verified_pid(vms_root, id) {
        Some(pid) => {
            sigkill(pid);
            true
        }
        None => false,
    }
}

/// The VMs under `vms_root` whose disks are on a shared pool and whose QEMU runs (verified by
/// UUID): another host could start such a VM once this one's lease is gone.
pub fn shared_disk_vms_running(vms_root: &Path) -> Vec<VmId> {
    std::fs::read_dir(vms_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join(SHARED_MARK).exists())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<VmId>().ok())
        .filter(|id| verified_pid(vms_root, *id).is_some())
        .collect()
}

/// Kills every QEMU under `vms_root` whose VM has its disks on a shared pool. For the fencing
/// watchdog. Returns the VMs whose QEMU was killed.
pub fn kill_shared_disk_vms(vms_root: &Path) -> Vec<VmId> {
    shared_disk_vms_running(vms_root)
        .into_iter()
        .filter(|id| kill_vm_process(vms_root, *id))
        .collect()
}

/// In a VM's directory: its disks are links into a shared pool (not this host's to delete).
const SHARED_MARK: &str = "shared-disks";

/// Links each disk that lives in a pool's directory from the VM's directory (replacing stale
/// links).
fn link_pool_disks(spec: &RuntimeSpec, paths: &VmPaths) -> Result<(), HvError> {
    if !spec.in_pools() {
        return Ok(());
    }
    if spec.shared_disks {
        std::fs::write(paths.dir.join(SHARED_MARK), b"")?;
    }
    for (i, link) in paths.disks(spec.extra_disks_mib.len()).iter().enumerate() {
        let Some(real) = pool_file(spec, i, link) else {
            continue;
        };
        if !real.exists() {
            return Err(HvError::Missing(format!(
                "disk {} is missing from the pool",
                real.display()
            )));
        }
        replace_link(&real, link)?;
    }
    Ok(())
}

/// Where disk `i` (named like its `link` in the VM's directory) lives in its pool, if it does.
fn pool_file(spec: &RuntimeSpec, i: usize, link: &Path) -> Option<PathBuf> {
    Some(spec.disk_dir(i)?.join(link.file_name()?))
}

/// Makes `link` a symbolic link to `real`, replacing whatever is there (a link, or the disk's
/// old file once it has been copied to `real`) in one step: the VM's directory never lacks
/// the disk.
pub fn relink(real: &Path, link: &Path) -> Result<(), HvError> {
    let tmp = link.with_extension("link-new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(real, &tmp)?;
    std::fs::rename(&tmp, link)?;
    Ok(())
}

/// [`relink`], refusing to replace a real file (a disk) with a link.
fn replace_link(real: &Path, link: &Path) -> Result<(), HvError> {
    if let Ok(m) = std::fs::symlink_metadata(link)
        && !m.file_type().is_symlink()
    {
        return Err(HvError::StartFailed(format!(
            "{} is a file, not a link to the pool",
            link.display()
        )));
    }
    relink(real, link)
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[async_trait::async_trait]
impl Hypervisor for QemuHypervisor {
    fn info(&self) -> HypervisorInfo {
        HypervisorInfo {
            qemu_version: self.version.clone(),
            accelerator: self.cfg.accel.as_str().into(),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.bus.subscribe()
    }

    async fn define(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        let paths = self.paths(spec.id);
        if paths.qmp_socket().as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HvError::StartFailed(format!(
                "the VM directory {} is too deep for a Unix socket; use a shorter --data-dir",
                paths.dir.display()
            )));
        }
        std::fs::create_dir_all(&paths.dir)?;
        // A disk in a pool is made in the pool's directory, linked from the VM's.
        let files: Vec<PathBuf> = paths
            .disks(spec.extra_disks_mib.len())
            .iter()
            .enumerate()
            .map(|(i, link)| pool_file(spec, i, link).unwrap_or_else(|| link.clone()))
            .collect();
        let result = async {
            for (i, file) in files.iter().enumerate() {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                match i.checked_sub(1) {
                    None => {
                        let (base, format) = (&spec.base_image, spec.base_format);
                        disks::create_overlay_sized(base, format, file, spec.root_size).await?
                    }
                    Some(e) => disks::create_blank(file, spec.extra_disks_mib[e]).await?,
                }
            }
            link_pool_disks(spec, &paths)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&paths.dir);
            for dir in spec.disk_dirs.iter().flatten() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        result
    }

    async fn link_disks(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        let paths = self.paths(spec.id);
        if !spec.in_pools() {
            return Err(HvError::Unsupported(
                "the VM's disks are not in a storage pool".into(),
            ));
        }
        std::fs::create_dir_all(&paths.dir)?;
        link_pool_disks(spec, &paths)
    }

    async fn remove_pool_disks(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        if !spec.in_pools() {
            return Ok(());
        }
        if self.handle(spec.id).is_some() || self.live_pid(spec.id).is_some() {
            return Err(HvError::AlreadyRunning(spec.id));
        }
        let links = self.paths(spec.id).disks(spec.extra_disks_mib.len());
        for (i, link) in links.iter().enumerate() {
            if let Some(file) = pool_file(spec, i, link) {
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // The VM's directories in the pools, once empty.
        for dir in spec.disk_dirs.iter().flatten() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    async fn undefine(&self, id: VmId) -> Result<(), HvError> {
        if self.handle(id).is_some() || self.live_pid(id).is_some() {
            return Err(HvError::AlreadyRunning(id));
        }
        let dir = self.paths(id).dir;
        // Disks in a local pool are this host's copy and go with the VM's directory; disks in
        // a shared pool belong to the VM wherever it runs: only the links go.
        if !dir.join(SHARED_MARK).exists()
            && let Ok(entries) = std::fs::read_dir(&dir)
        {
            for link in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                if let Ok(real) = std::fs::read_link(&link) {
                    let _ = std::fs::remove_file(&real);
                    if let Some(parent) = real.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn start(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        self.launch(spec, &[]).await
    }

    async fn incoming_start(
        &self,
        spec: &RuntimeSpec,
        plan: &crate::IncomingPlan,
    ) -> Result<(), HvError> {
        migration::incoming_start(self, spec, plan).await
    }

    async fn incoming_finish(&self, id: VmId) -> Result<(), HvError> {
        migration::incoming_finish(self, id).await
    }

    async fn incoming_abort(&self, id: VmId) -> Result<(), HvError> {
        migration::incoming_abort(self, id).await
    }

    async fn outgoing_mirror(
        &self,
        spec: &RuntimeSpec,
        plan: &crate::IncomingPlan,
        tuning: &crate::MigrationTuning,
    ) -> Result<(), HvError> {
        migration::outgoing_mirror(self, spec, plan, tuning).await
    }

    async fn outgoing_migrate(
        &self,
        id: VmId,
        plan: &crate::IncomingPlan,
        tuning: &crate::MigrationTuning,
    ) -> Result<(), HvError> {
        migration::outgoing_migrate(self, id, plan, tuning).await
    }

    async fn outgoing_status(&self, id: VmId) -> Result<crate::MigrationStats, HvError> {
        migration::outgoing_status(self, id).await
    }

    async fn outgoing_wait(&self, id: VmId, seen: u64, at_most: Duration) -> u64 {
        let Some(h) = self.handle(id) else {
            tokio::time::sleep(at_most).await;
            return seen;
        };
        let mut rx = h.job_events.clone();
        let _ = tokio::time::timeout(at_most, rx.wait_for(|n| *n != seen)).await;
        *rx.borrow()
    }

    async fn outgoing_switchover(&self, spec: &RuntimeSpec) -> Result<(), HvError> {
        migration::outgoing_switchover(self, spec).await
    }

    async fn outgoing_postcopy(&self, id: VmId) -> Result<(), HvError> {
        migration::raw(
            self,
            id,
            qmp_raw::RawCommand::MigrateStartPostcopy(qmp_raw::none()),
        )
        .await
        .map(drop)
    }

    async fn outgoing_cancel(&self, id: VmId) -> Result<(), HvError> {
        migration::outgoing_cancel(self, id).await
    }

    async fn outgoing_complete(&self, id: VmId) -> Result<(), HvError> {
        migration::outgoing_complete(self, id).await
    }

    async fn shutdown(&self, id: VmId, timeout: Duration) -> Result<(), HvError> {
        let h = self.running(id)?;
        let deadline = tokio::time::Instant::now() + timeout;
        // The ACPI power button is an event, not a state: a guest still booting (no handler yet)
        // loses it. Press it again every few seconds until the guest goes or time runs out.
        loop {
            // A QMP command has no deadline of its own; a hung QEMU must not hang the stop.
            // Dropping the reply is safe: the runner owns the command and finishes it.
            match tokio::time::timeout(QMP_DEADLINE, h.qmp(QmpAction::Powerdown)).await {
                // QEMU may have exited between two presses: that is the success we wait for.
                // QEMU may have exited between two presses: that is the success we wait for.
                // Otherwise the button cannot be pressed: force the VM off, as promised.
                Ok(Err(e)) => {
                    if h.wait_gone(Duration::from_secs(2)).await {
                        return Ok(());
                    }
                    tracing::info!(vm = %id, "ACPI power-down failed ({e}); forcing");
                    break;
                }
                Ok(Ok(())) => {}
                Err(_) => break,
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if h.wait_gone(left.min(POWERDOWN_REPEAT)).await {
                return Ok(());
            }
        }
        tracing::info!(vm = %id, ?timeout, "guest did not power off; forcing");
        self.force_stop(id).await
    }

    async fn force_stop(&self, id: VmId) -> Result<(), HvError> {
        let Some(h) = self.handle(id) else {
            // A verified QEMU nobody manages (re-adoption failed): end it by signal.
            let pid = self.live_pid(id).ok_or(HvError::NotRunning(id))?;
            sigkill(pid);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) {
                if tokio::time::Instant::now() >= deadline {
                    return Err(HvError::Timeout {
                        what: "killing QEMU",
                        after: Duration::from_secs(5),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let paths = self.paths(id);
            let _ = std::fs::remove_file(paths.pidfile());
            let _ = std::fs::remove_file(paths.qmp_socket());
            return Ok(());
        };
        let quit = tokio::time::timeout(QMP_DEADLINE, h.qmp(QmpAction::Quit)).await;
        if matches!(quit, Ok(Ok(()))) && h.wait_gone(Duration::from_secs(5)).await {
            return Ok(());
        }
        sigkill(h.pid);
        if h.wait_gone(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(HvError::Timeout {
                what: "killing QEMU",
                after: Duration::from_secs(10),
            })
        }
    }

    async fn reboot(&self, id: VmId) -> Result<(), HvError> {
        self.qmp_with_deadline(id, QmpAction::Reset).await
    }

    async fn pause(&self, id: VmId) -> Result<(), HvError> {
        self.qmp_with_deadline(id, QmpAction::Stop).await
    }

    async fn resume(&self, id: VmId) -> Result<(), HvError> {
        self.qmp_with_deadline(id, QmpAction::Cont).await
    }

    async fn observe(&self, id: VmId) -> VmState {
        match self.handle(id) {
            Some(h) => *h.state.borrow(),
            None if self.live_pid(id).is_some() => VmState::Unknown,
            None => VmState::Stopped,
        }
    }

    async fn adopt(&self, spec: &RuntimeSpec) -> Result<VmState, HvError> {
        if let Some(h) = self.handle(spec.id) {
            return Ok(*h.state.borrow());
        }
        let Some(pid) = self.live_pid(spec.id) else {
            let paths = self.paths(spec.id);
            let _ = std::fs::remove_file(paths.qmp_socket());
            let _ = std::fs::remove_file(paths.pidfile());
            return Ok(VmState::Stopped);
        };
        let state = self
            .attach(spec.id, pid, None, Duration::from_secs(5))
            .await?;
        tracing::info!(vm = %spec.id, pid, state = state.as_str(), "re-adopted running QEMU");
        Ok(state)
    }

    async fn snapshot_disks(&self, id: VmId, name: &str) -> Result<(), HvError> {
        self.for_each_disk(id, |disk| {
            let name = name.to_string();
            async move { disks::snapshot_create(&disk, &name).await }
        })
        .await
    }

    async fn restore_disks(&self, id: VmId, name: &str) -> Result<(), HvError> {
        self.for_each_disk(id, |disk| {
            let name = name.to_string();
            async move { disks::snapshot_apply(&disk, &name).await }
        })
        .await
    }

    async fn delete_disk_snapshot(&self, id: VmId, name: &str) -> Result<(), HvError> {
        self.for_each_disk(id, |disk| {
            let name = name.to_string();
            async move { disks::snapshot_delete(&disk, &name).await }
        })
        .await
    }

    fn console_path(&self, id: VmId) -> PathBuf {
        self.paths(id).console_log()
    }

    async fn attach_volume(&self, id: VmId, vol: &crate::AttachedVolume) -> Result<(), HvError> {
        volumes::attach(self, id, vol).await
    }
    async fn detach_volume(&self, id: VmId, vol: novacron_types::VolumeId) -> Result<(), HvError> {
        volumes::detach(self, id, vol).await
    }
    async fn resize_disk(&self, id: VmId, device: &str, size_bytes: u64) -> Result<(), HvError> {
        volumes::resize(self, id, device, size_bytes).await
    }
    async fn snapshot_disk(&self, id: VmId, device: &str, name: &str) -> Result<(), HvError> {
        volumes::snapshot(self, id, device, name).await
    }
    async fn volume_mirror_start(
        &self,
        id: VmId,
        device: &str,
        target: &Path,
        format: novacron_types::VolumeFormat,
        backing: Option<&crate::Backing>,
        speed: u64,
    ) -> Result<(), HvError> {
        volumes::mirror_start(self, id, device, target, format, backing, speed).await
    }
    async fn volume_mirror_status(
        &self,
        id: VmId,
        device: &str,
    ) -> Result<Option<crate::MirrorStatus>, HvError> {
        volumes::mirror_status(self, id, device).await
    }
    async fn volume_mirror_speed(&self, id: VmId, device: &str, speed: u64) -> Result<(), HvError> {
        volumes::mirror_speed(self, id, device, speed).await
    }
    async fn volume_mirror_finish(&self, id: VmId, device: &str) -> Result<(), HvError> {
        volumes::mirror_finish(self, id, device).await
    }
    async fn volume_mirror_abort(&self, id: VmId, device: &str) -> Result<(), HvError> {
        volumes::mirror_abort(self, id, device).await
    }
    async fn disk_file(&self, id: VmId, device: &str) -> Result<Option<PathBuf>, HvError> {
        volumes::disk_file(self, id, device).await
    }
    async fn io_latency(&self, id: VmId) -> Result<(u64, u64), HvError> {
        volumes::io_latency(self, id).await
    }

    async fn block_stats(&self, id: VmId) -> Result<Vec<(String, crate::DiskCounters)>, HvError> {
        let reply = migration::raw(
            self,
            id,
            qmp_raw::RawCommand::QueryBlockstats(qmp_raw::none()),
        )
        .await?;
        Ok(parse_blockstats(&reply))
    }

    fn disk_files(&self, id: VmId, extra_disks: usize) -> Vec<PathBuf> {
        self.paths(id).disks(extra_disks)
    }

    async fn detach_all(&self) {
        *self.launches.write().await = true;
        let handles: Vec<VmHandle> = self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for h in handles {
            let _ = h.tx.try_send(Request::Detach);
        }
    }
}

impl QemuHypervisor {
    /// The VM's count of migration and block-job events so far (0 without a runner).
    fn job_events(&self, id: VmId) -> u64 {
        self.handle(id).map(|h| *h.job_events.borrow()).unwrap_or(0)
    }

    /// Starts QEMU for `spec` with `extra` arguments after the usual ones.
    async fn launch(&self, spec: &RuntimeSpec, extra: &[&str]) -> Result<(), HvError> {
        let closed = self.launches.read().await;
        if *closed {
            return Err(HvError::StartFailed(
                "novacron is stopping; it starts no QEMU now".into(),
            ));
        }
        if self.handle(spec.id).is_some() || self.live_pid(spec.id).is_some() {
            return Err(HvError::AlreadyRunning(spec.id));
        }
        let paths = self.paths(spec.id);
        if !paths.root_disk().exists() {
            return Err(HvError::StartFailed(format!(
                "boot disk {} is missing",
                paths.root_disk().display()
            )));
        }
        let _ = std::fs::remove_file(paths.qmp_socket());
        let _ = std::fs::remove_file(paths.pidfile());
        // Every boot starts a fresh console log; the previous boot's is kept as `.1`.
        console::start_fresh(&paths.console_log())?;
        let stderr = std::fs::File::create(paths.qemu_log())?;
        let mut args = args::command_line(spec, &paths, self.cfg.accel);
        args.extend(extra.iter().map(|a| a.to_string()));
        tracing::debug!(vm = %spec.id, ?args, "starting QEMU");
        let child = Command::new(&self.cfg.qemu_binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            // Its own process group: Ctrl-C on `novacron` must not reach the guests.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                HvError::StartFailed(format!("cannot run {}: {e}", self.cfg.qemu_binary))
            })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        let state = self
            .attach(spec.id, pid, Some(child), self.cfg.start_timeout)
            .await?;
        tracing::info!(vm = %spec.id, pid, state = state.as_str(), "QEMU started");
        Ok(())
    }

    /// Sends one QMP action and waits at most [`QMP_DEADLINE`] for it (the runner still owns the
    /// command, so nothing is cancelled mid-flight).
    async fn qmp_with_deadline(&self, id: VmId, action: QmpAction) -> Result<(), HvError> {
        let h = self.running(id)?;
        tokio::time::timeout(QMP_DEADLINE, h.qmp(action))
            .await
            .map_err(|_| HvError::Timeout {
                what: "a QMP command",
                after: QMP_DEADLINE,
            })?
    }

    /// Runs `f` on every qcow2 disk of a VM that has no QEMU process.
    async fn for_each_disk<F, Fut>(&self, id: VmId, f: F) -> Result<(), HvError>
    where
        F: Fn(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<(), HvError>>,
    {
        if self.handle(id).is_some() || self.live_pid(id).is_some() {
            return Err(HvError::WrongState {
                op: "disk snapshots",
                state: "running",
            });
        }
        let dir = self.paths(id).dir;
        let mut disks: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
            .collect();
        disks.sort();
        for d in disks {
            f(d).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockstats_are_read_by_disk_name() {
        // As QEMU 7.2 answers for `-blockdev node-name=root` + `-device ...,id=root-dev`, with
        // a migration's NBD node beside it.
        let reply = serde_json::json!([
            { "device": "", "node-name": "root", "qdev": "/machine/peripheral/root-dev/virtio-backend",
              "stats": { "rd_bytes": 4096, "wr_bytes": 65536, "rd_operations": 1, "wr_operations": 2 } },
            { "device": "", "qdev": "/machine/peripheral/disk1-dev/virtio-backend",
              "stats": { "rd_bytes": 0, "wr_bytes": 512, "rd_operations": 0, "wr_operations": 1 } },
            { "device": "", "node-name": "mig-root", "stats": { "wr_bytes": 9 } }
        ]);
        let stats = parse_blockstats(&reply);
        assert_eq!(
            stats,
            vec![
                (
                    "root".to_string(),
                    crate::DiskCounters {
                        rd_bytes: 4096,
                        wr_bytes: 65536,
                        rd_ops: 1,
                        wr_ops: 2
                    }
                ),
                (
                    "disk1".to_string(),
                    crate::DiskCounters {
                        rd_bytes: 0,
                        wr_bytes: 512,
                        rd_ops: 0,
                        wr_ops: 1
                    }
                ),
            ]
        );
    }
}
