//! Input validation. Every function names the field at fault so the API can answer 400 with it.

use crate::{
    ApiError, CreatePoolRequest, CreateVmRequest, CreateVolumeRequest, KernelBoot,
    PlacementRequest, PlacementRules, TieringPolicy, ValidationResult,
};

pub const MAX_VCPUS: u32 = 128;
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024; // 4 TiB
pub const MAX_DISK_MIB: u64 = 64 * 1024 * 1024; // 64 TiB
pub const MAX_EXTRA_DISKS: usize = 16;
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Resource names (VMs, images): a DNS label starting with a letter, 1 to 63 characters.
pub fn name(field: &str, value: &str) -> ValidationResult<()> {
    let bad = |why: &str| {
        Err(ApiError::invalid(
            field,
            format!("{field} '{value}' is invalid: {why}"),
        ))
    };
    if value.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > 63 {
        return bad("at most 63 characters");
    }
    let first = value.as_bytes()[0];
    if !first.is_ascii_lowercase() {
        return bad("must start with a lowercase letter");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if value.ends_with('-') {
        return bad("must not end with '-'");
    }
    Ok(())
}

pub fn username(value: &str) -> ValidationResult<()> {
    name("username", value)
}

pub fn password(value: &str) -> ValidationResult<()> {
    if value.len() < 8 {
        return Err(ApiError::invalid(
            "password",
            "password must be at least 8 characters",
        ));
    }
    if value.len() > 1024 {
        return Err(ApiError::invalid(
            "password",
            "password must be at most 1024 characters",
        ));
    }
    Ok(())
}

pub fn kernel_boot(field: &str, boot: &KernelBoot) -> ValidationResult<()> {
    let path = |sub: &str, v: &str| -> ValidationResult<()> {
        if v.is_empty() || !v.starts_with('/') || v.contains('\0') || v.contains(',') {
            return Err(ApiError::invalid(
                format!("{field}.{sub}"),
                format!("{field}.{sub} must be an absolute path without ',' (got '{v}')"),
            ));
        }
        Ok(())
    };
    path("kernel", &boot.kernel)?;
    if let Some(initrd) = &boot.initrd {
        path("initrd", initrd)?;
    }
    if let Some(cmdline) = &boot.cmdline
        && (cmdline.len() > MAX_CMDLINE_LEN || cmdline.contains(['\0', '\n', '\r']))
    {
        return Err(ApiError::invalid(
            format!("{field}.cmdline"),
            format!("{field}.cmdline must be one line of at most {MAX_CMDLINE_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Everything about a create request that can be checked without looking at stored state.
/// Label keys: 1 to 63 of `a-z 0-9 . _ / -`, starting with a letter or digit; values at most
/// 255 characters; at most 64 labels on one resource.
pub fn labels<'a>(
    changes: impl IntoIterator<Item = (&'a String, Option<&'a String>)>,
) -> ValidationResult<()> {
    labels_at("labels", changes)
}

/// [`labels`] for a map found at `prefix` in the request.
fn labels_at<'a>(
    prefix: &str,
    changes: impl IntoIterator<Item = (&'a String, Option<&'a String>)>,
) -> ValidationResult<()> {
    for (key, value) in changes {
        let field = format!("{prefix}.{key}");
        let ok_key = !key.is_empty()
            && key.len() <= 63
            && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c));
        if !ok_key {
            return Err(ApiError::invalid(
                field,
                "label keys are 1 to 63 of a-z, 0-9, '.', '_', '/', '-', starting with a letter \
                 or digit",
            ));
        }
        if value.is_some_and(|v| v.len() > 255) {
            return Err(ApiError::invalid(
                field,
                "label values are at most 255 bytes",
            ));
        }
    }
    Ok(())
}

pub const MAX_LABELS: usize = 64;

/// A VM's vCPUs and memory, in range.
fn size(vcpus: u32, memory_mib: u64) -> ValidationResult<()> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ApiError::invalid(
            "vcpus",
            format!("vcpus must be between 1 and {MAX_VCPUS} (got {})", vcpus),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ApiError::invalid(
            "memory_mib",
            format!(
                "memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} (got {})",
                memory_mib
            ),
        ));
    }
    Ok(())
}

/// Placement rules: label requirements like labels, group names like VM names.
pub fn placement_rules(rules: &PlacementRules) -> ValidationResult<()> {
    if rules.host_labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            "placement.host_labels",
            format!("at most {MAX_LABELS} required host labels"),
        ));
    }
    labels_at(
        "placement.host_labels",
        rules.host_labels.iter().map(|(k, v)| (k, Some(v))),
    )?;
    if let Some(g) = &rules.affinity {
        name("placement.affinity", g)?;
    }
    if let Some(g) = &rules.anti_affinity {
        name("placement.anti_affinity", g)?;
    }
    Ok(())
}

