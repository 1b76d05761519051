//! Volumes on a real node with real QEMU guests:
//! - a volume hot-plugged into a running guest that writes to it shows in the I/O statistics,
//!   moves hot → cold → hot while the guest keeps writing (live, `blockdev-mirror`), and loses
//!   nothing: the data written before is the same (checksum), and every write the guest saw
//!   acknowledged is on disk, in order;
//! - a detached volume is copied compressed into a cold pool and back, each copy held to its
//!   rate limit, its content unchanged;
//! - the API's and CLI's errors, filters and pagination.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use novacron_client::Client;
use novacron_types::{
    AttachVolumeRequest, CreatePoolRequest, CreateVolumeRequest, MoveVolumeRequest, PoolTier,
    VmState, Volume, VolumeFormat,
};

const MIB: u64 = 1 << 20;
/// The guest's `novacron.seqwrite` blocks: 64 slots of 64 KiB at the start of the disk.
const SLOTS: u64 = 64;
const BLOCK: u64 = 64 * 1024;
const HEADER: usize = 17;

/// These tests check each move against its own limit: the adaptive throttle (unit-tested in
/// `limiter.rs`) would slow moves down on a test machine busy with other guests.
async fn no_throttle(c: &Client) {
    let mut p = c.tiering_policy().await.expect("policy");
    p.max_load_per_cpu = 100.0;
    p.max_guest_latency_ms = 60_000;
    c.set_tiering_policy(&p).await.expect("policy");
}

/// The test's pools under `root`; the copy daemons working there die with the returned guard.
async fn pools(c: &Client, root: &Path) -> Reaper {
    for (name, tier, cost) in [
        ("fast", PoolTier::Hot, 0.2),
        ("archive", PoolTier::Cold, 0.01),
    ] {
        let dir = root.join(name);
        c.create_pool(&CreatePoolRequest {
            name: name.into(),
            path: dir.display().to_string(),
            tier,
            shared: false,
            capacity_bytes: 10 << 30,
            cost_per_gib_month: cost,
            performance_class: None,
        })
        .await
        .expect("pool");
    }
    Reaper(root.to_path_buf())
}

