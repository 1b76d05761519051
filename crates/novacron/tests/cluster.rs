//! Real `novacron serve` processes joined into clusters on loopback: joining with tokens,
//! requests accepted by any host (writes forwarded to the leader, VM actions to the VM's host),
//! a killed leader replaced, a host that was down catching up by snapshot, a witness keeping two
//! full hosts writable, removal, and the errors of each.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{TestCluster, host_id, member, members};
use common::{demo_vm, wait_console, wait_state};
use novacron_client::Client;
use novacron_types::{CreateVmRequest, NodeId, VmState};
use reqwest::Method;
use serde_json::{Value, json};

async fn status(c: &Client) -> Value {
    c.get("/api/v1/cluster").await.expect("cluster status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_forward_fail_over_and_catch_up_by_snapshot() {
    let mut cluster =
        TestCluster::start(&["full", "full", "full"], &["--snapshot-every", "500"]).await;
    let ids: Vec<u64> = {
        let mut v = Vec::new();
        for n in &cluster.nodes {
            v.push(host_id(n).await);
        }
        v
    };
    assert_eq!(ids, vec![1, 2, 3], "hosts get IDs in join order");

    // The status lists every member with its role, address, progress and what it reaches (the
    // reach map arrives with the heartbeat after a host's first round of pings).
    let s = cluster
        .wait_status(
            1,
            Duration::from_secs(10),
            "every host reporting its pings",
            |s| {
                members(s).iter().all(|m| {
                    m["reaches"]
                        .as_object()
                        .is_some_and(|r| r.len() == 2 && r.values().all(|v| v == true))
                })
            },
        )
        .await;
    assert_eq!(s["voters"], 3);
    assert_eq!(s["quorum"], true);
    for m in members(&s) {
        assert_eq!(m["role"], "voter", "{m}");
        assert!(
            m["api_address"]
                .as_str()
                .is_some_and(|a| a.starts_with("http://127.0.0.1:"))
        );
        assert!(m["matched_index"].as_u64().is_some(), "{m}");
        assert!(m["inventory"]["cpus"].as_u64().unwrap_or(0) >= 1, "{m}");
        let reaches = m["reaches"].as_object().cloned().unwrap_or_default();
        assert_eq!(reaches.len(), 2, "each host pings the other two: {m}");
        assert!(reaches.values().all(|v| v == true), "{m}");
    }

    // A VM created through host 1 for host 3 is created on host 3; a follower sees it at once
    // (linearizable read), and actions sent to any host run on host 3.
    let c1 = cluster.admin(0).await;
    let c2 = cluster.admin(1).await;
    let vm = c1
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(3)),
            placement: Default::default(),
            ..demo_vm("across")
        })
        .await
        .expect("create on host 3 through host 1");
    assert_eq!(vm.node, NodeId(3));
    assert_eq!(
        c2.get_vm("across").await.expect("read on host 2").node,
        NodeId(3)
    );
    let op = c2
        .vm_action("across", "start")
        .await
        .expect("start through host 2");
    c2.wait_success(&op, Duration::from_secs(60))
        .await
        .expect("start op");
    wait_state(&c1, "across", VmState::Running, Duration::from_secs(10)).await;
    assert!(
        !cluster.nodes[2].qemu_pids().is_empty() && cluster.nodes[0].qemu_pids().is_empty(),
        "QEMU must run on host 3 only"
    );
    // The console is read through host 1 from host 3.
    wait_console(
        &c1,
        "across",
        "NOVACRON-DEMO-GUEST READY",
        1,
        Duration::from_secs(60),
    )
    .await;

    // Kill the leader: the others elect a new one and writes through a survivor go on.
    let leader = cluster.leader_index(0).await;
    let survivor = (leader + 1) % 3;
    let cs = cluster.admin(survivor).await;
    let applied_at_death = member(&status(&cs).await, ids[leader])["matched_index"]
        .as_u64()
        .expect("the leader's own index");
    cluster.nodes[leader].kill();
    let killed = Instant::now();
    let mut n = 0;
    loop {
        match cs
            .post::<_, Value>(
                "/api/v1/tokens",
                &json!({ "name": format!("after-kill-{n}") }),
            )
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(10),
                    "no write accepted 10 s after the leader died: {e}"
                );
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "first write after the leader's death: {:?}",
        killed.elapsed()
    );
    let dead_id = ids[leader];
    cluster
        .wait_status(
            survivor,
            Duration::from_secs(10),
            "the dead host offline",
            |s| member(s, dead_id)["health"] == "offline" && s["quorum"] == true,
        )
        .await;
    // Thousands of writes while it is down (16 writers, label writes on the VM): with a snapshot
    // every 500 entries, the log it needs is purged.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let cs = cs.clone();
            tokio::spawn(async move {
                for i in 0..125 {
                    let (code, body) = cs
                        .raw(
                            Method::PATCH,
                            "/api/v1/vms/across",
                            Some(&json!({ "labels": { format!("w{w}"): i.to_string() } })),
                        )
                        .await
                        .expect("raw");
                    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    cluster.nodes[leader].start_again();
    let s = cluster
        .wait_status(
            survivor,
            Duration::from_secs(30),
            "the restarted host back and caught up",
            |s| {
                let m = member(s, dead_id);
                m["health"] == "online" && m["lag"].as_u64().is_some_and(|l| l < 5)
            },
        )
        .await;
    eprintln!("after restart: {}", member(&s, dead_id));
    let back = cluster.admin(leader).await;
    let local: Value = back
        .get("/api/v1/cluster?consistency=stale")
        .await
        .expect("stale status");
    assert!(
        local["local"]["applied_index"].as_u64().unwrap_or(0) >= 2000,
        "the restarted host did not catch up: {}",
        local["local"]
    );
    // It needed entries the leader had already purged behind a snapshot: it must have installed
    // a snapshot newer than anything it had.
    assert!(
        local["local"]["snapshot_index"].as_u64().unwrap_or(0) > applied_at_death + 500,
        "caught up without a snapshot? applied at death {applied_at_death}: {}",
        local["local"]
    );
    let vm: Value = back
        .get("/api/v1/vms/across?consistency=stale")
        .await
        .expect("stale read on the restarted host");
    for w in 0..16 {
        assert_eq!(
            vm["labels"][format!("w{w}")],
            "124",
            "writes made while it was down are missing on the restarted host: {}",
            vm["labels"]
        );
    }

    // The VM is still on host 3 and still running; stop it through whichever host.
    let op = back.vm_action("across", "force-stop").await.expect("stop");
    back.wait_success(&op, Duration::from_secs(30))
        .await
        .expect("stop op");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_keeps_two_full_hosts_writable() {
    let mut cluster = TestCluster::start(&["full", "full", "witness"], &[]).await;
    let s = status(&cluster.admin(0).await).await;
    let w = member(&s, 3);
    assert_eq!(w["role"], "witness");
    assert_eq!(
        w["voting"], true,
        "with two full hosts the witness votes: {w}"
    );

    // A VM asked of the witness lands on a full host.
    let cw = cluster.admin(2).await;
    let vm = cw
        .create_vm(&demo_vm("not-on-witness"))
        .await
        .expect("create via witness");
    assert_ne!(vm.node, NodeId(3));
    let e = cw
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(3)),
            placement: Default::default(),
            ..demo_vm("on-witness")
        })
        .await
        .expect_err("witness runs no VMs");
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("a witness, runs no VMs"), "{e}");

    // Lose one full host: the other full host and the witness still make a quorum.
    let victim = if vm.node == NodeId(1) { 0 } else { 1 };
    let other = 1 - victim;
    cluster.nodes[victim].kill();
    let c = cluster.admin(other).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c
            .post::<_, Value>("/api/v1/tokens", &json!({ "name": "two-of-three" }))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no quorum without one full host: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The VM of the dead host is still listed (its host is offline, not forgotten).
    let s = cluster
        .wait_status(
            other,
            Duration::from_secs(10),
            "the dead host offline",
            |s| member(s, (victim + 1) as u64)["health"] == "offline",
        )
        .await;
    assert_eq!(s["quorum"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_and_removing_hosts_explain_their_errors() {
    let mut cluster = TestCluster::start(&["full", "full", "full"], &[]).await;
    let c = cluster.admin(0).await;
    let anon = Client::new(&cluster.nodes[1].url, None);

    // Bad, reused and expired tokens are refused with a JSON error.
    let join = |token: &str| {
        json!({
            "token": token,
            "name": "intruder",
            "api_address": "http://127.0.0.1:9",
        })
    };
    let (code, body) = anon
        .raw(Method::POST, "/api/v1/cluster/join", Some(&join("garbage")))
        .await
        .expect("raw");
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let err: Value = serde_json::from_slice(&body).expect("json error");
    assert_eq!(err["error"]["field"], "token");
    let (code, _) = anon
        .raw(
            Method::POST,
            "/api/v1/cluster/join",
            Some(&join("ncj1-0123456789abcdef-wrong")),
        )
        .await
        .expect("raw");
    assert_eq!(code, 401);
    let t: Value = c
        .post("/api/v1/cluster/tokens", &json!({ "ttl_seconds": 1 }))
        .await
        .expect("token");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, body) = anon
        .raw(
            Method::POST,
            "/api/v1/cluster/join",
            Some(&join(t["token"].as_str().expect("token"))),
        )
        .await
        .expect("raw");
    assert_eq!(
        code,
        401,
        "expired token: {}",
        String::from_utf8_lossy(&body)
    );
    let (code, _) = c
        .raw(
            Method::POST,
            "/api/v1/cluster/tokens",
            Some(&json!({ "ttl_seconds": 0 })),
        )
        .await
        .expect("raw");
    assert_eq!(code, 400);
    // Host-to-host endpoints refuse users' tokens.
    let (code, _) = c
        .raw(Method::GET, "/internal/v1/cluster", None)
        .await
        .expect("raw");
    assert_eq!(code, 401);

    // Removing: unknown host 404; a host that is down needs --force; then it is gone for good
    // and the cluster runs on with the hosts it has.
    let (code, _) = c
        .raw(Method::DELETE, "/api/v1/cluster/members/99", None)
        .await
        .expect("raw");
    assert_eq!(code, 404);
    cluster.nodes[2].kill();
    cluster
        .wait_status(0, Duration::from_secs(10), "host 3 offline", |s| {
            member(s, 3)["health"] == "offline"
        })
        .await;
    let (code, body) = c
        .raw(Method::DELETE, "/api/v1/cluster/members/3", None)
        .await
        .expect("raw");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("--force"), "{text}");
    let (code, body) = c
        .raw(Method::DELETE, "/api/v1/cluster/members/3?force=true", None)
        .await
        .expect("raw");
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&body));
    let s = cluster
        .wait_status(
            1,
            Duration::from_secs(10),
            "host 3 gone from membership",
            |s| members(s).len() == 2 && s["voters"] == 2,
        )
        .await;
    assert_eq!(s["quorum"], true);
    c.post::<_, Value>("/api/v1/tokens", &json!({ "name": "after-removal" }))
        .await
        .expect("write after removal");
    // Its ID is never given out again.
    let t: Value = c
        .post("/api/v1/cluster/tokens", &json!({}))
        .await
        .expect("token");
    let (code, body) = anon
        .raw(
            Method::POST,
            "/api/v1/cluster/join",
            Some(&json!({
                "token": t["token"],
                "name": "newcomer",
                "api_address": "http://127.0.0.1:9",
            })),
        )
        .await
        .expect("raw");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let reply: Value = serde_json::from_slice(&body).expect("join reply");
    assert_eq!(reply["node_id"], 4);
    // Joining used the token up.
    let (code, _) = anon
        .raw(
            Method::POST,
            "/api/v1/cluster/join",
            Some(&json!({
                "token": t["token"],
                "name": "again",
                "api_address": "http://127.0.0.1:9",
            })),
        )
        .await
        .expect("raw");
    assert_eq!(code, 401);
}

