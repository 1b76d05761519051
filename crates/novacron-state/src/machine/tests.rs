//! Unit tests of `apply`, one behaviour each.

use super::*;
use novacron_types::*;

/// A state with host 1 registered (VMs can only be recorded on a known host).
pub(super) fn with_host(memory_mib: u64) -> ClusterState {
    let mut s = ClusterState::default();
    s.nodes.insert(
        1,
        NodeInfo {
            id: NodeId(1),
            name: "h1".into(),
            api_address: String::new(),
            qemu_version: String::new(),
            accelerator: "tcg".into(),
            cpus: 1,
            memory_mib,
            registered_at: 0,
            labels: Default::default(),
            role: HostRole::Full,
            cpu_overcommit_pct: 400,
            memory_overcommit_pct: 100,
            reserved_memory_mib: 0,
            maintenance: false,
        },
    );
    s
}

fn image(name: &str) -> Image {
    Image {
        id: ImageId::new_random(),
        name: name.into(),
        description: String::new(),
        format: ImageFormat::Qcow2,
        path: "/x".into(),
        virtual_size: 1,
        boot: None,
        node: NodeId(1),
        created_at: 0,
    }
}

fn vm(name: &str, image: ImageId) -> Vm {
    Vm {
        id: VmId::new_random(),
        name: name.into(),
        state: VmState::Stopped,
        state_reason: None,
        desired: PowerState::Stopped,
        node: NodeId(1),
        spec: VmSpec {
            name: name.into(),
            image,
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            boot: None,
            placement: Default::default(),
            pool: None,
            ha: false,
        },
        snapshots: vec![],
        labels: Default::default(),
        created_at: 0,
        updated_at: 0,
        migrating_to: None,
        recovered_from: None,
    }
}

fn op() -> Operation {
    Operation {
        id: OperationId::new_random(),
        kind: "vm.start".into(),
        status: OperationStatus::Running,
        progress: 0,
        message: String::new(),
        error: None,
        resources: vec![],
        node: NodeId(1),
        requestor: "admin".into(),
        created_at: 0,
        updated_at: 0,
        migration: None,
    }
}

fn apply(s: &mut ClusterState, c: CommandV1) -> Result<(), ApiError> {
    s.apply(&Command::V1(c)).0.into_result()
}

#[test]
fn vm_names_are_unique_and_a_rejected_command_changes_nothing() {
    let mut s = with_host(4096);
    let img = image("demo");
    apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
    apply(
        &mut s,
        CommandV1::CreateVm {
            vm: vm("a", img.id),
        },
    )
    .expect("first");
    let before = s.clone();
    let err = apply(
        &mut s,
        CommandV1::CreateVm {
            vm: vm("a", img.id),
        },
    )
    .expect_err("dup");
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(s, before);
    let err = apply(
        &mut s,
        CommandV1::CreateVm {
            vm: vm("b", ImageId::new_random()),
        },
    )
    .expect_err("img");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(s, before);
}

#[test]
fn migrations_hold_room_on_the_target_until_they_end() {
    let mut s = with_host(4096);
    let mut small = s.nodes[&1].clone();
    small.id = NodeId(2);
    small.memory_mib = 200;
    s.nodes.insert(2, small);
    let img = image("demo");
    apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
    let (a, b) = (vm("a", img.id), vm("b", img.id));
    apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect("a");
    apply(&mut s, CommandV1::CreateVm { vm: b.clone() }).expect("b");
    let begin = |id| CommandV1::BeginMigration {
        id,
        from: NodeId(1),
        to: NodeId(2),
    };
    apply(&mut s, begin(a.id)).expect("a fits on host 2");
    let e = apply(&mut s, begin(a.id)).expect_err("twice");
    assert_eq!(e.reason.as_deref(), Some("already_migrating"));
    // 128 + 128 > 200: the second move does not fit while the first holds its room.
    let before = s.clone();
    let e = apply(&mut s, begin(b.id)).expect_err("no room");
    assert_eq!(e.reason.as_deref(), Some("not_enough_memory"), "{e:?}");
    assert_eq!(s, before);
    apply(&mut s, CommandV1::EndMigration { id: a.id }).expect("end");
    apply(&mut s, begin(b.id)).expect("room again");
    apply(
        &mut s,
        CommandV1::MoveVm {
            id: b.id,
            from: NodeId(1),
            to: NodeId(2),
            at: 9,
        },
    )
    .expect("move");
    assert_eq!(
        (s.vms[&b.id].node, s.vms[&b.id].migrating_to),
        (NodeId(2), None)
    );
    let e = apply(
        &mut s,
        CommandV1::MoveVm {
            id: b.id,
            from: NodeId(1),
            to: NodeId(2),
            at: 10,
        },
    )
    .expect_err("a repeated switch changes nothing");
    assert_eq!(e.code, ErrorCode::Conflict);
}

