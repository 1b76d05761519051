//! The same lifecycle checks run against the fake and against real QEMU with the demo guest.

mod common;

use std::time::{Duration, Instant};

use common::*;
use novacron_hypervisor::fake::FakeHypervisor;
use novacron_hypervisor::{HvError, Hypervisor, RuntimeSpec};
use novacron_types::{ImageFormat, VmId, VmState};

/// State rules every hypervisor must follow.
async fn lifecycle(hv: &dyn Hypervisor, spec: &RuntimeSpec) {
    hv.define(spec).await.expect("define");
    assert_eq!(hv.observe(spec.id).await, VmState::Stopped);
    assert!(matches!(
        hv.pause(spec.id).await,
        Err(HvError::NotRunning(_))
    ));

    hv.start(spec).await.expect("start");
    assert_eq!(hv.observe(spec.id).await, VmState::Running);
    assert!(matches!(
        hv.start(spec).await,
        Err(HvError::AlreadyRunning(_))
    ));
    assert!(
        hv.undefine(spec.id).await.is_err(),
        "undefine of a running VM must fail"
    );
    assert!(
        hv.snapshot_disks(spec.id, "s").await.is_err(),
        "disk snapshot while running"
    );

    hv.pause(spec.id).await.expect("pause");
    assert_eq!(hv.observe(spec.id).await, VmState::Paused);
    hv.resume(spec.id).await.expect("resume");
    assert_eq!(hv.observe(spec.id).await, VmState::Running);
    hv.reboot(spec.id).await.expect("reboot");

    hv.force_stop(spec.id).await.expect("force stop");
    assert_eq!(hv.observe(spec.id).await, VmState::Stopped);

    hv.snapshot_disks(spec.id, "clean").await.expect("snapshot");
    hv.restore_disks(spec.id, "clean").await.expect("restore");
    assert!(hv.restore_disks(spec.id, "nope").await.is_err());
    hv.delete_disk_snapshot(spec.id, "clean")
        .await
        .expect("delete snapshot");
    hv.undefine(spec.id).await.expect("undefine");
}

#[tokio::test]
async fn fake_follows_the_lifecycle_rules() {
    let dir = tempfile::tempdir().expect("tmp");
    let hv = FakeHypervisor::new(dir.path().to_path_buf());
    lifecycle(&hv, &demo_spec_for_fake()).await;
}

fn demo_spec_for_fake() -> RuntimeSpec {
    RuntimeSpec {
        id: VmId::new_random(),
        name: "fake".into(),
        vcpus: 1,
        memory_mib: 128,
        base_image: "/nonexistent".into(),
        base_format: ImageFormat::Qcow2,
        extra_disks_mib: vec![],
        boot: None,
        disk_dirs: Vec::new(),
        root_size: None,
        shared_disks: false,
        volumes: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_follows_the_lifecycle_rules() {
    let dir = VmRoot::new();
    let hv = qemu(dir.path()).await;
    lifecycle(&hv, &demo_spec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_boots_powers_off_on_acpi_and_a_killed_qemu_is_a_crash() {
    let dir = VmRoot::new();
    let hv = qemu(dir.path()).await;
    let spec = demo_spec();
    let mut changes = hv.subscribe();
    boot_demo(&hv, &spec).await;
    wait_console(&hv, spec.id, "tick 2", Duration::from_secs(10)).await;

    // ACPI power-down: the guest's acpid powers off; QEMU exits; observed state is stopped.
    hv.shutdown(spec.id, Duration::from_secs(30))
        .await
        .expect("graceful shutdown");
    assert_eq!(hv.observe(spec.id).await, VmState::Stopped);

    // kill -9 of QEMU is noticed within a second and reported as a crash with the reason.
    let offset = console_len(&hv, spec.id);
    hv.start(&spec).await.expect("restart");
    wait_console_from(&hv, spec.id, offset, "tick 1", Duration::from_secs(30)).await;
    let pid: i32 = std::fs::read_to_string(dir.path().join(spec.id.to_string()).join("qemu.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    while changes.try_recv().is_ok() {}
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let change = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let c = changes.recv().await.expect("bus");
            if c.id == spec.id && c.state == VmState::Crashed {
                return c;
            }
        }
    })
    .await
    .expect("crash not noticed within 1 s");
    let reason = change.reason.expect("crash reason");
    assert!(reason.contains("signal 9"), "reason: {reason}");
    eprintln!("crash noticed after {:?}: {reason}", killed_at.elapsed());
    hv.undefine(spec.id).await.expect("undefine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_outlives_the_driver_and_is_re_adopted() {
    let dir = VmRoot::new();
    let spec = demo_spec();
    {
        let hv = qemu(dir.path()).await;
        hv.define(&spec).await.expect("define");
        hv.start(&spec).await.expect("start");
        wait_console(&hv, spec.id, "tick 1", Duration::from_secs(30)).await;
        hv.detach_all().await;
    }
    // A new driver (as after a restart of `novacron`) finds and adopts the same process.
    let hv = qemu(dir.path()).await;
    assert!(
        matches!(hv.start(&spec).await, Err(HvError::AlreadyRunning(_))),
        "no second QEMU"
    );
    assert_eq!(hv.adopt(&spec).await.expect("adopt"), VmState::Running);
    hv.pause(spec.id).await.expect("pause after adoption");
    assert_eq!(hv.observe(spec.id).await, VmState::Paused);
    hv.force_stop(spec.id).await.expect("stop");
    assert_eq!(hv.observe(spec.id).await, VmState::Stopped);
    assert_eq!(
        hv.adopt(&spec).await.expect("adopt nothing"),
        VmState::Stopped
    );
}

/// `auto` must pick an accelerator that really boots guests, also where `/dev/kvm` exists but
/// cannot run them (nested virtualization, as on the machines this project is built on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accelerator_boots_the_demo_guest() {
    use novacron_hypervisor::accel::{AccelSetting, resolve};
    let kernel = demo_dir().join("vmlinuz");
    let accel = resolve(AccelSetting::Auto, "qemu-system-x86_64", Some(&kernel)).await;
    eprintln!(
        "/dev/kvm present: {}; auto chose {accel:?}",
        std::path::Path::new("/dev/kvm").exists()
    );
    let dir = VmRoot::new();
    let hv = qemu_with(dir.path(), accel).await;
    assert_eq!(hv.info().accelerator, accel.as_str());
    let spec = demo_spec();
    boot_demo(&hv, &spec).await;
    hv.force_stop(spec.id).await.expect("stop");
}
