//! Three Raft nodes in one process over the in-process transport: joining as learners,
//! promotion, writes forwarded from followers, linearizable follower reads, a partitioned
//! leader replaced, and a node that was away catching up by snapshot.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use novacron_state::inprocess::InProcess;
use novacron_state::raft::{NodeAddr, StartMode};
use novacron_state::{CommandV1, RaftSettings, StateHandle};
mod common;

use common::image;
use novacron_types::{ErrorCode, NodeId};

fn settings() -> RaftSettings {
    RaftSettings {
        heartbeat_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        snapshot_every: 20,
        keep_after_snapshot: 5,
        purge_batch: 1,
        forward_timeout_ms: 2000,
        leaderless_wait_ms: 3000,
    }
}

fn addr(i: u64) -> String {
    format!("mem://node-{i}")
}

struct Cluster {
    net: InProcess,
    nodes: Vec<StateHandle>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start(n: u64) -> Self {
        let net = InProcess::default();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for i in 1..=n {
            let dir = tempfile::tempdir().expect("tempdir");
            let mode = if i == 1 {
                StartMode::Bootstrap
            } else {
                StartMode::Join
            };
            let h = StateHandle::open(
                dir.path(),
                NodeId(i),
                addr(i),
                &settings(),
                Arc::new(net.port(&addr(i))),
                mode,
            )
            .await
            .expect("open");
            net.register(&addr(i), h.clone());
            nodes.push(h);
            dirs.push(dir);
        }
        nodes[0]
            .wait_ready(Duration::from_secs(10))
            .await
            .expect("bootstrap ready");
        for i in 2..=n {
            nodes[0]
                .add_learner(i, NodeAddr { api_addr: addr(i) })
                .await
                .expect("add learner");
        }
        nodes[0]
            .set_voters((1..=n).collect())
            .await
            .expect("promote");
        Self {
            net,
            nodes,
            _dirs: dirs,
        }
    }

    fn node(&self, id: u64) -> &StateHandle {
        &self.nodes[(id - 1) as usize]
    }

