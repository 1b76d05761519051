//! Property tests of `apply` over random command sequences (a small seeded generator,
//! reproducible).

use super::*;
use crate::command::{Command, CommandV1};
use novacron_chaos::seeded::Seeded as Gen;
use novacron_types::*;

/// A command drawn from a small pool of names and IDs, so conflicts and hits are frequent.
fn command(g: &mut Gen, vms: &[VmId], images: &[ImageId], ops: &[OperationId]) -> Command {
    let vm = vms[g.below(vms.len() as u64) as usize];
    let image = images[g.below(images.len() as u64) as usize];
    let op = ops[g.below(ops.len() as u64) as usize];
    let at = g.below(1000) as i64;
    let name = format!("n{}", g.below(3));
    let states = VmState::ALL;
    let c = match g.below(9) {
        0 => CommandV1::CreateImage {
            image: Image {
                id: image,
                name,
                description: String::new(),
                format: ImageFormat::Qcow2,
                path: "/i".into(),
                virtual_size: 1,
                boot: None,
                node: NodeId(1),
                created_at: at,
            },
        },
        1 | 2 => CommandV1::CreateVm {
            vm: Vm {
                id: vm,
                name: name.clone(),
                state: VmState::Stopped,
                state_reason: None,
                desired: PowerState::Stopped,
                node: NodeId(1),
                spec: VmSpec {
                    name,
                    image,
                    vcpus: 1,
                    memory_mib: 64,
                    disks: vec![],
                    boot: None,
                    placement: Default::default(),
                    pool: None,
                    ha: false,
                },
                snapshots: vec![],
                labels: Default::default(),
                created_at: at,
                updated_at: at,
                migrating_to: None,
                recovered_from: None,
            },
        },
        3 => CommandV1::DeleteVm { id: vm },
        4 => CommandV1::RecordVmObserved {
            id: vm,
            state: states[g.below(states.len() as u64) as usize],
            reason: None,
            at,
        },
        5 => CommandV1::DeleteImage { id: image },
        6 => CommandV1::CreateOperation {
            op: Operation {
                id: op,
                kind: "vm.start".into(),
                status: OperationStatus::Running,
                progress: 0,
                message: String::new(),
                error: None,
                resources: vec![],
                node: NodeId(1),
                requestor: "p".into(),
                created_at: at,
                updated_at: at,
                migration: None,
            },
        },
        7 => CommandV1::UpdateOperation {
            id: op,
            status: [
                OperationStatus::Running,
                OperationStatus::Success,
                OperationStatus::Failure,
            ][g.below(3) as usize],
            progress: g.below(200) as u8,
            message: String::new(),
            error: None,
            at,
        },
        _ => CommandV1::PruneOperations { before: at },
    };
    Command::V1(c)
}

#[test]
fn apply_is_deterministic_rejections_change_nothing_and_invariants_hold() {
    for seed in 0..200u64 {
        let mut g = Gen::new(seed);
        let vms: Vec<VmId> = (0..4).map(|_| VmId::new_random()).collect();
        let images: Vec<ImageId> = (0..2).map(|_| ImageId::new_random()).collect();
        let ops: Vec<OperationId> = (0..3).map(|_| OperationId::new_random()).collect();
        let cmds: Vec<Command> = (0..60)
            .map(|_| command(&mut g, &vms, &images, &ops))
            .collect();

        // Room for three of the four VMs: some creates must be refused for capacity.
        let (mut a, mut b) = (tests::with_host(200), tests::with_host(200));
        for cmd in &cmds {
            let before = a.clone();
            let (ra, ta) = a.apply(cmd);
            let (rb, tb) = b.apply(cmd);
            assert_eq!(
                (&ra, &ta),
                (&rb, &tb),
                "seed {seed}: replicas disagree on {cmd:?}"
            );
            if ra.error.is_some() {
                assert_eq!(a, before, "seed {seed}: rejected {cmd:?} changed state");
                assert!(ta.is_empty());
            }
            // Invariants after every step.
            let mut names: Vec<&str> = a.vms.values().map(|v| v.name.as_str()).collect();
            names.sort();
            let total = names.len();
            names.dedup();
            assert_eq!(names.len(), total, "seed {seed}: duplicate VM names");
            for v in a.vms.values() {
                assert!(
                    a.images.contains_key(&v.spec.image),
                    "seed {seed}: VM without its image"
                );
            }
            for (node, r) in crate::placement::reserved(&a, None) {
                let host = &a.nodes[&node];
                assert!(
                    r.memory_mib <= host.memory_capacity_mib() && r.vcpus <= host.vcpu_capacity(),
                    "seed {seed}: host {node} overfilled: {r:?}"
                );
            }
            for o in a.operations.values() {
                assert!(o.progress <= 100);
            }
        }
        assert_eq!(a, b);
        // A snapshot of the state restores to an equal state.
        let json = serde_json::to_vec(&a).expect("ser");
        let back: ClusterState = serde_json::from_slice(&json).expect("de");
        assert_eq!(back, a, "seed {seed}: snapshot round trip");
    }
}

#[test]
fn finished_operations_never_change_again() {
    for seed in 0..100u64 {
        let mut g = Gen::new(seed);
        let ops: Vec<OperationId> = (0..2).map(|_| OperationId::new_random()).collect();
        let vms = [VmId::new_random()];
        let images = [ImageId::new_random()];
        let mut s = tests::with_host(4096);
        let mut finished: BTreeMap<OperationId, Operation> = BTreeMap::new();
        for _ in 0..80 {
            let cmd = command(&mut g, &vms, &images, &ops);
            s.apply(&cmd);
            for (id, op) in &finished {
                if let Some(now) = s.operations.get(id) {
                    assert_eq!(now, op, "seed {seed}: a finished operation changed");
                }
            }
            for op in s.operations.values().filter(|o| o.status.is_final()) {
                finished.entry(op.id).or_insert_with(|| op.clone());
            }
            // A pruned operation may come back only as a new record with the same ID.
            finished.retain(|id, _| s.operations.contains_key(id));
        }
    }
}