fn pool(name: &str, shared: bool) -> StoragePool {
    StoragePool {
        name: name.into(),
        path: format!("/srv/{name}"),
        tier: novacron_types::PoolTier::Hot,
        shared,
        capacity_bytes: 1 << 40,
        cost_per_gib_month: 0.1,
        performance_class: "ssd".into(),
        created_at: 0,
    }
}

#[test]
fn ha_needs_a_shared_pool_and_recovery_moves_the_vm_once() {
    let mut s = with_host(4096);
    let mut h2 = s.nodes[&1].clone();
    h2.id = NodeId(2);
    s.nodes.insert(2, h2);
    let img = image("demo");
    apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
    apply(
        &mut s,
        CommandV1::CreatePool {
            pool: pool("local", false),
        },
    )
    .expect("local");
    apply(
        &mut s,
        CommandV1::CreatePool {
            pool: pool("nfs", true),
        },
    )
    .expect("nfs");
    let e = apply(
        &mut s,
        CommandV1::CreatePool {
            pool: pool("nfs", true),
        },
    )
    .expect_err("dup");
    assert_eq!(e.code, ErrorCode::Conflict);

    let mut a = vm("a", img.id);
    a.spec.ha = true;
    let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("no pool");
    assert_eq!(e.reason.as_deref(), Some("ha_needs_shared_pool"));
    a.spec.pool = Some("local".into());
    let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("local pool");
    assert_eq!(e.reason.as_deref(), Some("ha_needs_shared_pool"));
    a.spec.pool = Some("ghost".into());
    let e = apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect_err("ghost");
    assert_eq!(e.code, ErrorCode::NotFound);
    a.spec.pool = Some("nfs".into());
    a.spec.disks = vec![DiskSpec {
        name: "root".into(),
        size_mib: 64,
    }];
    apply(&mut s, CommandV1::CreateVm { vm: a.clone() }).expect("shared pool");
    // Host 1 starts moving the VM's boot disk to another shared pool, then is lost.
    s.pools.insert("nfs2".into(), pool("nfs2", true));
    let root = VolumeId::of_vm_disk(a.id, "root");
    apply(
        &mut s,
        CommandV1::BeginVolumeMove {
            id: root,
            to: "nfs2".into(),
            at: 8,
        },
    )
    .expect("move");

    let recover = |from, to, seen| CommandV1::RecoverVm {
        id: a.id,
        from: NodeId(from),
        to: NodeId(to),
        seen,
        at: 9,
    };
    // The VM changed since the decision (its host came back and recorded a start).
    let e = apply(&mut s, recover(1, 2, 1)).expect_err("stale decision");
    assert_eq!(e.code, ErrorCode::Conflict);
    apply(&mut s, recover(1, 2, 0)).expect("recovered");
    assert_eq!(s.vms[&a.id].node, NodeId(2));
    // The move died with its host: the disk is where it was, and free to move again.
    let disk = s.volume(&root).expect("root");
    assert_eq!(
        (disk.pool.as_str(), disk.moving_to.as_deref()),
        ("nfs", None)
    );
    assert_eq!(s.vms[&a.id].recovered_from, Some(NodeId(1)));
    // A second leader deciding the same thing changes nothing.
    let before = s.clone();
    apply(&mut s, recover(1, 2, 9)).expect_err("already moved");
    assert_eq!(s, before);
    // A late report from the lost host is refused; the new host's running clears the mark.
    let seen = |node, state| CommandV1::RecordVmObservedOn {
        node: NodeId(node),
        id: a.id,
        state,
        reason: None,
        at: 10,
    };
    apply(&mut s, seen(1, VmState::Running)).expect_err("old host");
    apply(&mut s, seen(2, VmState::Running)).expect("new host");
    assert_eq!(s.vms[&a.id].recovered_from, None);

    let e = apply(&mut s, CommandV1::DeletePool { name: "nfs".into() }).expect_err("in use");
    assert_eq!(e.reason.as_deref(), Some("pool_in_use"));
    apply(
        &mut s,
        CommandV1::SetVmHa {
            id: a.id,
            ha: false,
            at: 11,
        },
    )
    .expect("ha off");
    let e = apply(&mut s, recover(2, 1, 11)).expect_err("not ha");
    assert_eq!(e.code, ErrorCode::Conflict);
    apply(
        &mut s,
        CommandV1::DeletePool {
            name: "local".into(),
        },
    )
    .expect("unused");
    assert!(!s.pools.contains_key("local"));
}

