//! Volume moves as NovaCron runs them: the copy of a detached volume is a block job in a
//! `qemu-storage-daemon` (`FileCopy`, the same code `volume.move` runs), paced by QEMU's `speed`
//! at the rate `limiter::shares` gives it. For comparison, `qemu-img convert -r` at the same
//! rates (what the first version used).
//! Prints the achieved rate against 1, 10, 100 and 200 MB/s (goal: within 3%), and 100
//! concurrent moves sharing a global 100 MB/s (each gets 1 MB/s): Jain's index over their
//! rates (goal >= 0.95) and their sum against the limit.
//! `cargo run --release -p novacron-server --example move_bench`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use novacron_hypervisor::disks;
use novacron_hypervisor::qemu::copy::FileCopy;
use novacron_server::limiter::{Limits, MoveDemand, shares};
use novacron_types::VolumeFormat;

const MB: u64 = 1_000_000;

fn random_file(path: &Path, bytes: u64) {
    use std::io::{Read, Write};
    let mut src = std::fs::File::open("/dev/urandom").expect("urandom");
    let mut out = std::fs::File::create(path).expect("create");
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).expect("read");
        out.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
}

/// Copies `src` at `rate` as a move does; returns the bytes per second from the job's start
/// to its end, and the seconds it took to start (the daemon, its QMP handshake).
async fn copy(src: &Path, dest: &Path, bytes: u64, rate: u64) -> (f64, f64) {
    let spawned = Instant::now();
    let mut c = FileCopy::start(
        src,
        VolumeFormat::Raw,
        dest,
        VolumeFormat::Raw,
        None,
        false,
        rate,
    )
    .await
    .expect("start copy");
    let setup = spawned.elapsed().as_secs_f64();
    let started = Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let st = c.status().await.expect("status");
        match st.done {
            Some(Ok(())) => break,
            Some(Err(e)) => panic!("copy failed: {e}"),
            None => {}
        }
    }
    let achieved = bytes as f64 / started.elapsed().as_secs_f64();
    c.stop().await;
    let _ = std::fs::remove_file(dest);
    (achieved, setup)
}

/// The same with `qemu-img convert -r`.
async fn convert(src: &Path, dest: &Path, bytes: u64, rate: u64) -> f64 {
    let started = Instant::now();
    disks::copy_volume(src, VolumeFormat::Raw, dest, VolumeFormat::Raw, false, rate)
        .await
        .expect("qemu-img convert");
    let achieved = bytes as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(dest);
    achieved
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let at = |name: &str| -> PathBuf { dir.path().join(name) };
    let mut missed = 0;

    println!("== one move (a block job with QEMU's speed), about 3 s of copying each");
    for mb in [1u64, 10, 100, 200] {
        let rate = mb * MB;
        let bytes = rate * 3;
        let src = at(&format!("src-{mb}.raw"));
        random_file(&src, bytes);
        let (achieved, setup) = copy(&src, &at("dest.raw"), bytes, rate).await;
        let baseline = convert(&src, &at("dest.raw"), bytes, rate).await;
        let _ = std::fs::remove_file(&src);
        let error = (achieved - rate as f64) / rate as f64 * 100.0;
        let base_error = (baseline - rate as f64) / rate as f64 * 100.0;
        let ok = error.abs() <= 3.0;
        missed += usize::from(!ok);
        println!(
            "limit {mb:>3} MB/s: achieved {:>7.2} MB/s ({error:+.2}%; goal within 3%: {}; \
             {:.0} ms to start the job); qemu-img convert -r: {:>7.2} MB/s ({base_error:+.2}%)",
            achieved / 1e6,
            if ok { "met" } else { "NOT MET" },
            setup * 1e3,
            baseline / 1e6
        );
    }

    println!("== 100 moves at once under a global 100 MB/s (pools of 200, volumes of 50)");
    let limits = Limits {
        global: 100 * MB,
        per_pool: 200 * MB,
        per_volume: 50 * MB,
    };
    let demands: Vec<MoveDemand> = (0..100)
        .map(|i| MoveDemand {
            pools: [format!("hot{}", i % 2), "cold".to_string()],
            cap: None,
        })
        .collect();
    let rates = shares(&limits, 1.0, &demands);
    let bytes = 4 * MB;
    let src = at("shared-src.raw");
    random_file(&src, bytes);
    let started = Instant::now();
    let tasks: Vec<_> = rates
        .iter()
        .enumerate()
        .map(|(i, rate)| {
            let (src, dest, rate) = (src.clone(), at(&format!("dest-{i}.raw")), *rate);
            tokio::spawn(async move { copy(&src, &dest, bytes, rate).await.0 })
        })
        .collect();
    let mut achieved = Vec::new();
    for t in tasks {
        achieved.push(t.await.expect("task"));
    }
    let wall = started.elapsed().as_secs_f64();
    let sum: f64 = achieved.iter().sum();
    let sq: f64 = achieved.iter().map(|x| x * x).sum();
    let jain = sum * sum / (achieved.len() as f64 * sq);
    let ok = jain >= 0.95;
    missed += usize::from(!ok);
    let total = 100.0 * bytes as f64 / wall;
    let under = total <= 100.0 * MB as f64 * 1.03;
    missed += usize::from(!under);
    println!(
        "share each: {:.2} MB/s; per move min {:.2} / max {:.2} MB/s; Jain's index {jain:.4} \
         (goal >= 0.95: {}); all together {:.2} MB/s over {wall:.1} s (limit 100: {})",
        rates[0] as f64 / 1e6,
        achieved.iter().cloned().fold(f64::INFINITY, f64::min) / 1e6,
        achieved.iter().cloned().fold(0.0, f64::max) / 1e6,
        if ok { "met" } else { "NOT MET" },
        total / 1e6,
        if under { "held" } else { "NOT HELD" }
    );
    println!("goals missed: {missed}");
}