/// Right after a host dies, a create through a survivor lands on a live host or fails with
/// nothing recorded; once the host has missed a few heartbeats it is no placement target at
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_right_after_a_host_dies_land_on_live_hosts() {
    let mut cluster = TestCluster::start(&["full", "full", "full"], &[]).await;
    let leader = cluster.leader_index(0).await;
    let victim = (leader + 1) % 3;
    let survivor = (leader + 2) % 3;
    let victim_id = NodeId(host_id(&cluster.nodes[victim]).await);
    let c = cluster.admin(survivor).await;
    cluster.nodes[victim].kill();
    let killed = Instant::now();
    let mut made = Vec::new();
    let mut failed = Vec::new();
    // Spread placement prefers the emptiest host, so the dead one is chosen at first. Twelve
    // creates, one every 250 ms (twelve 1-vCPU VMs fit on the two survivors).
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let name = format!("after-kill-{i}");
        let at = killed.elapsed();
        match c.create_vm(&demo_vm(&name)).await {
            Ok(vm) => {
                assert_ne!(vm.node, victim_id, "{name} was placed on the dead host");
                made.push(name);
            }
            Err(e) => {
                assert!(
                    at < Duration::from_secs(1),
                    "a create {at:?} after the kill (past the heartbeat threshold) failed: {e}"
                );
                failed.push((name, e.to_string()));
            }
        }
    }
    eprintln!(
        "{} created, {} failed: {failed:?}",
        made.len(),
        failed.len()
    );
    assert!(made.len() >= 5, "{made:?}");
    let vms = c.list_vms().await.expect("list");
    assert!(
        vms.iter().all(|v| v.node != victim_id),
        "VMs recorded on the dead host: {vms:?}"
    );
    for (name, _) in &failed {
        assert!(
            vms.iter().all(|v| &v.name != name),
            "the failed create of {name} left a record"
        );
    }
    // The dry run says why the dead host is out.
    let report = c
        .place(&novacron_types::PlacementRequest {
            vcpus: 1,
            memory_mib: 128,
            disk_mib: 0,
            image: None,
            placement: Default::default(),
            node: None,
            strategy: None,
            pool: None,
        })
        .await
        .expect("dry run");
    let out = report
        .rejected
        .iter()
        .find(|r| r.node == victim_id)
        .expect("the dead host is rejected");
    let codes: Vec<&str> = out.reasons.iter().map(|r| r.code.as_str()).collect();
    assert!(
        codes.contains(&"not_heartbeating") || codes.contains(&"offline"),
        "{codes:?}"
    );
}