fn volume(name: &str, pool: &str, node: Option<NodeId>) -> Volume {
    Volume {
        id: VolumeId::new_random(),
        name: name.into(),
        pool: pool.into(),
        node,
        size_mib: 16,
        format: VolumeFormat::Qcow2,
        compressed: false,
        attached_to: None,
        vm_disk: None,
        snapshots: vec![],
        labels: Default::default(),
        moving_to: None,
        moved_at: None,
        created_at: 0,
        updated_at: 0,
    }
}

#[test]
fn volumes_follow_their_rules() {
    let mut s = with_host(4096);
    let mut h2 = s.nodes[&1].clone();
    h2.id = NodeId(2);
    s.nodes.insert(2, h2);
    let img = image("demo");
    s.images.insert(img.id, img.clone());
    s.pools.insert("cold".into(), pool("cold", false));
    s.pools.insert("nfs".into(), pool("nfs", true));
    let mut v1 = vm("web", img.id);
    v1.spec.disks = vec![DiskSpec {
        name: "root".into(),
        size_mib: 64,
    }];
    apply(&mut s, CommandV1::CreateVm { vm: v1.clone() }).expect("vm");
    // The VM's boot disk is a volume, attached, named after the VM.
    let root = s.volume_by_name("web-root").expect("root volume").clone();
    assert_eq!(root.id, VolumeId::of_vm_disk(v1.id, "root"));
    assert_eq!(root.attached_to, Some(v1.id));
    assert_eq!((root.pool.as_str(), root.node), ("data", Some(NodeId(1))));
    let err = apply(&mut s, CommandV1::DeleteVolume { id: root.id }).expect_err("own disk");
    assert_eq!(err.reason.as_deref(), Some("volume_attached"));
    let err = apply(&mut s, CommandV1::DetachVolume { id: root.id, at: 1 }).expect_err("own");
    assert_eq!(err.reason.as_deref(), Some("vm_disk"));

    // A local volume on host 2 cannot go to a VM on host 1; a shared one can.
    let far = volume("far", "cold", Some(NodeId(2)));
    apply(
        &mut s,
        CommandV1::CreateVolume {
            volume: far.clone(),
        },
    )
    .expect("far");
    let err = apply(
        &mut s,
        CommandV1::AttachVolume {
            id: far.id,
            vm: v1.id,
            at: 1,
        },
    )
    .expect_err("elsewhere");
    assert_eq!(err.reason.as_deref(), Some("volume_elsewhere"));
    let dup = volume("far", "cold", Some(NodeId(1)));
    assert!(apply(&mut s, CommandV1::CreateVolume { volume: dup }).is_err());
    let bad = volume("nohost", "cold", None);
    let err = apply(&mut s, CommandV1::CreateVolume { volume: bad }).expect_err("node");
    assert_eq!(err.field.as_deref(), Some("node"));
    let shared = volume("shared", "nfs", None);
    apply(
        &mut s,
        CommandV1::CreateVolume {
            volume: shared.clone(),
        },
    )
    .expect("shared");
    apply(
        &mut s,
        CommandV1::AttachVolume {
            id: shared.id,
            vm: v1.id,
            at: 2,
        },
    )
    .expect("attach");
    assert!(
        apply(&mut s, CommandV1::DeleteVolume { id: shared.id }).is_err(),
        "attached volumes are not deleted"
    );

    // Moves: one at a time; a pool with volumes (or moves into it) is not deleted.
    apply(
        &mut s,
        CommandV1::BeginVolumeMove {
            id: far.id,
            to: "nfs".into(),
            at: 3,
        },
    )
    .expect("begin");
    let err = apply(
        &mut s,
        CommandV1::BeginVolumeMove {
            id: far.id,
            to: "data".into(),
            at: 3,
        },
    )
    .expect_err("twice");
    assert_eq!(err.reason.as_deref(), Some("volume_moving"));
    assert!(apply(&mut s, CommandV1::DeleteVolume { id: far.id }).is_err());
    let moved = crate::MovedVolume {
        node: Some(NodeId(2)),
        format: VolumeFormat::Qcow2,
        compressed: false,
    };
    assert!(
        apply(
            &mut s,
            CommandV1::EndVolumeMove {
                id: far.id,
                moved: Some(moved),
                at: 4
            }
        )
        .is_err(),
        "a shared pool names no host"
    );
    let moved = crate::MovedVolume {
        node: None,
        format: VolumeFormat::Qcow2,
        compressed: true,
    };
    apply(
        &mut s,
        CommandV1::EndVolumeMove {
            id: far.id,
            moved: Some(moved),
            at: 4,
        },
    )
    .expect("end");
    let far_now = s.volume(&far.id).expect("far").clone();
    assert_eq!(
        (far_now.pool.as_str(), far_now.node, far_now.compressed),
        ("nfs", None, true)
    );
    assert_eq!(far_now.moved_at, Some(4));
    let err = apply(&mut s, CommandV1::DeletePool { name: "nfs".into() }).expect_err("in use");
    assert_eq!(err.reason.as_deref(), Some("pool_in_use"));
    assert!(
        apply(
            &mut s,
            CommandV1::ResizeVolume {
                id: far.id,
                size_mib: 8,
                at: 5
            }
        )
        .is_err()
    );
    apply(
        &mut s,
        CommandV1::ResizeVolume {
            id: far.id,
            size_mib: 32,
            at: 5,
        },
    )
    .expect("grow");

    // A VM that moves takes its local disks along; a deleted VM drops its own disks and
    // leaves the others detached.
    apply(
        &mut s,
        CommandV1::MoveVm {
            id: v1.id,
            from: NodeId(1),
            to: NodeId(2),
            at: 6,
        },
    )
    .expect("move");
    assert_eq!(s.volume(&root.id).expect("root").node, Some(NodeId(2)));
    apply(&mut s, CommandV1::DeleteVm { id: v1.id }).expect("delete vm");
    assert!(s.volume(&root.id).is_err());
    assert_eq!(s.volume(&shared.id).expect("kept").attached_to, None);
}