/// A volume of `size_mib` on `pool`, no labels, not attached.
fn vol(name: &str, pool: &str, size_mib: u64, format: VolumeFormat) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        size_mib,
        format,
        pool: Some(pool.into()),
        node: None,
        attach_to: None,
        labels: Default::default(),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mib` MiB of random data in a new file `path`.
fn random_file(path: &Path, mib: u64) -> PathBuf {
    run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", path.display()),
        "bs=1M",
        &format!("count={mib}"),
        "status=none",
    ]));
    path.to_path_buf()
}

/// Writes all of `data` into the disk image `file` at `at` (`qemu-io`, e.g. `8M`).
fn write_into(file: &Path, format: VolumeFormat, data: &Path, at: &str) {
    let len = std::fs::metadata(data).expect("data").len();
    run(Command::new("qemu-io").args([
        "-f",
        format.as_str(),
        "-c",
        &format!("write -q -s {} {at} {len}", data.display()),
        &file.display().to_string(),
    ]));
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The volume's content as raw bytes in `into`.
fn raw_copy(file: &Path, format: VolumeFormat, into: &Path) -> Vec<u8> {
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        format.as_str(),
        "-O",
        "raw",
        &file.display().to_string(),
        &into.display().to_string(),
    ]));
    std::fs::read(into).expect("read raw copy")
}

fn volume_file(data: &Path, pools: &Path, v: &Volume) -> PathBuf {
    let name = format!("{}.{}", v.id, v.format.as_str());
    match v.pool.as_str() {
        "data" => data.join("volumes").join(name),
        p => match v.node {
            Some(n) => pools.join(p).join(format!("host-{}", n.0)),
            None => pools.join(p),
        }
        .join("volumes")
        .join(name),
    }
}

async fn move_to(c: &Client, vol: &str, pool: &str, rate_mb: Option<u64>) -> (Volume, Duration) {
    let started = Instant::now();
    let op = c
        .move_volume(
            vol,
            &MoveVolumeRequest {
                pool: pool.into(),
                rate_mb,
            },
        )
        .await
        .expect("move");
    assert_eq!(op.kind, "volume.move");
    c.wait_success(&op, Duration::from_secs(180))
        .await
        .unwrap_or_else(|e| panic!("move of {vol} to {pool}: {e}"));
    let took = started.elapsed();
    let v = c.get_volume(vol).await.expect("volume");
    assert_eq!(v.pool, pool);
    assert_eq!(v.moving_to, None);
    (v, took)
}

/// Starts VM `vm`, a demo guest that writes numbered blocks to its second disk, hot-plugs
/// `volume` as that disk, and waits until the guest has written to it.
async fn writing_guest(c: &Client, vm: &str, volume: &str) {
    c.create_vm(&demo_vm_with(vm, "novacron.seqwrite=vdb"))
        .await
        .expect("vm");
    start_vm(c, vm).await;
    wait_console(
        c,
        vm,
        "NOVACRON-DEMO-GUEST READY",
        1,
        Duration::from_secs(60),
    )
    .await;
    c.volume_action(volume, "attach", &AttachVolumeRequest { vm: vm.into() })
        .await
        .expect("attach");
    wait_ack(c, vm, 5).await;
}

fn last_ack(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("seqwrite "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

async fn wait_ack(c: &Client, vm: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = last_ack(&console_text(c, vm).await);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the guest acknowledged only {n} writes, waiting for {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moves_hot_cold_hot_under_a_writing_guest_and_loses_nothing() {
    let node = Node::start_with(vec!["--stats-interval".into(), "1".into()]);
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    no_throttle(&c).await;

    // A 16 MiB volume on the hot pool; its last 12 MiB hold random data the guest never
    // touches (it writes the first 4 MiB).
    let v = c
        .create_volume(&CreateVolumeRequest {
            labels: [("app".to_string(), "db".to_string())].into(),
            ..vol("data1", "fast", 16, VolumeFormat::Qcow2)
        })
        .await
        .expect("create volume");
    let file = volume_file(&node.data_dir(), root.path(), &v);
    assert!(file.exists(), "{} missing", file.display());
    let seed = random_file(&root.path().join("seed.bin"), 12);
    write_into(&file, VolumeFormat::Qcow2, &seed, "4M");
    let seed_sum = sha256(&seed);

    c.create_vm(&demo_vm_with("writer", "novacron.seqwrite=vdb"))
        .await
        .expect("create vm");
    start_vm(&c, "writer").await;
    wait_console(
        &c,
        "writer",
        "NOVACRON-DEMO-GUEST READY",
        1,
        Duration::from_secs(60),
    )
    .await;

    // Hot-plug: the guest sees /dev/vdb appear and starts writing.
    let attached = c
        .volume_action(
            "data1",
            "attach",
            &AttachVolumeRequest {
                vm: "writer".into(),
            },
        )
        .await
        .expect("attach");
    let vm = c.get_vm("writer").await.expect("vm");
    assert_eq!(attached.attached_to, Some(vm.id));
    wait_console(
        &c,
        "writer",
        "seqwrite device vdb present",
        1,
        Duration::from_secs(30),
    )
    .await;
    wait_ack(&c, "writer", 10).await;

    // The collector sees the guest's writes to the volume.
    let disk = format!("vol-{}", v.id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.disk_stats("writer", None).await.expect("stats");
        let wr: u64 = r
            .disks
            .iter()
            .filter(|d| d.disk == disk)
            .flat_map(|d| d.buckets.iter())
            .map(|b| b.wr_bytes)
            .sum();
        if wr >= 10 * BLOCK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the volume's writes never showed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Hot → cold, live, at most 4 MB/s: 16 MiB takes at least ~4 s.
    let before = wait_ack(&c, "writer", 1).await;
    let (cold, took) = move_to(&c, "data1", "archive", Some(4)).await;
    let rate = 16.0 * MIB as f64 / took.as_secs_f64() / 1e6;
    eprintln!("live move to cold: {took:?}, {rate:.2} MB/s (limit 4)");
    assert!(
        rate <= 4.0 * 1.1,
        "the live move ran at {rate:.2} MB/s, over its 4 MB/s limit"
    );
    assert!(!file.exists(), "the hot copy is removed after the move");
    let cold_file = volume_file(&node.data_dir(), root.path(), &cold);
    assert!(cold_file.exists(), "{} missing", cold_file.display());
    assert!(!cold.compressed, "a live mirror stores plain clusters");
    // The guest noticed nothing: its writes go on.
    let after_cold = wait_ack(&c, "writer", before + 10).await;

    // And back, live, at the policy's limits.
    let (hot, _) = move_to(&c, "data1", "fast", None).await;
    assert!(
        !cold_file.exists(),
        "the cold copy is removed after the move"
    );
    let acked = wait_ack(&c, "writer", (after_cold + 10).max(SLOTS + 10)).await;
    assert_eq!(
        c.get_vm("writer").await.expect("vm").state,
        VmState::Running
    );

    // Stop the guest and read the volume as it is on disk.
    let op = c.vm_action("writer", "force-stop").await.expect("stop");
    c.wait_success(&op, Duration::from_secs(60))
        .await
        .expect("stopped");
    let acked = acked.max(last_ack(&console_text(&c, "writer").await));
    let hot_file = volume_file(&node.data_dir(), root.path(), &hot);
    let bytes = raw_copy(&hot_file, hot.format, &root.path().join("final.raw"));
    assert_eq!(bytes.len() as u64, 16 * MIB);

    // The data written before the moves: same checksum.
    let tail = root.path().join("tail.bin");
    std::fs::write(&tail, &bytes[(4 * MIB) as usize..]).expect("write tail");
    assert_eq!(
        sha256(&tail),
        seed_sum,
        "the volume's data changed across the moves"
    );

    // Every acknowledged write is there, and the disk is exactly writes 1..=S for some S >= the
    // last acknowledged: each slot holds the latest block written to it, with intact contents.
    let header = |slot: u64| -> u64 {
        let b = &bytes[(slot * BLOCK) as usize..(slot * BLOCK) as usize + HEADER];
        let text = std::str::from_utf8(b).unwrap_or_else(|_| panic!("slot {slot}: not a header"));
        text.strip_prefix("NCSEQ ")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("slot {slot}: bad header {text:?}"))
    };
    let seqs: Vec<u64> = (0..SLOTS).map(header).collect();
    let last = *seqs.iter().max().unwrap_or(&0);
    assert!(
        last >= acked,
        "write {acked} was acknowledged but the disk ends at {last}"
    );
    for (slot, n) in seqs.iter().enumerate() {
        assert_eq!(*n % SLOTS, slot as u64, "slot {slot} holds write {n}");
        assert!(
            *n + SLOTS > last,
            "slot {slot} holds write {n}, but write {} (newer, same slot) was made",
            n + SLOTS
        );
    }
    let body = |slot: u64| &bytes[(slot * BLOCK) as usize + HEADER..((slot + 1) * BLOCK) as usize];
    for slot in 1..SLOTS {
        assert!(body(slot) == body(0), "slot {slot}'s data is torn");
    }
    eprintln!(
        "guest acknowledged {acked} writes (before: {before}, after the cold move: \
         {after_cold}); disk holds 1..={last}"
    );

    // Metrics: two finished moves, their bytes.
    let text = metrics_text(&node, &c).await;
    assert!(
        text.contains("novacron_volume_moves_total{result=\"finished\"} 2"),
        "{text}"
    );
    let moved: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("novacron_volume_move_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("bytes moved");
    assert!(moved >= 32.0 * MIB as f64, "bytes moved: {moved}");
}

/// `qemu-img info` of a disk (a running QEMU may hold it: `-U`).
fn disk_info(file: &Path) -> serde_json::Value {
    let out = run(Command::new("qemu-img").args([
        "info",
        "-U",
        "--output=json",
        &file.display().to_string(),
    ]));
    serde_json::from_str(&out).expect("qemu-img info")
}

/// The guest's view of a (stopped) VM's disk through its link in the VM's directory.
fn guest_view(link: &Path, into: &Path) -> Vec<u8> {
    raw_copy(link, VolumeFormat::Qcow2, into)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_boot_disk_moves_between_pools_running_and_stopped() {
    let node = Node::start();
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    no_throttle(&c).await;

    // The demo guest writes numbered blocks to its own boot disk (the first 4 MiB; it boots
    // from its initrd). 12 MiB of random data at 8 MiB are the disk's own layer, the rest
    // reads through to the image.
    c.create_vm(&demo_vm_with("boot", "novacron.seqwrite=vda"))
        .await
        .expect("vm");
    let vm = c.get_vm("boot").await.expect("vm");
    let link = node
        .data_dir()
        .join("vms")
        .join(vm.id.to_string())
        .join("root.qcow2");
    let seed = random_file(&root.path().join("seed.bin"), 12);
    write_into(&link, VolumeFormat::Qcow2, &seed, "8M");
    let image = disk_info(&link)["backing-filename"]
        .as_str()
        .expect("the boot disk overlays the image")
        .to_string();
    let before = guest_view(&link, &root.path().join("before.raw"));
    let disk = c.get_volume("boot-root").await.expect("root volume");
    assert_eq!(
        (disk.pool.as_str(), disk.vm_disk.as_deref()),
        ("data", Some("root"))
    );

    start_vm(&c, "boot").await;
    wait_console(
        &c,
        "boot",
        "seqwrite device vda present",
        1,
        Duration::from_secs(60),
    )
    .await;
    let acked = wait_ack(&c, "boot", 5).await;

    // Running: data → cold pool → hot pool, live. The VM's pool follows its boot disk; its
    // directory links to the disk; the disk still overlays the image.
    let host = disk.node.expect("a local disk names its host").0;
    let in_pool = |pool: &str| {
        root.path()
            .join(pool)
            .join(format!("host-{host}"))
            .join("vms")
            .join(vm.id.to_string())
            .join("root.qcow2")
    };
    let (cold, _) = move_to(&c, "boot-root", "archive", Some(20)).await;
    assert_eq!(cold.node, disk.node);
    assert_eq!(
        c.get_vm("boot").await.expect("vm").spec.pool.as_deref(),
        Some("archive")
    );
    assert_eq!(
        std::fs::read_link(&link).expect("a link now"),
        in_pool("archive")
    );
    assert_eq!(
        disk_info(&in_pool("archive"))["backing-filename"],
        image.as_str()
    );
    let acked = wait_ack(&c, "boot", acked + 10).await;
    move_to(&c, "boot-root", "fast", None).await;
    assert_eq!(std::fs::read_link(&link).expect("link"), in_pool("fast"));
    assert!(
        !in_pool("archive").exists(),
        "the cold copy goes after the move"
    );
    let acked = wait_ack(&c, "boot", acked + 10).await;

    // Grown through the volume API while it runs: the guest's disk and the VM's spec.
    c.volume_action(
        "boot-root",
        "resize",
        &novacron_types::ResizeVolumeRequest { size_mib: 80 },
    )
    .await
    .expect("grow the boot disk");
    assert_eq!(disk_info(&link)["virtual-size"], 80 * MIB);
    assert_eq!(
        c.get_vm("boot").await.expect("vm").spec.disks[0].size_mib,
        80
    );
    assert_eq!(c.get_vm("boot").await.expect("vm").state, VmState::Running);

    // Stopped: what the guest wrote is there, and the rest is unchanged.
    let op = c.vm_action("boot", "force-stop").await.expect("stop");
    c.wait_success(&op, Duration::from_secs(60))
        .await
        .expect("stopped");
    let after = guest_view(&link, &root.path().join("after.raw"));
    let sixty_four = (64 * MIB) as usize;
    assert!(
        after[(4 * MIB) as usize..sixty_four] == before[(4 * MIB) as usize..sixty_four],
        "the disk beyond the guest's writes changed across the moves"
    );
    assert!(
        after[sixty_four..].iter().all(|b| *b == 0),
        "the grown part reads zeros"
    );
    let last_header = |bytes: &[u8]| -> u64 {
        (0..SLOTS)
            .filter_map(|slot| {
                let at = (slot * BLOCK) as usize;
                std::str::from_utf8(&bytes[at..at + HEADER])
                    .ok()?
                    .strip_prefix("NCSEQ ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    };
    assert!(
        last_header(&after) >= acked,
        "write {acked} was acknowledged, the disk ends at {}",
        last_header(&after)
    );

    // Stopped, the disk is copied: into pool `data` (the VM's directory holds the file again)
    // and compressed into the cold pool; the VM boots from each.
    move_to(&c, "boot-root", "data", Some(50)).await;
    assert!(
        !std::fs::symlink_metadata(&link)
            .expect("disk")
            .file_type()
            .is_symlink(),
        "in pool `data` the disk is a file in the VM's directory"
    );
    assert!(!in_pool("fast").exists());
    assert_eq!(c.get_vm("boot").await.expect("vm").spec.pool, None);
    let (cold, _) = move_to(&c, "boot-root", "archive", Some(50)).await;
    assert!(cold.compressed, "a copy into a cold pool is compressed");
    assert_eq!(
        disk_info(&in_pool("archive"))["backing-filename"],
        image.as_str()
    );
    assert!(
        guest_view(&link, &root.path().join("copied.raw")) == after,
        "the copies changed the disk"
    );
    start_vm(&c, "boot").await;
    // A fresh console log for this boot (the first boot's is console.log.1).
    wait_console(
        &c,
        "boot",
        "seqwrite device vda present",
        1,
        Duration::from_secs(60),
    )
    .await;

    // And live out of the compressed file, back to the hot pool. (The guest numbers its
    // writes from 1 again: count them.)
    let writes = wait_writes(&c, "boot", 0).await;
    move_to(&c, "boot-root", "fast", None).await;
    assert!(!in_pool("archive").exists());
    wait_writes(&c, "boot", writes + 5).await;
}

/// Waits until the console shows more than `seen` acknowledged writes in all; returns how
/// many it shows.
async fn wait_writes(c: &Client, vm: &str, seen: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = console_text(c, vm)
            .await
            .lines()
            .filter(|l| {
                l.trim()
                    .strip_prefix("seqwrite ")
                    .is_some_and(|n| n.trim().parse::<u64>().is_ok())
            })
            .count();
        if n > seen {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no acknowledged write beyond the {seen} seen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_volume_goes_compressed_into_cold_and_back_within_its_rate() {
    let node = Node::start();
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    no_throttle(&c).await;
    let v = c
        .create_volume(&vol("logs", "fast", 16, VolumeFormat::Raw))
        .await
        .expect("create");
    // Compressible content: text, like logs.
    let file = volume_file(&node.data_dir(), root.path(), &v);
    let text: Vec<u8> = (0..16 * MIB)
        .map(|i| b"novacron log line 0123456789\n"[(i % 29) as usize])
        .collect();
    std::fs::write(&file, &text).expect("fill");
    let sum = sha256(&file);

    // Into cold at 2 MB/s: at least ~8 s, compressed qcow2.
    let (cold, took) = move_to(&c, "logs", "archive", Some(2)).await;
    let rate = 16.0 * MIB as f64 / took.as_secs_f64() / 1e6;
    eprintln!("copy into cold: {took:?}, {rate:.2} MB/s (limit 2)");
    assert!(
        rate <= 2.0 * 1.1,
        "the copy ran at {rate:.2} MB/s, over its 2 MB/s limit"
    );
    assert!(
        rate >= 2.0 * 0.5,
        "the copy ran at {rate:.2} MB/s, far under its limit"
    );
    assert_eq!((cold.format, cold.compressed), (VolumeFormat::Qcow2, true));
    let cold_file = volume_file(&node.data_dir(), root.path(), &cold);
    let size = std::fs::metadata(&cold_file).expect("cold file").len();
    assert!(
        size < 4 * MIB,
        "the cold copy is not compressed: {size} bytes"
    );
    assert!(!file.exists());

    // Back to hot: the same content.
    let (hot, _) = move_to(&c, "logs", "fast", None).await;
    assert!(!hot.compressed);
    let hot_file = volume_file(&node.data_dir(), root.path(), &hot);
    let back = root.path().join("back.raw");
    raw_copy(&hot_file, hot.format, &back);
    assert_eq!(sha256(&back), sum, "content changed through cold and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_errors_filters_pages_and_cli() {
    let node = Node::start();
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    let mk = |name: &str, pool: &str, size_mib: u64| vol(name, pool, size_mib, VolumeFormat::Qcow2);
    for (name, pool) in [("a1", "fast"), ("a2", "fast"), ("b1", "archive")] {
        c.create_volume(&mk(name, pool, 8)).await.expect(name);
    }
    c.create_vm(&demo_vm("box")).await.expect("vm");
    // The VM's boot disk is a volume too.
    let boot = c.get_volume("box-root").await.expect("boot volume");
    assert_eq!(boot.vm_disk.as_deref(), Some("root"));

    // Errors name what is wrong.
    let status = |e: &novacron_client::ClientError| {
        (
            e.status(),
            e.api().and_then(|a| a.field.clone()),
            e.api().and_then(|a| a.reason.clone()),
        )
    };
    let e = c
        .create_volume(&mk("z", "fast", 0))
        .await
        .expect_err("size");
    assert_eq!(status(&e), (Some(400), Some("size_mib".into()), None));
    let e = c
        .create_volume(&mk("z", "nowhere", 8))
        .await
        .expect_err("pool");
    assert_eq!(e.status(), Some(404));
    let e = c
        .create_volume(&mk("a1", "fast", 8))
        .await
        .expect_err("dup");
    assert_eq!(e.status(), Some(409));
    let e = c.delete_volume("box-root").await.expect_err("boot");
    assert_eq!(status(&e).2.as_deref(), Some("volume_attached"));
    let boot_move = |pool: &str| MoveVolumeRequest {
        pool: pool.into(),
        rate_mb: None,
    };
    let e = c
        .move_volume("box-root", &boot_move("data"))
        .await
        .expect_err("already there");
    assert_eq!(status(&e).2.as_deref(), Some("same_pool"));
    // A VM snapshot lives inside the VM's disks: a copy would lose it.
    let op = c.snapshot_vm("box", "s1").await.expect("vm snapshot");
    c.wait_success(&op, Duration::from_secs(30))
        .await
        .expect("vm snapshot");
    let e = c
        .move_volume("box-root", &boot_move("fast"))
        .await
        .expect_err("boot move with a VM snapshot");
    assert_eq!(status(&e).2.as_deref(), Some("has_snapshots"));
    c.delete("/api/v1/vms/box/snapshots/s1")
        .await
        .expect("drop the VM snapshot");
    let e = c
        .move_volume(
            "a1",
            &MoveVolumeRequest {
                pool: "archive".into(),
                rate_mb: Some(500),
            },
        )
        .await
        .expect_err("rate");
    assert_eq!(status(&e).1.as_deref(), Some("rate_mb"));
    let e = c
        .volume_action(
            "a1",
            "resize",
            &novacron_types::ResizeVolumeRequest { size_mib: 4 },
        )
        .await
        .expect_err("shrink");
    assert_eq!(status(&e).1.as_deref(), Some("size_mib"));
    let e = c.delete_pool("archive").await.expect_err("pool in use");
    assert_eq!(status(&e).2.as_deref(), Some("pool_in_use"));
    for bad in [
        "limit=0",
        "tier=lukewarm",
        "colour=red",
        "after=xyz",
        "label=novalue",
    ] {
        let e = c.list_volumes(bad).await.expect_err(bad);
        assert_eq!(e.status(), Some(400), "{bad}");
    }

    // Grow, snapshot, attach to a stopped VM, detach.
    let grown = c
        .volume_action(
            "a1",
            "resize",
            &novacron_types::ResizeVolumeRequest { size_mib: 32 },
        )
        .await
        .expect("grow");
    assert_eq!(grown.size_mib, 32);
    let file = volume_file(&node.data_dir(), root.path(), &grown);
    let info =
        run(Command::new("qemu-img").args(["info", "--output=json", &file.display().to_string()]));
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 32 * MIB)),
        "{info}"
    );
    let snap = c.snapshot_volume("a1", "before").await.expect("snapshot");
    assert_eq!(snap.snapshots.len(), 1);
    let info = run(Command::new("qemu-img").args(["snapshot", "-l", &file.display().to_string()]));
    assert!(info.contains("before"), "{info}");
    // A move would lose the snapshot: refused. Restore rolls the data back; delete removes it.
    let e = c
        .move_volume(
            "a1",
            &MoveVolumeRequest {
                pool: "archive".into(),
                rate_mb: None,
            },
        )
        .await
        .expect_err("snapshots");
    assert_eq!(status(&e).2.as_deref(), Some("has_snapshots"));
    let f = file.display().to_string();
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -q -P 0xab 0 64k", &f]));
    c.restore_volume_snapshot("a1", "before")
        .await
        .expect("restore");
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -q -P 0 0 64k", &f]));
    let e = c
        .restore_volume_snapshot("a1", "nope")
        .await
        .expect_err("unknown snapshot");
    assert_eq!(e.status(), Some(404));
    let gone = c
        .delete_volume_snapshot("a1", "before")
        .await
        .expect("delete snapshot");
    assert!(gone.snapshots.is_empty());
    let info = run(Command::new("qemu-img").args(["snapshot", "-l", &f]));
    assert!(!info.contains("before"), "{info}");
    c.volume_action("a2", "attach", &AttachVolumeRequest { vm: "box".into() })
        .await
        .expect("attach to a stopped VM");
    let e = c.delete_volume("a2").await.expect_err("attached");
    assert_eq!(status(&e).2.as_deref(), Some("volume_attached"));
    // A local volume keeps its VM on its host.
    let e = c
        .migrate_vm("box", &Default::default())
        .await
        .expect_err("local volume attached");
    assert_eq!(
        status(&e).2.as_deref(),
        Some("local_volumes_attached"),
        "{e}"
    );

    // Filters and pages (in ID order, `next` continues).
    let page = c.list_volumes("limit=2").await.expect("page 1");
    assert_eq!(page.items.len(), 2);
    let next = page.next.clone().expect("more");
    let rest = c
        .list_volumes(&format!("limit=2&after={next}"))
        .await
        .expect("page 2");
    assert_eq!(rest.items.len(), 2, "4 volumes: a1, a2, b1, box-root");
    assert_eq!(rest.next, None);
    let all: Vec<String> = page
        .items
        .iter()
        .chain(rest.items.iter())
        .map(|v| v.name.clone())
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(sorted, ["a1", "a2", "b1", "box-root"]);
    let names = |p: novacron_types::VolumePage| {
        let mut n: Vec<String> = p.items.into_iter().map(|v| v.name).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(c.list_volumes("tier=cold").await.expect("cold")),
        ["b1"]
    );
    assert_eq!(
        names(c.list_volumes("vm=box").await.expect("vm")),
        ["a2", "box-root"]
    );
    assert_eq!(
        names(
            c.list_volumes("attached=false&pool=fast")
                .await
                .expect("detached")
        ),
        ["a1"]
    );
    let detached = c
        .volume_action("a2", "detach", &serde_json::json!({}))
        .await
        .expect("detach");
    assert_eq!(detached.attached_to, None);
    c.delete_volume("a2").await.expect("delete");
    assert_eq!(
        c.get_volume("a2").await.expect_err("gone").status(),
        Some(404)
    );

    // The policy: validated, stored.
    let mut p = c.tiering_policy().await.expect("policy");
    p.volume_mb = 300;
    let e = c.set_tiering_policy(&p).await.expect_err("bad policy");
    assert_eq!(status(&e).1.as_deref(), Some("volume_mb"));
    p.volume_mb = 20;
    p.enabled = true;
    c.set_tiering_policy(&p).await.expect("policy");
    assert_eq!(c.tiering_policy().await.expect("policy").volume_mb, 20);

    // The CLI.
    let cli = Cli {
        server: node.url.clone(),
        config: node.dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    cli.ok(&[
        "volume",
        "create",
        "c1",
        "--size-mib",
        "8",
        "--pool",
        "fast",
        "--label",
        "app=web",
    ]);
    let out = cli.ok(&["volume", "list", "--label", "app=web"]);
    let rows: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(rows, ["c1"], "{out}");
    let out = cli.ok(&["volume", "move", "c1", "archive", "--rate-mb", "50"]);
    assert!(
        out.contains("archive") && out.contains("compressed"),
        "{out}"
    );
    let out = cli.ok(&["tiering", "policy", "show"]);
    assert!(out.contains("\"volume_mb\": 20"), "{out}");
    let (code, _, err) = cli.run(
        &[
            "volume",
            "create",
            "c2",
            "--size-mib",
            "8",
            "--format",
            "vmdk",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--format"), "{err}");
    let (code, _, err) = cli.run(&["volume", "delete", "box-root"], None);
    assert_ne!(code, 0);
    assert!(err.contains("attached"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiering_engine_moves_a_busy_volume_hot_and_an_idle_one_cold_by_itself() {
    let node = Node::start_with(vec!["--stats-interval".into(), "1".into()]);
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    for (name, pool) in [("idle", "fast"), ("busy", "archive")] {
        c.create_volume(&vol(name, pool, 8, VolumeFormat::Qcow2))
            .await
            .expect(name);
    }
    writing_guest(&c, "app", "busy").await;

    // No pass while the policy is off.
    let e = c
        .get::<novacron_types::TieringReport>("/api/v1/tiering/plan")
        .await
        .expect_err("no pass yet");
    assert_eq!(e.status(), Some(404));

    // 10-second windows; about 10 writes a second is hot (>= 20 per window).
    no_throttle(&c).await;
    let mut p = c.tiering_policy().await.expect("policy");
    p.enabled = true;
    p.window_s = 10;
    p.hot_ops_per_window = 20;
    p.demote_after_idle_windows = 1;
    p.min_dwell_windows = 0;
    c.set_tiering_policy(&p).await.expect("set policy");

    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let busy = c.get_volume("busy").await.expect("busy");
        let idle = c.get_volume("idle").await.expect("idle");
        if busy.pool == "fast" && idle.pool == "archive" {
            assert!(idle.compressed, "a detached volume is compressed into cold");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not move them: busy on {}, idle on {}; last pass: {:?}",
            busy.pool,
            idle.pool,
            c.get::<serde_json::Value>("/api/v1/tiering/plan").await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The moves are operations that succeeded, and a pass explains itself.
    let ops: Vec<novacron_types::Operation> = c.list_all("/api/v1/operations").await.expect("ops");
    let moves: Vec<_> = ops.iter().filter(|o| o.kind == "volume.move").collect();
    assert!(
        moves.len() >= 2
            && moves
                .iter()
                .all(|o| o.status == novacron_types::OperationStatus::Success),
        "{moves:?}"
    );
    let report: novacron_types::TieringReport = c.get("/api/v1/tiering/plan").await.expect("plan");
    let busy = report
        .volumes
        .iter()
        .find(|v| v.name == "busy")
        .expect("busy forecast");
    assert_eq!(busy.predicted, "hot", "{report:?}");
    assert!(report.accuracy.contains_key("ensemble"), "{report:?}");
    assert_eq!(
        c.get_vm("app").await.expect("vm").state,
        VmState::Running,
        "the guest ran through its volume's move"
    );
    let text = metrics_text(&node, &c).await;
    for want in [
        "novacron_tiering_predictions{class=\"hot\"} 1",
        "novacron_tiering_accuracy{model=\"ensemble\"}",
        "novacron_volume_move_throttle ",
        "novacron_volume_moves_total{result=\"started\"}",
        // 8 MiB on each tier (plus the VM's boot disk, in the data directory: no tier).
        "novacron_tier_provisioned_bytes{class=\"hot\"} 8388608",
        "novacron_tier_provisioned_bytes{class=\"cold\"} 8388608",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
}

async fn metrics_text(node: &Node, c: &Client) -> String {
    reqwest::Client::new()
        .get(format!("{}/metrics", node.url))
        .bearer_auth(c.token().expect("token"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body")
}

fn throttle(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("novacron_volume_move_throttle "))
        .and_then(|v| v.trim().parse().ok())
        .expect("throttle gauge")
}

async fn wait_throttle(node: &Node, c: &Client, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let t = throttle(&metrics_text(node, c).await);
        if ok(t) {
            return t;
        }
        assert!(Instant::now() < deadline, "throttle {t}: never {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_yields_to_busy_guests_recovers_after_and_can_be_cancelled() {
    let node = Node::start();
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    // A guest writing to its volume all the time.
    c.create_volume(&vol("busy", "fast", 8, VolumeFormat::Qcow2))
        .await
        .expect("busy");
    writing_guest(&c, "app", "busy").await;

    // 64 MiB of random data to move at 4 MB/s, yielding whenever the guests do any I/O.
    let bulk = c
        .create_volume(&vol("bulk", "fast", 64, VolumeFormat::Raw))
        .await
        .expect("bulk");
    let file = volume_file(&node.data_dir(), root.path(), &bulk);
    run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", file.display()),
        "bs=1M",
        "count=64",
        "conv=notrunc",
        "status=none",
    ]));
    let sum = sha256(&file);
    let mut p = c.tiering_policy().await.expect("policy");
    p.volume_mb = 4;
    p.max_guest_latency_ms = 0;
    p.max_load_per_cpu = 100.0;
    c.set_tiering_policy(&p).await.expect("policy");
    let op = c
        .move_volume(
            "bulk",
            &MoveVolumeRequest {
                pool: "archive".into(),
                rate_mb: None,
            },
        )
        .await
        .expect("move");
    let low = wait_throttle(&node, &c, "backed off", |t| t < 0.5).await;
    // Guests may be as slow as they like again: the throttle recovers.
    p.max_guest_latency_ms = 60_000;
    c.set_tiering_policy(&p).await.expect("policy");
    wait_throttle(&node, &c, "recovered", |t| t >= 1.0).await;
    eprintln!("throttle went down to {low} and back to 1");

    // Cancelled: the volume stays where it was, whole, and nothing is left in the cold pool.
    c.cancel_operation(&op.id.to_string())
        .await
        .expect("cancel");
    let err = c
        .wait_success(&op, Duration::from_secs(30))
        .await
        .expect_err("cancelled");
    assert_eq!(
        err.api().and_then(|e| e.reason.clone()).as_deref(),
        Some("cancelled"),
        "{err}"
    );
    let v = c.get_volume("bulk").await.expect("bulk");
    assert_eq!((v.pool.as_str(), v.moving_to.as_deref()), ("fast", None));
    assert_eq!(sha256(&file), sum);
    let left: Vec<_> =
        std::fs::read_dir(root.path().join("archive").join("host-1").join("volumes"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
    assert!(left.is_empty(), "left in the cold pool: {left:?}");
}

/// `qemu-storage-daemon` processes copying into a file under `dir`.
/// The `qemu-storage-daemon`s copying files under `dir`.
fn copy_daemon_pids(dir: &Path) -> Vec<i32> {
    let want = dir.display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|p| {
                    let pid = p.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd).into_owned();
                    (cmd.starts_with("qemu-storage-daemon") && cmd.contains(&want)).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn copy_daemons(dir: &Path) -> usize {
    copy_daemon_pids(dir).len()
}

/// Kills, when dropped, every copy daemon working under its directory: they outlive
/// `novacron` by design, so a test that fails mid-copy would leave them behind.
#[must_use]
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in copy_daemon_pids(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_cut_short_by_a_crash_are_undone_after_the_restart() {
    let mut node = Node::start();
    let c = node.admin().await;
    let root = tempfile::tempdir().expect("tmp");
    let _reaper = pools(&c, root.path()).await;
    no_throttle(&c).await;
    let mut sums = Vec::new();
    let seed = random_file(&root.path().join("seed.bin"), 16);
    // A shared pool: a detached volume there is held by no host; the marker of its move
    // names the host that runs it.
    let nas = root.path().join("nas");
    std::fs::create_dir_all(&nas).expect("nas");
    c.create_pool(&CreatePoolRequest {
        name: "nas".into(),
        path: nas.display().to_string(),
        tier: PoolTier::Warm,
        shared: true,
        capacity_bytes: 10 << 30,
        cost_per_gib_month: 0.05,
        performance_class: None,
    })
    .await
    .expect("shared pool");
    for (name, format, pool) in [
        ("bulk", VolumeFormat::Raw, "fast"),
        ("busy", VolumeFormat::Qcow2, "fast"),
        ("shelf", VolumeFormat::Raw, "nas"),
    ] {
        let v = c
            .create_volume(&vol(name, pool, 16, format))
            .await
            .expect(name);
        let file = volume_file(&node.data_dir(), root.path(), &v);
        write_into(&file, format, &seed, "0");
        sums.push((name, pool, file.clone(), sha256(&file)));
    }
    // Three VMs: "app" will have "busy" attached (one move per VM at a time); the boot disks
    // of "web" (running) and "idle" (stopped) hold 16 MiB of their own.
    c.create_vm(&demo_vm("app")).await.expect("vm");
    let mut boot_disks = Vec::new();
    for vm in ["web", "idle"] {
        c.create_vm(&demo_vm(vm)).await.expect("vm");
        let id = c.get_vm(vm).await.expect("vm").id;
        let link = node
            .data_dir()
            .join("vms")
            .join(id.to_string())
            .join("root.qcow2");
        write_into(&link, VolumeFormat::Qcow2, &seed, "8M");
        boot_disks.push((format!("{vm}-root"), link.clone(), sha256(&link)));
    }
    for vm in ["app", "web"] {
        start_vm(&c, vm).await;
    }
    c.volume_action("busy", "attach", &AttachVolumeRequest { vm: "app".into() })
        .await
        .expect("attach");
    // All at 1 MB/s: detached copies and live mirrors, each about 16 s.
    for name in ["bulk", "busy", "shelf", "web-root", "idle-root"] {
        c.move_volume(
            name,
            &MoveVolumeRequest {
                pool: "archive".into(),
                rate_mb: Some(1),
            },
        )
        .await
        .expect("move");
    }
    // The move holds the VM: other actions wait, and are told why.
    let e = c
        .vm_action("web", "force-stop")
        .await
        .expect_err("a disk is moving");
    assert_eq!(
        e.api().and_then(|a| a.reason.clone()).as_deref(),
        Some("volume_moving"),
        "{e}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let archive = root.path().join("archive");
    assert_eq!(copy_daemons(&archive), 3, "the detached copies run");
    node.kill();
    assert_eq!(
        copy_daemons(&archive),
        3,
        "the copy daemons outlive novacron"
    );
    node.start_again();
    let c = node.admin().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let moving: Vec<String> = c
            .list_volumes("")
            .await
            .expect("list")
            .items
            .into_iter()
            .filter(|v| v.moving_to.is_some())
            .map(|v| v.name)
            .collect();
        if moving.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still moving after the restart: {moving:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(copy_daemons(&archive), 0, "the stray copy daemon is gone");
    let left: Vec<_> = std::fs::read_dir(archive.join("host-1").join("volumes"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the cold pool: {left:?}");
    let left: Vec<_> = walk(&archive.join("host-1").join("vms"));
    assert!(left.is_empty(), "VM disks left in the cold pool: {left:?}");
    for (name, pool, file, sum) in sums {
        let v = c.get_volume(name).await.expect(name);
        assert_eq!(v.pool, pool, "{name}");
        assert_eq!(sha256(&file), sum, "{name} changed");
    }
    // The boot disks are where they were: files in the VM's directory.
    for (name, link, sum) in &boot_disks {
        let v = c.get_volume(name).await.expect(name);
        assert_eq!(v.pool, "data", "{name}");
        let meta = std::fs::symlink_metadata(link).expect(name);
        assert!(meta.file_type().is_file(), "{name} is no longer a file");
        if name == "idle-root" {
            assert_eq!(&sha256(link), sum, "{name} changed");
        }
    }
    // The guest kept its disk, and the volume moves again.
    assert_eq!(c.get_vm("app").await.expect("vm").state, VmState::Running);
    let (v, _) = move_to(&c, "busy", "archive", None).await;
    assert_eq!(v.pool, "archive");
    assert_eq!(c.get_vm("web").await.expect("vm").state, VmState::Running);
    let (v, _) = move_to(&c, "web-root", "archive", None).await;
    assert_eq!(v.pool, "archive");
}

/// Every file under `dir`, at any depth.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
