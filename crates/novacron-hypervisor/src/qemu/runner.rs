//! One actor per VM: the runner task owns the QMP connection (and the QEMU child process when this
//! `novacron` started it); the rest of the driver talks to it through a [`VmHandle`].
//!
//! ```text
//!              start/adopt
//!   (no process) ───────────► Starting/Running ◄──► Paused      (STOP / RESUME, query-status)
//!                                  │   ▲
//!                   powerdown/quit │   │ RESET
//!                                  ▼   │
//!                               Stopping ──► process gone ──► Stopped  (asked for, or guest poweroff)
//!          any state ──► process gone without being asked ──► Crashed (with the reason)
//! ```
//!
//! QMP rules from the `qapi` crate: the event stream is the only reader of the socket, so it runs
//! in its own task; a command future is never dropped before it completes; a decoding error ends
//! the stream, after which the runner reconnects if QEMU is still alive.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use novacron_types::{VmId, VmState};

use super::qmp_raw::RawCommand;
use super::state_map::{crash_reason, vm_state_from_run_state};
use crate::{HvError, StateChange};

pub type Qmp = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QmpAction {
    Powerdown,
    Quit,
    Reset,
    Stop,
    Cont,
}

impl QmpAction {
    fn name(self) -> &'static str {
        match self {
            QmpAction::Powerdown => "system_powerdown",
            QmpAction::Quit => "quit",
            QmpAction::Reset => "system_reset",
            QmpAction::Stop => "stop",
            QmpAction::Cont => "cont",
        }
    }
}

pub enum Request {
    Qmp {
        action: QmpAction,
        reply: oneshot::Sender<Result<(), HvError>>,
    },
    /// A command sent as plain JSON (migration); see `qmp_raw`.
    Raw {
        cmd: RawCommand,
        reply: oneshot::Sender<Result<serde_json::Value, HvError>>,
    },
    /// Stop watching; leave QEMU running (used when `novacron` shuts down).
    Detach,
}

/// The rest of the driver's view of a running VM.
#[derive(Clone)]
pub struct VmHandle {
    pub generation: u64,
    pub pid: i32,
    pub tx: mpsc::Sender<Request>,
    pub state: watch::Receiver<VmState>,
    /// Bumped on every migration or block-job event, so a migration can react at once.
    pub job_events: watch::Receiver<u64>,
}

impl VmHandle {
    pub async fn qmp(&self, action: QmpAction) -> Result<(), HvError> {
        let (reply, rx) = oneshot::channel();
        let id_gone = || HvError::Qmp {
            command: action.name(),
            message: "QEMU exited".into(),
        };
        self.tx
            .send(Request::Qmp { action, reply })
            .await
            .map_err(|_| id_gone())?;
        rx.await.map_err(|_| id_gone())?
    }

    /// Sends a raw JSON command through the runner (which owns the QMP connection).
    pub async fn raw(&self, cmd: RawCommand) -> Result<serde_json::Value, HvError> {
        let command = cmd.name();
        let gone = || HvError::Qmp {
            command,
            message: "QEMU exited".into(),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Raw { cmd, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Waits until the process is gone (true) or `timeout` passes (false).
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        let gone = async move {
            // Err means the runner ended, which also means the process is gone.
            let _ = rx.wait_for(|s| !s.has_process()).await;
        };
        tokio::time::timeout(timeout, gone).await.is_ok()
    }
}

/// Whether `pid` is a live process. A zombie (exited, not yet reaped by its parent) is dead:
/// re-adopted QEMUs are not our children, and their new parent may reap them late.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

pub fn sigkill(pid: i32) {
    if pid > 0 {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Connects to QEMU's QMP socket and starts the reader task that forwards events.
///
/// The reader ends (closing the socket, so QEMU accepts the next client) when the stream ends
/// or when the receiver is dropped.
pub async fn connect(
    socket: &PathBuf,
) -> Result<(Arc<Qmp>, mpsc::UnboundedReceiver<qmp::Event>), HvError> {
    // Nothing is in flight on the connection yet, so dropping it on timeout is safe.
    let handshake = async {
        let neg = QmpStreamTokio::open_uds(socket).await?;
        neg.negotiate().await
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| HvError::Timeout {
            what: "QMP handshake",
            after: Duration::from_secs(5),
        })??;
    let (qmp, mut events) = stream.into_parts();
    // Unbounded: the reader must never block, because command replies arrive on the same stream
    // and the runner drains events only between commands.
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                item = events.next() => match item {
                    Some(Ok(ev)) => {
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!("QMP stream ended: {e}");
                        break;
                    }
                    None => break,
                },
                _ = tx.closed() => break,
            }
        }
        // Dropping `events` fails any command still waiting for a reply and closes the socket.
    });
    Ok((Arc::new(qmp), rx))
}

