//! A killed QEMU is a crash noticed within a second; a restarted `novacron` re-adopts the VMs
//! that kept running, without rebooting or duplicating them.

mod common;

use std::time::{Duration, Instant};

use novacron_types::VmState;

use common::*;

const BOOT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_is_recorded_as_crashed_within_a_second() {
    let node = Node::start();
    let c = node.admin().await;
    c.create_vm(&demo_vm("victim")).await.expect("create");
    c.wait_success(&c.vm_action("victim", "start").await.expect("start"), BOOT)
        .await
        .expect("start op");
    wait_console(&c, "victim", "tick 1", 1, BOOT).await;

    let pids = node.qemu_pids();
    assert_eq!(pids.len(), 1);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let v = wait_state(&c, "victim", VmState::Crashed, Duration::from_secs(1)).await;
    eprintln!("crash recorded {:?} after kill -9", killed.elapsed());
    let reason = v.state_reason.expect("a crashed VM has a reason");
    assert!(
        reason.contains("signal 9"),
        "reason names the signal: {reason}"
    );

    // A crashed VM can be started again.
    c.wait_success(
        &c.vm_action("victim", "start").await.expect("restart"),
        BOOT,
    )
    .await
    .expect("restart op");
    assert_eq!(
        c.get_vm("victim").await.expect("get").state,
        VmState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_novacron_readopts_running_vms() {
    let node = Node::start();
    let c = node.admin().await;
    c.create_vm(&demo_vm("survivor")).await.expect("create");
    let start = c.vm_action("survivor", "start").await.expect("start");
    c.wait_success(&start, BOOT).await.expect("start op");
    wait_console(&c, "survivor", "tick 2", 1, BOOT).await;
    let pids_before = node.qemu_pids();
    assert_eq!(pids_before.len(), 1);

    // kill -9 of novacron itself: QEMU must keep running.
    let node = node.restart();
    let c = node.admin().await;
    let before = last_tick(&console_text(&c, "survivor").await);
    let v = c.get_vm("survivor").await.expect("get");
    assert_eq!(v.state, VmState::Running, "re-adopted: {v:?}");
    assert_eq!(
        node.qemu_pids(),
        pids_before,
        "the same QEMU, not a new one"
    );
    assert_eq!(
        c.vm_action("survivor", "start")
            .await
            .expect_err("already running")
            .status(),
        Some(409),
        "no second start"
    );

    // Its ticks continue from where they were: not rebooted, not frozen.
    wait_console(&c, "survivor", &format!("tick {}", before + 2), 1, BOOT).await;
    let text = console_text(&c, "survivor").await;
    assert_eq!(
        text.matches("NOVACRON-DEMO-GUEST READY").count(),
        1,
        "the guest did not reboot"
    );

    // Operations survive the restart.
    let op = c
        .get_operation(&start.id.to_string())
        .await
        .expect("operation from before the restart");
    assert_eq!(op.kind, "vm.start");

    // And the re-adopted VM is fully manageable: pause freezes it, stop ends it.
    c.wait_success(
        &c.vm_action("survivor", "pause").await.expect("pause"),
        BOOT,
    )
    .await
    .expect("pause op");
    assert_eq!(
        c.get_vm("survivor").await.expect("get").state,
        VmState::Paused
    );
    c.wait_success(
        &c.vm_action("survivor", "force-stop").await.expect("stop"),
        BOOT,
    )
    .await
    .expect("stop op");
    assert_eq!(
        c.get_vm("survivor").await.expect("get").state,
        VmState::Stopped
    );
    assert!(node.qemu_pids().is_empty());
}
