//! Helpers shared by the benchmarks (`#[path]`-included; not an example of its own).

#![allow(dead_code)]

/// The value after `--name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The `p` quantile (0..=1) of sorted samples; NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The demo guest as a driver spec (1 vCPU, 128 MiB, direct kernel boot), with `extra_disks_mib`.
pub fn demo_spec(
    demo: &std::path::Path,
    extra_disks_mib: Vec<u64>,
) -> novacron_hypervisor::RuntimeSpec {
    let s = |f: &str| demo.join(f).to_string_lossy().into_owned();
    novacron_hypervisor::RuntimeSpec {
        id: novacron_types::VmId::new_random(),
        name: "floor".into(),
        vcpus: 1,
        memory_mib: 128,
        base_image: demo.join("disk.qcow2"),
        base_format: novacron_types::ImageFormat::Qcow2,
        extra_disks_mib,
        boot: Some(novacron_types::KernelBoot {
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