pub async fn query_state(qmp: &Qmp) -> Result<(VmState, Option<String>), HvError> {
    let st = qmp
        .execute(qmp::query_status {})
        .await
        .map_err(|e| HvError::Qmp {
            command: "query-status",
            message: e.to_string(),
        })?;
    Ok((
        vm_state_from_run_state(st.status),
        crash_reason(st.status).map(str::to_owned),
    ))
}

/// Registry entry removal is keyed by generation, so a late runner never removes its successor.
pub type Registry = Arc<Mutex<std::collections::HashMap<VmId, VmHandle>>>;

pub struct Runner {
    pub id: VmId,
    pub generation: u64,
    pub pid: i32,
    pub child: Option<Child>,
    pub qmp: Arc<Qmp>,
    pub events: mpsc::UnboundedReceiver<qmp::Event>,
    /// QMP is lost while QEMU lives: the runner polls the PID and keeps trying to reconnect.
    pub qmp_lost: bool,
    pub socket: PathBuf,
    pub qemu_log: PathBuf,
    pub pidfile: PathBuf,
    pub state_tx: watch::Sender<VmState>,
    pub jobs_tx: watch::Sender<u64>,
    pub bus: broadcast::Sender<StateChange>,
    pub registry: Registry,
    /// Keeps the console log under its size while the VM runs.
    pub console: super::console::Rotation,
    pub stop_requested: bool,
    /// `quit` was sent: QEMU is on its way out, so a closed QMP stream is expected.
    pub quit_sent: bool,
    pub guest_shutdown: bool,
}

impl Runner {
    fn set_state(&mut self, state: VmState, reason: Option<String>) {
        let changed = *self.state_tx.borrow() != state;
        self.state_tx.send_replace(state);
        if changed {
            let _ = self.bus.send(StateChange {
                id: self.id,
                state,
                reason,
            });
        }
    }

    /// A command that failed on the connection itself (not with QEMU's error reply) leaves
    /// it unusable: `qapi` may still hold the command as waiting for a reply, and the next
    /// command on the same connection would panic in `qapi` ("duplicate command id"). Nothing
    /// is sent on it again; the runner reconnects (or sees QEMU exit).
    fn check_transport<T>(&mut self, r: &Result<T, qapi::ExecuteError>) {
        if let Err(qapi::ExecuteError::Io(e)) = r {
            tracing::debug!(vm = %self.id, "QMP connection failed: {e}");
            self.qmp_lost = true;
        }
    }

    async fn refresh(&mut self) {
        let r = self.qmp.execute(qmp::query_status {}).await;
        self.check_transport(&r);
        match r {
            Ok(st) => self.set_state(
                vm_state_from_run_state(st.status),
                crash_reason(st.status).map(str::to_owned),
            ),
            Err(e) => tracing::debug!(vm = %self.id, "query-status: {e}"),
        }
    }

    async fn exec(&mut self, action: QmpAction) -> Result<(), HvError> {
        let qmp = &self.qmp;
        let r = match action {
            QmpAction::Powerdown => qmp.execute(qmp::system_powerdown {}).await.map(drop),
            QmpAction::Quit => qmp.execute(qmp::quit {}).await.map(drop),
            QmpAction::Reset => qmp.execute(qmp::system_reset {}).await.map(drop),
            QmpAction::Stop => qmp.execute(qmp::stop {}).await.map(drop),
            QmpAction::Cont => qmp.execute(qmp::cont {}).await.map(drop),
        };
        self.check_transport(&r);
        match (action, r) {
            (_, Ok(())) => Ok(()),
            // QEMU may close the socket before answering `quit`: that is success.
            (QmpAction::Quit, Err(qapi::ExecuteError::Io(_))) => Ok(()),
            (_, Err(e)) => Err(HvError::Qmp {
                command: action.name(),
                message: e.to_string(),
            }),
        }
    }