    async fn wait_leader_among(&self, ids: &[u64]) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            for &i in ids {
                let m = self.node(i).metrics();
                if m.role == "leader" && ids.contains(&i) {
                    return i;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader among {ids:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_forward_read_fail_over_and_catch_up() {
    let c = Cluster::start(3).await;
    let m = c.node(1).membership();
    assert_eq!(m.voters, BTreeSet::from([1, 2, 3]));
    assert!(m.learners.is_empty());

    // A write through a follower is forwarded, and visible on that follower when it returns.
    c.node(2)
        .propose(CommandV1::CreateImage {
            image: image("via-follower"),
        })
        .await
        .expect("forwarded write");
    assert!(
        c.node(2)
            .read(|s| s.image_by_name("via-follower").is_some())
    );
    // A rejected command comes back as its error through the forwarder too.
    let dup = c
        .node(3)
        .propose(CommandV1::CreateImage {
            image: image("via-follower"),
        })
        .await
        .expect_err("duplicate name");
    assert_eq!(dup.code, ErrorCode::Conflict);
    // Linearizable read on the other follower sees it.
    let seen = c
        .node(3)
        .read_linearizable(|s| s.image_by_name("via-follower").is_some())
        .await
        .expect("follower read");
    assert!(seen);

    // Cut the leader off: the other two elect a leader and keep taking writes; the old leader
    // cannot commit anything.
    let old = c.wait_leader_among(&[1, 2, 3]).await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let other_addrs: Vec<String> = others.iter().map(|i| addr(*i)).collect();
    let other_refs: Vec<&str> = other_addrs.iter().map(String::as_str).collect();
    c.net.isolate(&addr(old), &other_refs);
    let new = c.wait_leader_among(&others).await;
    assert_ne!(new, old);
    c.node(others[1])
        .propose(CommandV1::CreateImage {
            image: image("after-failover"),
        })
        .await
        .expect("write after failover");
    let stuck = c
        .node(old)
        .propose(CommandV1::CreateImage {
            image: image("on-the-cut-off-leader"),
        })
        .await
        .expect_err("a cut-off leader cannot commit");
    assert!(
        matches!(stuck.code, ErrorCode::Timeout | ErrorCode::Unavailable),
        "{stuck:?}"
    );
    assert!(
        c.node(old).read_linearizable(|_| ()).await.is_err(),
        "a cut-off host must not serve linearizable reads"
    );

    // Take a follower away while many entries are written: the log behind the snapshot is purged,
    // so when it is back it can only catch up by snapshot.
    let away = *others.iter().find(|i| **i != new).expect("a follower");
    c.net.unregister(&addr(away));
    c.net.heal();
    for i in 0..80 {
        c.node(new)
            .propose(CommandV1::CreateImage {
                image: image(&format!("while-away-{i}")),
            })
            .await
            .expect("write while a follower is away");
    }
    // openraft purges only logs no replication is reading; retries to the away node hold them
    // for a moment at a time, so the purge may come a little later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut extra = 0;
    loop {
        let leader_metrics = c.node(new).metrics();
        if leader_metrics.purged_index.unwrap_or(0) > c.node(away).metrics().applied_index {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log the away node needs was never purged: {leader_metrics:?}"
        );
        c.node(new)
            .propose(CommandV1::CreateImage {
                image: image(&format!("more-{extra}")),
            })
            .await
            .expect("write while a follower is away");
        extra += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("purged after {extra} extra writes");
    c.net.register(&addr(away), c.node(away).clone());
    c.node(away)
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("caught up");
    assert!(
        c.node(away).metrics().snapshot_index.is_some(),
        "caught up without a snapshot?"
    );
    let want = c.node(new).read(|s| s.clone());
    let got = c
        .node(away)
        .read_linearizable(|s| s.clone())
        .await
        .expect("read");
    assert_eq!(got.images.len(), want.images.len());
    // The old leader's uncommitted write never shows up anywhere.
    assert!(got.image_by_name("on-the-cut-off-leader").is_none());
    assert!(
        c.node(old)
            .read_linearizable(|s| s.image_by_name("on-the-cut-off-leader").is_none())
            .await
            .expect("old leader rejoined")
    );
    for n in &c.nodes {
        n.shutdown().await;
    }
}

/// A leader that restarts does not take its leadership back in the same term: state-machine
/// rows are not fsynced and the commit index is not stored, so a restored leader could serve
/// reads from a state older than what it acknowledged. It must win an election (a new term,
/// with a new entry of its own) first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_wins_an_election_before_it_serves() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader_among(&[1, 2, 3]).await;
    c.node(leader)
        .propose(CommandV1::CreateImage {
            image: image("before-restart"),
        })
        .await
        .expect("write");
    let term = c.node(leader).metrics().term;
    let i = (leader - 1) as usize;
    // Stop it and let go of every handle on its store, as a process exit would.
    c.net.unregister(&addr(leader));
    let old = c.nodes.remove(i);
    old.shutdown().await;
    drop(old);
    let reopened = reopen(&c, leader).await;
    c.net.register(&addr(leader), reopened.clone());
    c.nodes.insert(i, reopened);
    // Right after the restart, and for a while: never the leader of its old term.
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        let m = c.node(leader).metrics();
        assert!(
            !(m.role == "leader" && m.term == term),
            "the restarted host leads term {term} again without an election"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The cluster goes on, in a later term, and still has the write.
    let now = c.wait_leader_among(&[1, 2, 3]).await;
    assert!(c.node(now).metrics().term > term);
    let found = c
        .node(now)
        .read_linearizable(|s| s.image_by_name("before-restart").is_some())
        .await
        .expect("read");
    assert!(found);
}

/// Opens node `id`'s data dir again, once the tasks of its stopped incarnation have let go of
/// the database (they end soon after `shutdown`, not during it).
async fn reopen(c: &Cluster, id: u64) -> StateHandle {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match StateHandle::open(
            c._dirs[(id - 1) as usize].path(),
            NodeId(id),
            addr(id),
            &settings(),
            Arc::new(c.net.port(&addr(id))),
            StartMode::Join,
        )
        .await
        {
            Ok(h) => return h,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen node {id}: {e}"),
        }
    }
}
