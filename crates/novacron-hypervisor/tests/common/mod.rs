//! Shared by the driver's integration tests: the demo guest's spec, temporary VM roots whose
//! QEMUs die with the test, and console helpers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use novacron_hypervisor::accel::Accel;
use novacron_hypervisor::qemu::{QemuConfig, QemuHypervisor};
use novacron_hypervisor::{Hypervisor, RuntimeSpec};
use novacron_types::{ImageFormat, KernelBoot, VmId};

/// The demo image built by `scripts/build-demo-image.sh` (see `scripts/test.sh`).
pub fn demo_dir() -> PathBuf {
    std::env::var_os("NOVACRON_DEMO_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.novacron/demo-image")
        })
}

pub fn demo_spec() -> RuntimeSpec {
    let dir = demo_dir();
    assert!(
        dir.join("image.json").exists(),
        "demo image missing at {}: run scripts/build-demo-image.sh (scripts/test.sh does)",
        dir.display()
    );
    let s = |f: &str| dir.join(f).to_string_lossy().into_owned();
    RuntimeSpec {
        id: VmId::new_random(),
        name: "conformance".into(),
        vcpus: 1,
        memory_mib: 128,
        base_image: dir.join("disk.qcow2"),
        base_format: ImageFormat::Qcow2,
        extra_disks_mib: vec![8],
        boot: Some(KernelBoot {
            kernel: s("vmlinuz"),
            initrd: Some(s("initrd.img")),
            cmdline: Some("console=ttyS0 quiet panic=-1".into()),
        }),
        disk_dirs: Vec::new(),
        root_size: None,
        shared_disks: false,
        volumes: Vec::new(),
    }
}

/// A temporary VM root whose QEMU processes are killed when the test ends, pass or fail
/// (they run in their own process group and would otherwise outlive the test).
pub struct VmRoot(tempfile::TempDir);

impl VmRoot {
    pub fn new() -> Self {
        Self(tempfile::tempdir().expect("tmp"))
    }
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for VmRoot {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let pidfile = entry.path().join("qemu.pid");
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

pub async fn qemu(root: &std::path::Path) -> QemuHypervisor {
    qemu_with(root, Accel::Tcg).await
}

pub async fn qemu_with(root: &std::path::Path, accel: Accel) -> QemuHypervisor {
    QemuHypervisor::new(QemuConfig {
        vms_root: root.to_path_buf(),
        qemu_binary: "qemu-system-x86_64".into(),
        accel,
        start_timeout: Duration::from_secs(20),
        console_max_bytes: novacron_hypervisor::qemu::CONSOLE_MAX_BYTES,
    })
    .await
    .expect("qemu driver")
}

/// Waits for `needle` in the console output written after byte `from`.
pub async fn wait_console_from(
    hv: &dyn Hypervisor,
    id: VmId,
    from: usize,
    needle: &str,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let all = std::fs::read(hv.console_path(id)).unwrap_or_default();
        let text = String::from_utf8_lossy(&all[from.min(all.len())..]).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console after {timeout:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Defines and starts `spec` and waits until the guest says it is ready.
pub async fn boot_demo(hv: &dyn Hypervisor, spec: &RuntimeSpec) {
    hv.define(spec).await.expect("define");
    hv.start(spec).await.expect("start");
    wait_console(
        hv,
        spec.id,
        "NOVACRON-DEMO-GUEST READY",
        Duration::from_secs(30),
    )
    .await;
}

pub async fn wait_console(
    hv: &dyn Hypervisor,
    id: VmId,
    needle: &str,
    timeout: Duration,
) -> String {
    wait_console_from(hv, id, 0, needle, timeout).await
}

pub fn console_len(hv: &dyn Hypervisor, id: VmId) -> usize {
    std::fs::metadata(hv.console_path(id))
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}