#[test]
fn a_vms_own_disks_move_resize_and_keep_its_pool() {
    let mut s = with_host(4096);
    let img = image("demo");
    s.images.insert(img.id, img.clone());
    s.pools.insert("hot".into(), pool("hot", false));
    s.pools.insert("nfs".into(), pool("nfs", true));
    let mut v = vm("db", img.id);
    v.spec.disks = vec![
        DiskSpec {
            name: "root".into(),
            size_mib: 64,
        },
        DiskSpec {
            name: "disk1".into(),
            size_mib: 8,
        },
    ];
    apply(&mut s, CommandV1::CreateVm { vm: v.clone() }).expect("vm");
    let root = VolumeId::of_vm_disk(v.id, "root");
    let disk1 = VolumeId::of_vm_disk(v.id, "disk1");
    // Local disks stay local: a migration copies all of a VM's disks or none.
    let err = apply(
        &mut s,
        CommandV1::BeginVolumeMove {
            id: root,
            to: "nfs".into(),
            at: 1,
        },
    )
    .expect_err("kind");
    assert_eq!(err.reason.as_deref(), Some("vm_disk_pool_kind"));
    // The boot disk moves: the VM's pool follows it; a failed move changes nothing.
    let begin = |id| CommandV1::BeginVolumeMove {
        id,
        to: "hot".into(),
        at: 2,
    };
    apply(&mut s, begin(root)).expect("begin");
    let err = apply(
        &mut s,
        CommandV1::BeginMigration {
            id: v.id,
            from: NodeId(1),
            to: NodeId(1),
        },
    )
    .expect_err("moving");
    assert_eq!(err.reason.as_deref(), Some("volume_moving"));
    apply(
        &mut s,
        CommandV1::EndVolumeMove {
            id: root,
            moved: None,
            at: 3,
        },
    )
    .expect("failed move");
    assert_eq!(s.vms[&v.id].spec.pool, None);
    apply(&mut s, begin(root)).expect("begin");
    let done = crate::MovedVolume {
        node: Some(NodeId(1)),
        format: VolumeFormat::Qcow2,
        compressed: false,
    };
    apply(
        &mut s,
        CommandV1::EndVolumeMove {
            id: root,
            moved: Some(done.clone()),
            at: 4,
        },
    )
    .expect("moved");
    assert_eq!(s.vms[&v.id].spec.pool.as_deref(), Some("hot"));
    assert_eq!(s.volume(&root).expect("root").pool, "hot");
    // Another disk moving leaves the VM's pool alone.
    apply(
        &mut s,
        CommandV1::BeginVolumeMove {
            id: disk1,
            to: "hot".into(),
            at: 5,
        },
    )
    .expect("begin disk1");
    apply(
        &mut s,
        CommandV1::EndVolumeMove {
            id: disk1,
            moved: Some(done),
            at: 6,
        },
    )
    .expect("moved disk1");
    assert_eq!(s.vms[&v.id].spec.pool.as_deref(), Some("hot"));
    // Growing an own disk grows the VM's spec of it.
    apply(
        &mut s,
        CommandV1::ResizeVolume {
            id: disk1,
            size_mib: 12,
            at: 7,
        },
    )
    .expect("grow");
    assert_eq!(s.vms[&v.id].spec.disks[1].size_mib, 12);

    // A VM recorded before its disks were volumes gets them, once.
    s.volumes.remove(&root);
    apply(&mut s, CommandV1::AddVmDiskVolumes { vm: v.id }).expect("backfill");
    let back = s.volume(&root).expect("root again").clone();
    assert_eq!((back.pool.as_str(), back.node), ("hot", Some(NodeId(1))));
    let count = s.volumes.len();
    apply(&mut s, CommandV1::AddVmDiskVolumes { vm: v.id }).expect("again");
    assert_eq!(
        (s.volumes.len(), s.volume(&root).ok()),
        (count, Some(&back))
    );
}

