//! Chaos tests against real `novacron` processes behind fault-injecting proxies.
//!
//! Seeded and reproducible in the faults they choose: `NOVACRON_CHAOS_SEED` (default 13; a
//! second test always runs seed 29) picks the faults and the workload,
//! `NOVACRON_CHAOS_SECONDS` (default 60, the CI profile) how long faults are injected. Each
//! prints a timeline (faults, heals, leader changes, with times) and a summary line. A longer
//! run by hand (or `scripts/chaos-sweep.sh` for many seeds):
//!
//! ```text
//! NOVACRON_CHAOS_SECONDS=300 NOVACRON_CHAOS_SEED=7 cargo nextest run -p novacron --test chaos
//! ```

mod common;

use std::time::{Duration, Instant};

use common::chaos::{ChaosCluster, Workload, check_invariants};
use common::{demo_vm, wait_console, wait_state};
use nix::sys::signal::Signal;
use novacron_chaos::linearizability::{Action, Operation};
use novacron_chaos::seeded::Seeded;
use novacron_types::{CreateVmRequest, NodeId, VmState};
use serde_json::Value;

fn seed() -> u64 {
    std::env::var("NOVACRON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(13)
}

fn chaos_seconds() -> u64 {
    std::env::var("NOVACRON_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillRestartLeader,
    KillRestartFollower,
    PauseHost,
    IsolateLeader,
    IsolateFollower,
    OneWayFromLeader,
    OneWayToLeader,
    Degrade,
}

const FAULTS: [Fault; 8] = [
    Fault::KillRestartLeader,
    Fault::KillRestartFollower,
    Fault::PauseHost,
    Fault::IsolateLeader,
    Fault::IsolateFollower,
    Fault::OneWayFromLeader,
    Fault::OneWayToLeader,
    Fault::Degrade,
];

async fn inject(c: &mut ChaosCluster, rng: &mut Seeded, fault: Fault) {
    let ids = c.ids();
    let leader = c.leader(Duration::from_secs(20)).await;
    let followers: Vec<u32> = ids.iter().copied().filter(|i| *i != leader).collect();
    let follower = *rng.pick(&followers);
    let hold = Duration::from_millis(800 + rng.below(1700));
    c.log(format!(
        "fault: {fault:?} (leader {leader}, follower {follower}) for {hold:?}"
    ));
    match fault {
        Fault::KillRestartLeader | Fault::KillRestartFollower => {
            let victim = if matches!(fault, Fault::KillRestartLeader) {
                leader
            } else {
                follower
            };
            c.host_mut(victim).node.kill();
            tokio::time::sleep(hold).await;
            let mut node =
                std::mem::replace(&mut c.host_mut(victim).node, common::Node::placeholder());
            let node = tokio::task::spawn_blocking(move || {
                node.start_again();
                node
            })
            .await
            .expect("restart");
            c.host_mut(victim).node = node;
        }
        Fault::PauseHost => {
            let victim = *rng.pick(&ids);
            c.host(victim).node.signal(Signal::SIGSTOP);
            tokio::time::sleep(hold).await;
            c.host(victim).node.signal(Signal::SIGCONT);
        }
        Fault::IsolateLeader | Fault::IsolateFollower => {
            let victim = if matches!(fault, Fault::IsolateLeader) {
                leader
            } else {
                follower
            };
            let others: Vec<u32> = ids.iter().copied().filter(|i| *i != victim).collect();
            c.net.partition(&[victim], &others);
            tokio::time::sleep(hold).await;
        }
        Fault::OneWayFromLeader => {
            for f in &followers {
                c.net.cut_one_way(leader, *f);
            }
            tokio::time::sleep(hold).await;
        }
        Fault::OneWayToLeader => {
            for f in &followers {
                c.net.cut_one_way(*f, leader);
            }
            tokio::time::sleep(hold).await;
        }
        Fault::Degrade => {
            c.net.degrade(
                &ids,
                Duration::from_millis(10),
                Duration::from_millis(30),
                0.02,
            );
            tokio::time::sleep(hold * 2).await;
        }
    }
    c.net.heal();
    c.log(format!("healed: {fault:?}"));
}

/// Seeded faults for `chaos_seconds()` under a recorded workload, then the checks. Prints a
/// timeline (faults, heals, leader changes) as it goes and a summary line at the end.
async fn faults_under_load(seed: u64) {
    let seconds = chaos_seconds();
    eprintln!("chaos seed {seed}, {seconds} s (replay with NOVACRON_CHAOS_SEED={seed})");
    let mut rng = Seeded::new(seed);
    let mut c = ChaosCluster::start(3, seed, &[]).await;
    let workload = Workload::start(&c, 6, seed).await;
    let conns_before = c.internal_connections().await;
    let began = Instant::now();
    let until = began + Duration::from_secs(seconds);
    let mut injected = Vec::new();
    // Every fault kind once (in a seeded order), then seeded picks until time is up.
    let mut order: Vec<Fault> = FAULTS.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut i = 0;
    while i < order.len() || Instant::now() < until {
        let fault = if i < order.len() {
            order[i]
        } else {
            *rng.pick(&FAULTS)
        };
        i += 1;
        inject(&mut c, &mut rng, fault).await;
        injected.push(fault);
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
    }
    c.wait_all_online(Duration::from_secs(30)).await;
    let conns = c.internal_connections().await.saturating_sub(conns_before);
    let elapsed = began.elapsed();
    let rec = workload.finish(&c).await;
    eprintln!("injected {} faults: {injected:?}", injected.len());
    check_invariants(&c, &rec, &format!("seed {seed}")).await;
    let ops = rec.ops.lock().expect("ops").len();
    eprintln!(
        "chaos summary: seed {seed}, {:.0} s, {} faults, {ops} operations checked ({} \
         acknowledged writes, {} reads), 0 anomalies, {:.1} new host-to-host connections/s per \
         host, {} open descriptors in the test process",
        elapsed.as_secs_f64(),
        injected.len(),
        rec.acked_writes.load(std::sync::atomic::Ordering::Relaxed),
        rec.reads.load(std::sync::atomic::Ordering::Relaxed),
        conns as f64 / elapsed.as_secs_f64() / 3.0,
        common::chaos::open_fds()
    );
}

/// The seed from `NOVACRON_CHAOS_SEED` (13 by default: CI's first seed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_keep_the_history_linearizable() {
    faults_under_load(seed()).await;
}

/// CI's second seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_keep_the_history_linearizable_second_seed() {
    faults_under_load(29).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_host_fences_its_vms_before_its_lease_runs_out() {
    let mut c = ChaosCluster::start(3, seed(), &[]).await;
    let admin = c.admin(1).await;
    // The guest runs on host 3; make sure host 3 does not lead (isolating a leader works the same
    // for fencing, but the test then reads the takeover time from the next leader).
    let leader = c.leader(Duration::from_secs(10)).await;
    if leader == 3 {
        let _: Value = admin
            .post("/api/v1/cluster/leader", &serde_json::json!({ "to": 1 }))
            .await
            .expect("transfer");
    }
    admin
        .create_vm(&CreateVmRequest {
            node: Some(NodeId(3)),
            placement: Default::default(),
            ..demo_vm("fenced")
        })
        .await
        .expect("create");
    let op = admin.vm_action("fenced", "start").await.expect("start");
    admin
        .wait_success(&op, Duration::from_secs(60))
        .await
        .expect("start op");
    wait_state(&admin, "fenced", VmState::Running, Duration::from_secs(10)).await;
    wait_console(&admin, "fenced", "tick 1", 1, Duration::from_secs(60)).await;
    let vm = admin.get_vm("fenced").await.expect("vm");
    let console = c
        .host(3)
        .node
        .data_dir()
        .join("vms")
        .join(vm.id.to_string())
        .join("console.log");

    // Cut host 3 off. Sample, from the majority's leader, when it would let another host take
    // over host 3's VMs; host 3 must have fenced before the earliest of those moments.
    c.net.partition(&[3], &[1, 2]);
    let cut = Instant::now();
    let wall = || novacron_types::now_millis();
    let mut earliest_takeover = i64::MAX;
    let fenced_at = loop {
        let leader = c.leader(Duration::from_secs(10)).await;
        if leader != 3
            && let Some(s) = c.local_status(leader).await
            && let Some(m) = s["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["id"] == 3))
            && let Some(ms) = m["takeover_safe_in_ms"].as_i64()
        {
            earliest_takeover = earliest_takeover.min(wall() + ms);
        }
        if let Some(s) = c.local_status(3).await
            && let Some(f) = s["local"]["fenced"].as_array().and_then(|f| f.first())
        {
            assert_eq!(s["local"]["isolated"], true);
            assert_eq!(f["vms"][0], "fenced", "{f}");
            break f["at"].as_i64().expect("fence time");
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "host 3 never fenced itself"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "fenced {:?} after the cut; takeover allowed {} ms after fencing",
        cut.elapsed(),
        earliest_takeover - fenced_at
    );
    assert!(
        fenced_at < earliest_takeover,
        "host 3 fenced at {fenced_at}, after another host could take over at {earliest_takeover}"
    );
    // Fenced means paused: the guest's ticks stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = std::fs::read_to_string(&console).expect("console");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = std::fs::read_to_string(&console).expect("console");
    assert_eq!(
        common::last_tick(&before),
        common::last_tick(&after),
        "the guest kept running on an isolated host"
    );
    // The isolated host refuses writes and says why.
    let c3 = c.admin(3).await;
    let (code, body) = c3
        .raw(
            reqwest::Method::PATCH,
            "/api/v1/vms/fenced",
            Some(&serde_json::json!({ "labels": { "a": "b" } })),
        )
        .await
        .expect("raw");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("isolated"), "{text}");

    // Healed: the host renews its lease, takes writes again, and reports the VM paused.
    c.net.heal();
    c.wait_all_online(Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = c3
            .raw(
                reqwest::Method::PATCH,
                "/api/v1/vms/fenced",
                Some(&serde_json::json!({ "labels": { "a": "b" } })),
            )
            .await
            .expect("raw");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "host 3 still refuses writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still its own and meant to run (nobody can have started it elsewhere: it is not an HA
    // VM): the host resumes it, and the guest ticks on from where it stopped, not rebooted.
    wait_state(&admin, "fenced", VmState::Running, Duration::from_secs(10)).await;
    let paused_at = common::last_tick(&std::fs::read_to_string(&console).expect("console"));
    wait_console(
        &admin,
        "fenced",
        &format!("tick {}", paused_at + 2),
        1,
        Duration::from_secs(30),
    )
    .await;
    let text = std::fs::read_to_string(&console).expect("console");
    assert_eq!(text.matches("READY").count(), 1, "rebooted:\n{text}");
    let op = admin.vm_action("fenced", "force-stop").await.expect("stop");
    admin
        .wait_success(&op, Duration::from_secs(30))
        .await
        .expect("stop op");
    let _ = &mut c;
}

/// The negative control: the same workload reading with `consistency=stale` while a host is cut
/// off must produce a history the checker rejects, or these tests could not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_from_a_cut_off_host_are_caught() {
    let c = ChaosCluster::start(3, seed(), &[]).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let victim = c
        .ids()
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    let others: Vec<u32> = c.ids().into_iter().filter(|i| *i != victim).collect();
    let workload = Workload::start_with(&c, 6, seed(), true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.net.partition(&[victim], &others);
    // Besides whatever the clients happen to do (a busy machine may leave the cut-off host's
    // clients stuck in writes), one certain pair: a write through the majority, then a stale
    // read through the cut-off host.
    let (majority, cut_off) = (c.admin(leader).await, c.admin(victim).await);
    let value = 1_000_000_000u64;
    let invoked = workload.now();
    let (code, body) = majority
        .raw(
            reqwest::Method::PATCH,
            "/api/v1/vms/reg-a",
            Some(&serde_json::json!({ "labels": { "k0": value.to_string() } })),
        )
        .await
        .expect("raw");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    workload.record(Operation {
        key: "reg-a/k0".into(),
        action: Action::Write { value },
        invoked,
        completed: Some(workload.now()),
    });
    let invoked = workload.now();
    let v: Value = cut_off
        .get("/api/v1/vms/reg-a?consistency=stale")
        .await
        .expect("stale read");
    workload.record(Operation {
        key: "reg-a/k0".into(),
        action: Action::Read {
            value: v["labels"]["k0"].as_str().and_then(|s| s.parse().ok()),
        },
        invoked,
        completed: Some(workload.now()),
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rec = {
        // Stop before healing: the cut-off host's stale answers are in the history.
        c.net.heal();
        c.wait_all_online(Duration::from_secs(20)).await;
        workload.finish(&c).await
    };
    match common::chaos::verdict(&rec) {
        novacron_chaos::linearizability::Verdict::NotLinearizable { key, .. } => {
            eprintln!("caught a stale read on {key}, as it should");
        }
        other => panic!("stale reads from a cut-off host went unnoticed: {other:?}"),
    }
}

/// Membership under load: a host joins and a dead voter is removed while clients write and
/// read through every host; the newcomer takes the dead voter's seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_and_leave_under_load() {
    let mut c = ChaosCluster::start(3, seed(), &[]).await;
    let workload = Workload::start(&c, 6, seed()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = c.add_host("full").await;
    let s = c.wait_all_online(Duration::from_secs(30)).await;
    let newcomer = s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == new).cloned())
        .expect("the new host is listed");
    assert_eq!(
        newcomer["role"], "learner",
        "three voters already: {newcomer}"
    );

    // A voter dies and is removed: the caught-up learner is promoted in its place.
    let leader = c.leader(Duration::from_secs(10)).await;
    let victim = c
        .ids()
        .into_iter()
        .find(|i| *i != leader && *i != new)
        .expect("a voting follower");
    c.host_mut(victim).node.kill();
    let admin = c.admin(leader).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match admin
            .delete(&format!("/api/v1/cluster/members/{victim}?force=true"))
            .await
        {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "removal kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    c.host_mut(victim).removed = true;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = c.leader(Duration::from_secs(10)).await;
        let s = c.local_status(leader).await.expect("status");
        let ms = s["members"].as_array().cloned().unwrap_or_default();
        let voting: Vec<u64> = ms
            .iter()
            .filter(|m| m["voting"] == true)
            .filter_map(|m| m["id"].as_u64())
            .collect();
        if ms.len() == 3 && voting.len() == 3 && voting.contains(&(new as u64)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the newcomer never took the removed voter's seat: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.wait_all_online(Duration::from_secs(20)).await;
    let rec = workload.finish(&c).await;
    check_invariants(&c, &rec, "membership under load").await;
}