    async fn on_event(&mut self, ev: qmp::Event) {
        match ev {
            qmp::Event::SHUTDOWN { data, .. } => {
                if data.guest {
                    self.guest_shutdown = true;
                }
                self.set_state(VmState::Stopping, None);
            }
            qmp::Event::MIGRATION { .. }
            | qmp::Event::MIGRATION_PASS { .. }
            | qmp::Event::BLOCK_JOB_READY { .. }
            | qmp::Event::BLOCK_JOB_COMPLETED { .. }
            | qmp::Event::BLOCK_JOB_CANCELLED { .. }
            | qmp::Event::BLOCK_JOB_ERROR { .. }
            | qmp::Event::JOB_STATUS_CHANGE { .. } => {
                self.jobs_tx.send_modify(|n| *n += 1);
            }
            // A reset the guest did itself (a reboot from inside, a triple fault, a panic with
            // `panic=-1`): the VM stays running, but it booted again, and the record says so.
            qmp::Event::RESET { data, .. } if data.guest => {
                let cause = format!("{:?}", data.reason).replace('_', "-");
                tracing::warn!(vm = %self.id, cause, "the guest reset itself");
                let state = *self.state_tx.borrow();
                let _ = self.bus.send(StateChange {
                    id: self.id,
                    state,
                    reason: Some(format!("the guest rebooted itself ({cause})")),
                });
            }
            qmp::Event::GUEST_PANICKED { .. } => {
                // QEMU lives on with the guest halted; see `state_map`.
                self.set_state(VmState::Paused, Some("the guest kernel panicked".into()));
            }
            qmp::Event::STOP { .. }
            | qmp::Event::RESUME { .. }
            | qmp::Event::RESET { .. }
            | qmp::Event::SUSPEND { .. }
            | qmp::Event::WAKEUP { .. }
                if !self.stop_requested && !self.guest_shutdown =>
            {
                self.refresh().await;
            }
            _ => {}
        }
    }