#[test]
fn running_vms_and_used_images_cannot_be_deleted() {
    let mut s = with_host(4096);
    let img = image("demo");
    apply(&mut s, CommandV1::CreateImage { image: img.clone() }).expect("image");
    let v = vm("a", img.id);
    apply(&mut s, CommandV1::CreateVm { vm: v.clone() }).expect("vm");
    apply(
        &mut s,
        CommandV1::RecordVmObserved {
            id: v.id,
            state: VmState::Running,
            reason: None,
            at: 5,
        },
    )
    .expect("observed");
    assert_eq!(s.vms[&v.id].updated_at, 5);
    let e = apply(&mut s, CommandV1::DeleteVm { id: v.id }).expect_err("running");
    assert_eq!(e.code, ErrorCode::Conflict);
    let e = apply(&mut s, CommandV1::DeleteImage { id: img.id }).expect_err("in use");
    assert_eq!(e.code, ErrorCode::Conflict);
    apply(
        &mut s,
        CommandV1::RecordVmObserved {
            id: v.id,
            state: VmState::Crashed,
            reason: Some("killed".into()),
            at: 6,
        },
    )
    .expect("crashed");
    apply(&mut s, CommandV1::DeleteVm { id: v.id }).expect("delete crashed");
    apply(&mut s, CommandV1::DeleteImage { id: img.id }).expect("image free now");
    assert!(s.vms.is_empty() && s.images.is_empty());
}

