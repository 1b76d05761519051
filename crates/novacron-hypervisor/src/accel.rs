//! Choosing the accelerator. `/dev/kvm` existing proves nothing: on nested-virtualization hosts it
//! answers ioctls but guests hang at boot. `auto` therefore boots a real kernel under KVM and
//! watches its serial output; without a kernel to probe with, or when the probe fails, it uses TCG.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelSetting {
    Kvm,
    Tcg,
    Auto,
}

impl std::str::FromStr for AccelSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "accelerator must be kvm, tcg or auto (got '{other}')"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Resolves the setting. `probe_kernel` is a bootable kernel (the demo image's) used by `auto`.
pub async fn resolve(setting: AccelSetting, qemu: &str, probe_kernel: Option<&Path>) -> Accel {
    match setting {
        AccelSetting::Kvm => Accel::Kvm,
        AccelSetting::Tcg => Accel::Tcg,
        AccelSetting::Auto => {
            if std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
            {
                tracing::info!("accelerator auto: /dev/kvm not usable, using tcg");
                return Accel::Tcg;
            }
            let Some(kernel) = probe_kernel else {
                tracing::warn!("accelerator auto: no kernel to probe KVM with, using tcg");
                return Accel::Tcg;
            };
            if kvm_boots(qemu, kernel, Duration::from_secs(5)).await {
                tracing::info!("accelerator auto: KVM booted a probe kernel, using kvm");
                Accel::Kvm
            } else {
                tracing::warn!(
                    "accelerator auto: /dev/kvm exists but a guest did not boot; using tcg"
                );
                Accel::Tcg
            }
        }
    }
}

/// Boots `kernel` under KVM with early serial output and reports whether it printed its banner.
async fn kvm_boots(qemu: &str, kernel: &Path, timeout: Duration) -> bool {
    let dir = match tempfile_dir() {
        Ok(d) => d,
        Err(_) => return false,
    };
    let log = dir.join("probe.log");
    let child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args([
            "-append",
            "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut booted = false;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read_to_string(&log)
            .map(|s| s.contains("Linux version"))
            .unwrap_or(false)
        {
            booted = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    booted
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("novacron-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