    /// Runs until QEMU is gone or the runner is detached.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                req = requests.recv() => match req {
                    Some(Request::Qmp { action, reply }) => {
                        if matches!(action, QmpAction::Quit | QmpAction::Powerdown) {
                            self.stop_requested = true;
                        }
                        if action == QmpAction::Quit {
                            self.quit_sent = true;
                        }
                        let r = if self.qmp_lost {
                            self.without_qmp(action)
                        } else {
                            self.exec(action).await
                        };
                        if r.is_err() && matches!(action, QmpAction::Powerdown) {
                            self.stop_requested = false;
                        }
                        if r.is_ok() && matches!(action, QmpAction::Stop | QmpAction::Cont) {
                            self.refresh().await;
                        }
                        let _ = reply.send(r);
                    }
                    Some(Request::Raw { cmd, reply }) => {
                        let command = cmd.name();
                        let r = if self.qmp_lost {
                            Err(HvError::Qmp {
                                command,
                                message: "the QMP connection to QEMU is lost".into(),
                            })
                        } else {
                            let r = cmd.execute(&self.qmp).await;
                            self.check_transport(&r);
                            r.map_err(|e| HvError::Qmp {
                                command,
                                message: e.to_string(),
                            })
                        };
                        if r.is_ok() && command == "cont" {
                            self.refresh().await;
                        }
                        let _ = reply.send(r);
                    }
                    Some(Request::Detach) | None => {
                        self.unregister();
                        return;
                    }
                },
                ev = self.events.recv(), if !self.qmp_lost => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => {
                        if !(pid_alive(self.pid) && self.child_running()) {
                            self.finish().await;
                            return;
                        }
                        // After `quit` or a guest poweroff QEMU closes QMP and exits: wait for
                        // the exit (child or PID poll) instead of reconnecting.
                        let exiting = self.quit_sent || self.guest_shutdown;
                        if !exiting && !self.reconnect(3).await {
                            // Never declare a live QEMU finished: keep watching its PID.
                            tracing::warn!(vm = %self.id, pid = self.pid, "QMP lost while QEMU runs; retrying");
                        }
                        self.qmp_lost = exiting || self.qmp_lost_after_reconnect();
                    }
                },
                status = wait_child(&mut self.child) => {
                    self.finish_with(Some(status)).await;
                    return;
                }
                _ = poll.tick() => {
                    if self.child.is_none() && !pid_alive(self.pid) {
                        self.finish().await;
                        return;
                    }
                    self.console.check();
                    let exiting = self.quit_sent || self.guest_shutdown;
                    if self.qmp_lost && !exiting && self.reconnect(1).await {
                        self.qmp_lost = false;
                    }
                }
            }
        }
    }

    /// True when the last reconnect attempt left the runner without a QMP stream.
    fn qmp_lost_after_reconnect(&self) -> bool {
        self.events.is_closed() && self.events.is_empty()
    }

    /// Requests while QMP is lost: only ending QEMU is possible (by signal).
    fn without_qmp(&mut self, action: QmpAction) -> Result<(), HvError> {
        match action {
            QmpAction::Quit => {
                sigkill(self.pid);
                Ok(())
            }
            _ => Err(HvError::Qmp {
                command: action.name(),
                message: "the QMP connection to QEMU is lost; force-stop ends the VM".into(),
            }),
        }
    }

    fn child_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The QMP stream ended but QEMU lives (for example an event this `qapi` does not know).
    async fn reconnect(&mut self, attempts: u32) -> bool {
        for _ in 0..attempts {
            if !pid_alive(self.pid) {
                return false;
            }
            match connect(&self.socket).await {
                Ok((qmp, events)) => {
                    tracing::warn!(vm = %self.id, "QMP stream ended while QEMU runs; reconnected");
                    self.qmp = qmp;
                    self.events = events;
                    self.refresh().await;
                    return true;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }

    async fn finish(&mut self) {
        let status = match &mut self.child {
            Some(c) => tokio::time::timeout(Duration::from_secs(2), c.wait())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        self.finish_with(status.map(Ok)).await;
    }

    async fn finish_with(&mut self, status: Option<std::io::Result<std::process::ExitStatus>>) {
        let (state, reason) = if self.stop_requested {
            (VmState::Stopped, None)
        } else if self.guest_shutdown {
            (VmState::Stopped, Some("the guest powered off".to_string()))
        } else {
            (VmState::Crashed, Some(self.crash_reason(status)))
        };
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pidfile);
        self.unregister();
        if state == VmState::Crashed {
            tracing::warn!(vm = %self.id, reason = reason.as_deref().unwrap_or(""), "VM crashed");
        }
        self.set_state(state, reason);
    }

    fn crash_reason(&self, status: Option<std::io::Result<std::process::ExitStatus>>) -> String {
        use std::os::unix::process::ExitStatusExt;
        let mut reason = match status {
            Some(Ok(s)) => match (s.signal(), s.code()) {
                (Some(sig), _) => format!(
                    "QEMU (pid {}) was killed by signal {sig}{}",
                    self.pid,
                    Signal::try_from(sig)
                        .map(|s| format!(" ({})", s.as_str()))
                        .unwrap_or_default()
                ),
                (None, Some(code)) => format!("QEMU (pid {}) exited with status {code}", self.pid),
                _ => format!("QEMU (pid {}) exited", self.pid),
            },
            _ => format!("QEMU (pid {}) exited unexpectedly", self.pid),
        };
        if let Ok(log) = std::fs::read_to_string(&self.qemu_log)
            && let Some(last) = log.lines().rev().find(|l| !l.trim().is_empty())
        {
            reason.push_str(": ");
            reason.push_str(last.trim());
        }
        reason
    }

    fn unregister(&self) {
        let mut map = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.id).map(|h| h.generation) == Some(self.generation) {
            map.remove(&self.id);
        }
    }
}

async fn wait_child(child: &mut Option<Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}
