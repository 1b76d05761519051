//! Copies of volume files no VM has open, run as QEMU block jobs in a `qemu-storage-daemon`
//! of their own: `blockdev-backup` (sync `full`, `compress` into a qcow2 target when asked)
//! with QEMU's `speed` limit, which, like a running VM's mirror, can be changed while it runs
//! (`block-job-set-speed`). So a detached volume's move is paced, throttled and re-shared the
//! same way as a live one, in 64 KiB pieces (`qemu-img convert -r` paces per 2 MiB buffer and
//! overshoots short copies by that much).
//!
//! The daemon's QMP socket is in the system's temporary directory (socket paths are short);
//! the process is killed when the copy is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};

use novacron_types::{VolumeFormat, VolumeId};

use super::qmp_raw::{RawCommand, none};
use super::runner::{self, Qmp};
use crate::{HvError, disks};

/// How far a copy got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyStatus {
    pub len: u64,
    pub offset: u64,
    /// `Some` once the job ended: `Ok` when the copy is complete, `Err` with QEMU's reason.
    pub done: Option<Result<(), String>>,
}

pub struct FileCopy {
    child: Child,
    qmp: Arc<Qmp>,
    /// The connection lives as long as its event stream is read (drained in `status`).
    events: EventStream,
    socket: PathBuf,
}

type EventStream = tokio::sync::mpsc::UnboundedReceiver<qapi::qmp::Event>;

fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn qmp_err(command: &'static str, e: impl std::fmt::Display) -> HvError {
    HvError::Qmp {
        command,
        message: e.to_string(),
    }
}

impl FileCopy {
    /// Makes `dest` (as `to`, the size of `src`) and starts copying `src` into it at `speed`
    /// bytes a second. With `backing` (a boot disk), `dest` overlays that image and only
    /// `src`'s own layer is copied.
    pub async fn start(
        src: &Path,
        from: VolumeFormat,
        dest: &Path,
        to: VolumeFormat,
        backing: Option<&crate::Backing>,
        compress: bool,
        speed: u64,
    ) -> Result<FileCopy, HvError> {
        let size = disks::info(src).await?.virtual_size;
        disks::create_copy_target(dest, to, backing, size).await?;
        // The target's backing is not opened: the job only writes into it. (`null` exists
        // only in the JSON form of the option.)
        let mut dst = json!({ "driver": to.as_str(), "node-name": "dst", "file": "dst-file" });
        if backing.is_some() {
            dst["backing"] = serde_json::Value::Null;
        }
        let socket = std::env::temp_dir().join(format!(
            "novacron-copy-{}.sock",
            VolumeId::new_random().short()
        ));
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!(
                    "driver=file,node-name=src-file,filename={},read-only=on",
                    esc(src)
                ),
                "--blockdev",
                &format!(
                    "driver={},node-name=src,file=src-file,read-only=on",
                    from.as_str()
                ),
                "--blockdev",
                &format!("driver=file,node-name=dst-file,filename={}", esc(dest)),
                "--blockdev",
                &dst.to_string(),
                "--chardev",
                &format!("socket,id=qmp,path={},server=on,wait=off", esc(&socket)),
                "--monitor",
                "chardev=qmp",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HvError::Disk {
                action: "copy",
                message: format!("cannot run qemu-storage-daemon: {e}"),
            })?;
        let (qmp, events) = match Self::connect(&socket).await {
            Ok(q) => q,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        let mut copy = FileCopy {
            child,
            qmp,
            events,
            socket,
        };
        if let Err(e) = RawCommand::BlockdevBackup(json!({
            "job-id": "copy",
            "device": "src",
            "target": "dst",
            "sync": if backing.is_some() { "top" } else { "full" },
            "compress": compress,
            "speed": speed.max(1),
            "auto-dismiss": false,
        }))
        .execute(&copy.qmp)
        .await
        {
            copy.stop().await;
            return Err(qmp_err("blockdev-backup", e));
        }
        Ok(copy)
    }

    async fn connect(socket: &PathBuf) -> Result<(Arc<Qmp>, EventStream), HvError> {
        // The daemon makes its socket as it starts.
        let mut last = None;
        for _ in 0..250 {
            if socket.exists() {
                match runner::connect(socket).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = Some(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last.unwrap_or_else(|| HvError::Disk {
            action: "copy",
            message: "qemu-storage-daemon did not open its QMP socket".into(),
        }))
    }

    pub async fn status(&mut self) -> Result<CopyStatus, HvError> {
        while self.events.try_recv().is_ok() {}
        if let Ok(Some(exit)) = self.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(HvError::Disk {
                action: "copy",
                message: format!("qemu-storage-daemon ended ({exit}): {}", err.trim()),
            });
        }
        let jobs = RawCommand::QueryJobs(none())
            .execute(&self.qmp)
            .await
            .map_err(|e| qmp_err("query-jobs", e))?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == "copy"))
            .ok_or_else(|| qmp_err("query-jobs", "the copy job is gone"))?;
        let done = (job["status"] == "concluded").then(|| match job["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        });
        Ok(CopyStatus {
            len: job["total-progress"].as_u64().unwrap_or(0),
            offset: job["current-progress"].as_u64().unwrap_or(0),
            done,
        })
    }

    pub async fn set_speed(&self, speed: u64) -> Result<(), HvError> {
        RawCommand::BlockJobSetSpeed(json!({ "device": "copy", "speed": speed.max(1) }))
            .execute(&self.qmp)
            .await
            .map_err(|e| qmp_err("block-job-set-speed", e))
            .map(drop)
    }

    /// Ends the daemon (after the job concluded: the target is complete and flushed).
    pub async fn stop(&mut self) {
        let _ = RawCommand::Quit(none()).execute(&self.qmp).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Kills any `qemu-storage-daemon` left copying into `dest` (by a `novacron` that died
/// mid-copy: the daemon outlives it). Returns how many it killed.
pub fn kill_strays(dest: &Path) -> usize {
    let want = format!("filename={}", esc(dest));
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let daemon = args
            .first()
            .is_some_and(|a| a.ends_with("qemu-storage-daemon"));
        if daemon && args.iter().any(|a| a.contains(&want)) {
            runner::sigkill(pid);
            killed += 1;
        }
    }
    killed
}

impl Drop for FileCopy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}
