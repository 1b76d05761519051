//! The whole VM lifecycle on the demo guest through the REST API, checked from the guest's own
//! serial console: it boots, ticks, freezes when paused, reboots, powers off on ACPI.

mod common;

use std::time::Duration;

use futures::StreamExt;
use novacron_types::{OperationStatus, VmState};

use common::*;

const BOOT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_on_the_demo_guest() {
    let node = Node::start();
    let c = node.admin().await;

    let vm = c.create_vm(&demo_vm("life")).await.expect("create");
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.node.0, 1);
    assert_eq!((vm.spec.vcpus, vm.spec.memory_mib), (1, 128));

    // Start: 202 + operation, which succeeds once QEMU reports the VM running.
    let op = c.vm_action("life", "start").await.expect("start");
    assert_eq!(op.status, OperationStatus::Running);
    assert_eq!(op.resources, vec![format!("/api/v1/vms/{}", vm.id)]);
    let done = c.wait_success(&op, BOOT).await.expect("start op");
    assert_eq!(done.kind, "vm.start");
    assert_eq!(c.get_vm("life").await.expect("get").state, VmState::Running);
    wait_console(&c, "life", "NOVACRON-DEMO-GUEST READY", 1, BOOT).await;
    let text = wait_console(&c, "life", "tick 3", 1, BOOT).await;
    assert!(
        text.contains("disk vda"),
        "the boot disk is attached: {text}"
    );

    // The live console stream over WebSocket delivers new ticks.
    let ws_url = format!(
        "{}/api/v1/vms/life/console/ws",
        node.url.replacen("http", "ws", 1)
    );
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = ws_url.as_str().into_client_request().expect("ws request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", c.token().expect("token"))
            .parse()
            .expect("hdr"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = String::new();
        while let Some(Ok(msg)) = ws.next().await {
            seen.push_str(&String::from_utf8_lossy(&msg.into_data()));
            if seen.contains("tick ") {
                return seen;
            }
        }
        seen
    })
    .await
    .expect("no console bytes over the WebSocket");
    assert!(got.contains("tick "), "{got}");
    drop(ws);

    // Pause: the guest stops ticking. Resume: it continues from where it was, without rebooting.
    c.wait_success(&c.vm_action("life", "pause").await.expect("pause"), BOOT)
        .await
        .expect("pause op");
    assert_eq!(c.get_vm("life").await.expect("get").state, VmState::Paused);
    let frozen = last_tick(&console_text(&c, "life").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        last_tick(&console_text(&c, "life").await),
        frozen,
        "a paused guest must not tick"
    );
    c.wait_success(&c.vm_action("life", "resume").await.expect("resume"), BOOT)
        .await
        .expect("resume op");
    assert_eq!(c.get_vm("life").await.expect("get").state, VmState::Running);
    wait_console(&c, "life", &format!("tick {}", frozen + 2), 1, BOOT).await;
    assert_eq!(
        console_text(&c, "life")
            .await
            .matches("NOVACRON-DEMO-GUEST READY")
            .count(),
        1
    );

    // Conflicting actions are refused before anything happens.
    let e = c
        .vm_action("life", "start")
        .await
        .expect_err("start a running VM");
    assert_eq!(e.status(), Some(409));
    let e = c.delete_vm("life").await.expect_err("delete a running VM");
    assert_eq!(e.status(), Some(409));

    // Reboot: the guest boots again (a second READY), the VM stays running.
    c.wait_success(&c.vm_action("life", "reboot").await.expect("reboot"), BOOT)
        .await
        .expect("reboot op");
    wait_console(&c, "life", "NOVACRON-DEMO-GUEST READY", 2, BOOT).await;
    assert_eq!(c.get_vm("life").await.expect("get").state, VmState::Running);

    // Graceful stop: ACPI power-down, the guest's acpid powers off, QEMU exits.
    c.wait_success(&c.vm_action("life", "stop").await.expect("stop"), BOOT)
        .await
        .expect("stop op");
    let v = c.get_vm("life").await.expect("get");
    assert_eq!(v.state, VmState::Stopped, "{v:?}");
    assert!(node.qemu_pids().is_empty(), "QEMU must be gone after stop");

    // Disk snapshot and restore of the stopped VM.
    c.wait_success(
        &c.snapshot_vm("life", "clean").await.expect("snapshot"),
        BOOT,
    )
    .await
    .expect("snapshot op");
    assert_eq!(c.get_vm("life").await.expect("get").snapshots.len(), 1);
    c.wait_success(&c.restore_vm("life", "clean").await.expect("restore"), BOOT)
        .await
        .expect("restore op");

    // Start again and force-stop.
    c.wait_success(&c.vm_action("life", "start").await.expect("start 2"), BOOT)
        .await
        .expect("start 2 op");
    c.wait_success(
        &c.vm_action("life", "force-stop").await.expect("force"),
        BOOT,
    )
    .await
    .expect("force op");
    assert_eq!(c.get_vm("life").await.expect("get").state, VmState::Stopped);

    c.delete_vm("life").await.expect("delete");
    assert_eq!(
        c.get_vm("life").await.expect_err("gone").status(),
        Some(404)
    );
    assert!(
        !node.data_dir().join("vms").join(vm.id.to_string()).exists(),
        "disks removed"
    );
}