#[test]
fn finished_operations_are_immutable_and_pruned_by_age() {
    let mut s = with_host(4096);
    let o = op();
    apply(&mut s, CommandV1::CreateOperation { op: o.clone() }).expect("create");
    let done = |status| CommandV1::UpdateOperation {
        id: o.id,
        status,
        progress: 250,
        message: "done".into(),
        error: None,
        at: 10,
    };
    apply(&mut s, done(OperationStatus::Success)).expect("finish");
    assert_eq!(s.operations[&o.id].progress, 100, "progress is clamped");
    let e = apply(&mut s, done(OperationStatus::Failure)).expect_err("final");
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(s.operations[&o.id].status, OperationStatus::Success);

    let running = op();
    apply(
        &mut s,
        CommandV1::CreateOperation {
            op: running.clone(),
        },
    )
    .expect("create 2");
    let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperations { before: 11 }));
    assert_eq!(touched, vec![Touched::Operation(o.id)]);
    assert!(
        s.operations.contains_key(&running.id),
        "running operations are never pruned"
    );
}

#[test]
fn operations_are_pruned_by_count_oldest_first_and_never_while_running() {
    let mut s = ClusterState::default();
    let mut finished = Vec::new();
    for at in 1..=5 {
        let mut o = op();
        o.status = OperationStatus::Success;
        o.updated_at = at;
        finished.push(o.id);
        apply(&mut s, CommandV1::CreateOperation { op: o }).expect("create");
    }
    let running = op();
    apply(
        &mut s,
        CommandV1::CreateOperation {
            op: running.clone(),
        },
    )
    .expect("create running");
    let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperationsKeeping {
        before: 0,
        keep_at_most: 2,
    }));
    assert_eq!(touched.len(), 3, "{touched:?}");
    let left: Vec<OperationId> = finished
        .iter()
        .copied()
        .filter(|id| s.operations.contains_key(id))
        .collect();
    assert_eq!(left, finished[3..].to_vec(), "the two newest are kept");
    assert!(s.operations.contains_key(&running.id));
    // Age still applies below the count.
    let (_, touched) = s.apply(&Command::V1(CommandV1::PruneOperationsKeeping {
        before: 5,
        keep_at_most: 100,
    }));
    assert_eq!(touched, vec![Touched::Operation(finished[3])]);
}

#[test]
fn cluster_init_happens_once() {
    let mut s = with_host(4096);
    apply(
        &mut s,
        CommandV1::InitCluster {
            jwt_secret: "k".into(),
            at: 1,
        },
    )
    .expect("init");
    let e = apply(
        &mut s,
        CommandV1::InitCluster {
            jwt_secret: "other".into(),
            at: 2,
        },
    )
    .expect_err("twice");
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(s.meta.jwt_secret, "k");
}

#[test]
fn commands_are_tagged_with_their_version_on_the_wire() {
    let c: Command = CommandV1::DeleteVm {
        id: VmId::new_random(),
    }
    .into();
    let json = serde_json::to_value(&c).expect("json");
    assert_eq!(json["version"], "1");
    assert_eq!(json["type"], "delete_vm");
    let back: Command = serde_json::from_value(json).expect("back");
    assert_eq!(back, c);
}