/// A placement dry run asks what a VM would: the same bounds as [`create_vm`].
pub fn placement(req: &PlacementRequest) -> ValidationResult<()> {
    size(req.vcpus, req.memory_mib)?;
    if req.disk_mib > MAX_DISK_MIB * (MAX_EXTRA_DISKS as u64 + 1) {
        return Err(ApiError::invalid(
            "disk_mib",
            "disk_mib is larger than any VM can have",
        ));
    }
    placement_rules(&req.placement)
}

pub fn create_vm(req: &CreateVmRequest) -> ValidationResult<()> {
    name("name", &req.name)?;
    if req.image.is_empty() {
        return Err(ApiError::invalid(
            "image",
            "image must name an image (name or ID)",
        ));
    }
    size(req.vcpus, req.memory_mib)?;
    if req.disks.len() > MAX_EXTRA_DISKS {
        return Err(ApiError::invalid(
            "disks",
            format!(
                "at most {MAX_EXTRA_DISKS} extra disks (got {})",
                req.disks.len()
            ),
        ));
    }
    for (i, d) in req.disks.iter().enumerate() {
        if d.size_mib == 0 || d.size_mib > MAX_DISK_MIB {
            return Err(ApiError::invalid(
                format!("disks[{i}].size_mib"),
                format!(
                    "disk size must be between 1 and {MAX_DISK_MIB} MiB (got {})",
                    d.size_mib
                ),
            ));
        }
    }
    if let Some(boot) = &req.boot {
        kernel_boot("boot", boot)?;
    }
    if let Some(pool) = &req.pool {
        name("pool", pool)?;
    }
    placement_rules(&req.placement)
}

pub const MAX_POOL_BYTES: u64 = 1 << 60; // 1 EiB

pub fn create_pool(req: &CreatePoolRequest) -> ValidationResult<()> {
    name("name", &req.name)?;
    if req.name == "data" {
        return Err(ApiError::invalid(
            "name",
            "pool name 'data' is reserved (it names each host's own data directory)",
        ));
    }
    let path = std::path::Path::new(&req.path);
    if !path.is_absolute() {
        return Err(ApiError::invalid(
            "path",
            format!("path '{}' must be absolute", req.path),
        ));
    }
    if req.path.len() > 200
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ApiError::invalid(
            "path",
            "path must be at most 200 characters and contain no '..'",
        ));
    }
    if req.path == "/" {
        return Err(ApiError::invalid("path", "path must not be '/'"));
    }
    if req.capacity_bytes == 0 || req.capacity_bytes > MAX_POOL_BYTES {
        return Err(ApiError::invalid(
            "capacity_bytes",
            format!(
                "capacity must be between 1 byte and 1 EiB (got {})",
                req.capacity_bytes
            ),
        ));
    }
    if !req.cost_per_gib_month.is_finite() || req.cost_per_gib_month < 0.0 {
        return Err(ApiError::invalid(
            "cost_per_gib_month",
            "cost per GiB-month must be a number of at least 0",
        ));
    }
    if let Some(class) = &req.performance_class {
        name("performance_class", class)?;
    }
    Ok(())
}

pub const MIN_RATE_MB: u64 = 1;
pub const MAX_RATE_MB: u64 = 200;

pub fn volume_size(field: &str, size_mib: u64) -> ValidationResult<()> {
    if size_mib == 0 || size_mib > MAX_DISK_MIB {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between 1 and {MAX_DISK_MIB} MiB (got {size_mib})"),
        ));
    }
    Ok(())
}

pub fn create_volume(req: &CreateVolumeRequest) -> ValidationResult<()> {
    name("name", &req.name)?;
    volume_size("size_mib", req.size_mib)?;
    if let Some(pool) = &req.pool {
        name("pool", pool)?;
    }
    if req.labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    labels(req.labels.iter().map(|(k, v)| (k, Some(v))))
}

/// A move rate limit in MB/s.
pub fn rate_mb(field: &str, mb: u64) -> ValidationResult<()> {
    if !(MIN_RATE_MB..=MAX_RATE_MB).contains(&mb) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between {MIN_RATE_MB} and {MAX_RATE_MB} MB/s (got {mb})"),
        ));
    }
    Ok(())
}

