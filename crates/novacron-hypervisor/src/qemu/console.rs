//! A VM's serial console log (`console.log` in its directory) and its one old file
//! (`console.log.1`).
//!
//! The rule, on every start path (a start, an HA restart, a migration's target): a boot begins a
//! fresh log and the previous boot's is kept as `console.log.1`. While the VM runs, the log is
//! rotated the same way once it grows past a size (`--console-log-max-mib`), so a guest writing
//! to its serial port without pause cannot fill the host's disk: the two files never hold much
//! more than twice that size.
//!
//! QEMU writes the log itself (`-chardev file,append=on`) and outlives `novacron`, so the log
//! cannot be renamed under it (QEMU would keep writing to the renamed file). A running log is
//! rotated by copy and truncate instead: it is copied to `.1`, then cut to zero length; since
//! QEMU opened it with `O_APPEND`, its next write lands at the new end. Bytes written between
//! the copy and the cut are lost (a few, at most). While `novacron` is down nobody rotates:
//! the log grows until it returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The old file's name: `console.log` → `console.log.1`.
pub fn previous(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Before a boot: the previous boot's log (if it has anything) becomes `.1`.
pub fn start_fresh(log: &Path) -> std::io::Result<()> {
    match std::fs::metadata(log) {
        Ok(m) if m.len() > 0 => std::fs::rename(log, previous(log)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies the last `keep` bytes of a log that QEMU is writing to `.1` and cuts the log to zero
/// length (see the module doc). The log is cut even when the copy fails (a full disk is when
/// this matters most): losing old console output is better than filling the disk.
pub fn rotate_open(log: &Path, keep: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let old = previous(log);
    let mut tmp = old.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let copied = (|| -> std::io::Result<()> {
        let mut from = std::fs::File::open(log)?;
        let len = from.metadata()?.len();
        from.seek(SeekFrom::Start(len.saturating_sub(keep)))?;
        let mut to = std::fs::File::create(&tmp)?;
        std::io::copy(&mut std::io::Read::take(&mut from, keep), &mut to)?;
        std::fs::rename(&tmp, &old)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .and_then(|f| f.set_len(0));
    copied.and(cut)
}

/// The runner's check of its VM's log: at most once a second, rotate when over the size. The
/// file work runs on a blocking thread, one rotation at a time.
pub struct Rotation {
    log: PathBuf,
    max_bytes: u64,
    last_check: Option<Instant>,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Rotation {
    pub fn new(log: PathBuf, max_bytes: u64) -> Self {
        Self {
            log,
            max_bytes,
            last_check: None,
            busy: Default::default(),
        }
    }

    /// Called often (the runner's poll tick); looks at most once a second.
    pub fn check(&mut self) {
        use std::sync::atomic::Ordering;
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_check = Some(Instant::now());
        let over = std::fs::metadata(&self.log).is_ok_and(|m| m.len() > self.max_bytes);
        if !over || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (log, keep, busy) = (self.log.clone(), self.max_bytes, self.busy.clone());
        let rotate = move || {
            if let Err(e) = rotate_open(&log, keep) {
                tracing::warn!(log = %log.display(), "rotating the console log: {e}");
            }
            busy.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(rotate);
            }
            Err(_) => rotate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_boot_keeps_the_previous_log_as_dot_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        start_fresh(&log).expect("no log yet is fine");
        std::fs::write(&log, "boot 1\n").expect("write");
        start_fresh(&log).expect("rotate");
        assert!(!log.exists());
        assert_eq!(
            std::fs::read_to_string(previous(&log)).expect("old"),
            "boot 1\n"
        );
        // An empty log does not replace the kept one.
        std::fs::write(&log, "").expect("write");
        start_fresh(&log).expect("rotate");
        assert_eq!(
            std::fs::read_to_string(previous(&log)).expect("old"),
            "boot 1\n"
        );
    }

    #[test]
    fn an_open_log_is_cut_and_appends_continue_at_its_new_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        // Like QEMU's `append=on`.
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open");
        writer.write_all(&[b'x'; 3000]).expect("write");
        let mut r = Rotation::new(log.clone(), 2048);
        r.check();
        assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
        assert_eq!(
            std::fs::metadata(previous(&log)).expect("old").len(),
            2048,
            "the old file keeps the newest bytes up to the size"
        );
        writer.write_all(b"after\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "after\n",
            "no hole where the old bytes were"
        );
        // Checked at most once a second.
        writer.write_all(&[b'y'; 3000]).expect("write");
        r.check();
        assert!(std::fs::metadata(&log).expect("log").len() > 3000);
    }
}
