//! A one-voter Raft node on a real redb file: commands apply, snapshots are built and the log is
//! purged behind them, and a restart recovers the same state.

use std::time::Duration;

use std::sync::Arc;

use novacron_state::inprocess::InProcess;
use novacron_state::raft::StartMode;
use novacron_state::{CommandV1, RaftSettings, StateHandle};
mod common;

use common::image;
use novacron_types::{ErrorCode, NodeId};

fn settings() -> RaftSettings {
    RaftSettings {
        snapshot_every: 20,
        keep_after_snapshot: 5,
        purge_batch: 1,
        ..RaftSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_purge_the_log_and_restart_recovers_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeId(1);
    let addr = "http://127.0.0.1:1".to_string();
    let net = InProcess::default();

    let settings = settings();
    let open = || {
        StateHandle::open(
            dir.path(),
            node,
            addr.clone(),
            &settings,
            Arc::new(net.port(&addr)),
            StartMode::Bootstrap,
        )
    };
    let state = open().await.expect("open");
    state
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    for i in 0..60 {
        state
            .propose(CommandV1::CreateImage {
                image: image(&format!("img-{i}")),
            })
            .await
            .expect("write");
    }
    // A rejected command is reported and changes nothing.
    let dup = state
        .propose(CommandV1::CreateImage {
            image: image("img-0"),
        })
        .await
        .expect_err("dup");
    assert_eq!(dup.code, ErrorCode::Conflict);
    assert_eq!(state.read(|s| s.images.len()), 60);

    // The policy (every 20 entries) must have produced a snapshot and purged the log behind it,
    // keeping at most 5 entries before the snapshot point.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = state.metrics();
        if let (Some(snap), Some(purged)) = (m.snapshot_index, m.purged_index)
            && snap >= 40
            && purged + 5 >= snap
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot/purge: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = state.read(|s| s.clone());
    state.shutdown().await;
    drop(state);

    // Raft's tasks release the database shortly after shutdown returns.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let state = loop {
        match open().await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("reopen: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    };
    state
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready again");
    assert_eq!(
        state.read(|s| s.clone()),
        before,
        "state after restart differs"
    );
    state
        .propose(CommandV1::CreateImage {
            image: image("after-restart"),
        })
        .await
        .expect("write after restart");
    assert_eq!(state.read(|s| s.images.len()), 61);
    state.shutdown().await;
}