pub fn tiering_policy(p: &TieringPolicy) -> ValidationResult<()> {
    if !(10..=86_400).contains(&p.window_s) {
        return Err(ApiError::invalid(
            "window_s",
            format!("window_s must be between 10 and 86400 (got {})", p.window_s),
        ));
    }
    if !(p.high_water.is_finite() && (0.1..=1.0).contains(&p.high_water)) {
        return Err(ApiError::invalid(
            "high_water",
            format!(
                "high_water must be between 0.1 and 1 (got {})",
                p.high_water
            ),
        ));
    }
    if !(p.hysteresis.is_finite() && (0.0..=10.0).contains(&p.hysteresis)) {
        return Err(ApiError::invalid(
            "hysteresis",
            format!("hysteresis must be between 0 and 10 (got {})", p.hysteresis),
        ));
    }
    for (field, v) in [
        ("min_dwell_windows", p.min_dwell_windows),
        ("demote_after_idle_windows", p.demote_after_idle_windows),
    ] {
        if v > 100_000 {
            return Err(ApiError::invalid(
                field,
                format!("{field} must be at most 100000 (got {v})"),
            ));
        }
    }
    if p.demote_after_idle_windows == 0 {
        return Err(ApiError::invalid(
            "demote_after_idle_windows",
            "demote_after_idle_windows must be at least 1",
        ));
    }
    if p.hot_ops_per_window < 2 {
        return Err(ApiError::invalid(
            "hot_ops_per_window",
            format!(
                "hot_ops_per_window must be at least 2 (got {})",
                p.hot_ops_per_window
            ),
        ));
    }
    for (i, pool) in p.draining_pools.iter().enumerate() {
        name(&format!("draining_pools[{i}]"), pool)?;
    }
    rate_mb("global_mb", p.global_mb)?;
    rate_mb("pool_mb", p.pool_mb)?;
    rate_mb("volume_mb", p.volume_mb)?;
    if p.max_guest_latency_ms > 60_000 {
        return Err(ApiError::invalid(
            "max_guest_latency_ms",
            format!(
                "max_guest_latency_ms must be between 0 and 60000 (got {})",
                p.max_guest_latency_ms
            ),
        ));
    }
    if !(p.max_load_per_cpu.is_finite() && (0.1..=100.0).contains(&p.max_load_per_cpu)) {
        return Err(ApiError::invalid(
            "max_load_per_cpu",
            format!(
                "max_load_per_cpu must be between 0.1 and 100 (got {})",
                p.max_load_per_cpu
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskRequest;

    fn req() -> CreateVmRequest {
        CreateVmRequest {
            name: "web-1".into(),
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            boot: None,
            node: None,
            placement: Default::default(),
            pool: None,
            ha: false,
        }
    }

    /// One table: each case mutates a valid request and names the field the error must blame.
    #[test]
    fn create_vm_rejects_each_bad_field_by_name() {
        type Case = (&'static str, fn(&mut CreateVmRequest), Option<&'static str>);
        let cases: &[Case] = &[
            ("valid", |_| {}, None),
            ("empty name", |r| r.name.clear(), Some("name")),
            ("upper case", |r| r.name = "Web".into(), Some("name")),
            (
                "bad host label key",
                |r| {
                    r.placement.host_labels.insert("Zone".into(), "a".into());
                },
                Some("placement.host_labels.Zone"),
            ),
            (
                "bad affinity group",
                |r| r.placement.affinity = Some("Web Servers".into()),
                Some("placement.affinity"),
            ),
            (
                "bad anti-affinity group",
                |r| r.placement.anti_affinity = Some(String::new()),
                Some("placement.anti_affinity"),
            ),
            ("leading digit", |r| r.name = "1web".into(), Some("name")),
            ("trailing dash", |r| r.name = "web-".into(), Some("name")),
            ("too long", |r| r.name = "a".repeat(64), Some("name")),
            ("max length ok", |r| r.name = "a".repeat(63), None),
            ("slash", |r| r.name = "a/b".into(), Some("name")),
            ("zero vcpus", |r| r.vcpus = 0, Some("vcpus")),
            ("too many vcpus", |r| r.vcpus = MAX_VCPUS + 1, Some("vcpus")),
            ("tiny memory", |r| r.memory_mib = 1, Some("memory_mib")),
            (
                "huge memory",
                |r| r.memory_mib = u64::MAX,
                Some("memory_mib"),
            ),
            ("empty image", |r| r.image.clear(), Some("image")),
            (
                "zero disk",
                |r| r.disks = vec![DiskRequest { size_mib: 0 }],
                Some("disks[0].size_mib"),
            ),
            (
                "huge disk",
                |r| {
                    r.disks = vec![
                        DiskRequest { size_mib: 1 },
                        DiskRequest { size_mib: u64::MAX },
                    ]
                },
                Some("disks[1].size_mib"),
            ),
            (
                "too many disks",
                |r| r.disks = vec![DiskRequest { size_mib: 1 }; 17],
                Some("disks"),
            ),
            (
                "relative kernel",
                |r| {
                    r.boot = Some(KernelBoot {
                        kernel: "vmlinuz".into(),
                        ..Default::default()
                    })
                },
                Some("boot.kernel"),
            ),
            (
                "cmdline newline",
                |r| {
                    r.boot = Some(KernelBoot {
                        kernel: "/boot/vmlinuz".into(),
                        initrd: None,
                        cmdline: Some("a\nb".into()),
                    })
                },
                Some("boot.cmdline"),
            ),
        ];
        for (what, mutate, field) in cases {
            let mut r = req();
            mutate(&mut r);
            let got = create_vm(&r).err().and_then(|e| e.field);
            assert_eq!(got.as_deref(), *field, "case {what}");
        }
    }

    #[test]
    fn create_pool_rejects_each_bad_field_by_name() {
        let ok = CreatePoolRequest {
            name: "fast".into(),
            path: "/srv/fast".into(),
            tier: crate::PoolTier::Hot,
            shared: false,
            capacity_bytes: 1 << 40,
            cost_per_gib_month: 0.1,
            performance_class: Some("nvme".into()),
        };
        type Case = (
            &'static str,
            fn(&mut CreatePoolRequest),
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            ("valid", |_| {}, None),
            ("bad name", |r| r.name = "Fast".into(), Some("name")),
            ("reserved name", |r| r.name = "data".into(), Some("name")),
            ("relative", |r| r.path = "srv/fast".into(), Some("path")),
            ("root", |r| r.path = "/".into(), Some("path")),
            ("dot dot", |r| r.path = "/srv/../etc".into(), Some("path")),
            (
                "no capacity",
                |r| r.capacity_bytes = 0,
                Some("capacity_bytes"),
            ),
            (
                "negative cost",
                |r| r.cost_per_gib_month = -1.0,
                Some("cost_per_gib_month"),
            ),
            (
                "nan cost",
                |r| r.cost_per_gib_month = f64::NAN,
                Some("cost_per_gib_month"),
            ),
            (
                "bad class",
                |r| r.performance_class = Some("NV ME".into()),
                Some("performance_class"),
            ),
        ];
        for (what, mutate, field) in cases {
            let mut r = ok.clone();
            mutate(&mut r);
            let got = create_pool(&r).err().and_then(|e| e.field);
            assert_eq!(got.as_deref(), *field, "case {what}");
        }
    }

    #[test]
    fn tiering_policy_rejects_each_bad_field_by_name() {
        type Case = (fn(&mut TieringPolicy), &'static str);
        let cases: &[Case] = &[
            (|p| p.window_s = 5, "window_s"),
            (|p| p.high_water = 1.5, "high_water"),
            (|p| p.high_water = f64::NAN, "high_water"),
            (|p| p.hysteresis = -1.0, "hysteresis"),
            (
                |p| p.demote_after_idle_windows = 0,
                "demote_after_idle_windows",
            ),
            (|p| p.hot_ops_per_window = 1, "hot_ops_per_window"),
            (
                |p| p.draining_pools = vec!["Bad Name".into()],
                "draining_pools[0]",
            ),
            (|p| p.global_mb = 0, "global_mb"),
            (|p| p.pool_mb = 201, "pool_mb"),
            (|p| p.volume_mb = 1000, "volume_mb"),
            (|p| p.max_guest_latency_ms = 60_001, "max_guest_latency_ms"),
            (|p| p.max_load_per_cpu = 0.0, "max_load_per_cpu"),
        ];
        assert!(tiering_policy(&TieringPolicy::default()).is_ok());
        for (mutate, field) in cases {
            let mut p = TieringPolicy::default();
            mutate(&mut p);
            let err = tiering_policy(&p).expect_err(field);
            assert_eq!(err.field.as_deref(), Some(*field), "{err:?}");
        }
    }

    #[test]
    fn create_volume_checks_name_size_pool_and_labels() {
        let ok = CreateVolumeRequest {
            name: "logs".into(),
            size_mib: 64,
            format: Default::default(),
            pool: Some("fast".into()),
            node: None,
            attach_to: None,
            labels: Default::default(),
        };
        assert!(create_volume(&ok).is_ok());
        for (mutate, field) in [
            (
                (|r: &mut CreateVolumeRequest| r.name = "-x".into()) as fn(&mut _),
                "name",
            ),
            (|r| r.size_mib = 0, "size_mib"),
            (|r| r.size_mib = MAX_DISK_MIB + 1, "size_mib"),
            (|r| r.pool = Some("UP".into()), "pool"),
            (
                |r| {
                    r.labels.insert("Bad Key".into(), "v".into());
                },
                "labels.Bad Key",
            ),
        ] {
            let mut r = ok.clone();
            mutate(&mut r);
            let err = create_volume(&r).expect_err(field);
            assert_eq!(err.field.as_deref(), Some(field), "{err:?}");
        }
    }
}
