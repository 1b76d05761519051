//! Placement: which hosts a VM may go to, and which is best. Pure: the replicated state and a
//! snapshot of live facts (health, free disk, load) in, a ranking with reasons out.
//!
//! Two users:
//! - the service ranks hosts for `vm create` (and later migration, evacuation and HA) with
//!   [`rank`], which applies every filter;
//! - `apply` re-checks what the replicated state alone decides ([`check_state`]: role,
//!   maintenance, labels, vCPUs, memory, affinity) when the VM is recorded, so two creates racing
//!   for the last room on a host cannot both succeed: accounting is derived from the VM records,
//!   never kept as counters that could drift.
//!
//! Accounting: every VM recorded on a host reserves its vCPUs and memory there (and, while it
//! migrates, on its target too), whatever its power state (a stopped VM may be started at any time; Proxmox-style "only running VMs count"
//! lets a host be promised twice). A host's capacity is its CPUs times its CPU overcommit, and
//! its memory less the reserve, times its memory overcommit ([`NodeInfo::vcpu_capacity`],
//! [`NodeInfo::memory_capacity_mib`]).

use std::collections::BTreeMap;

use novacron_types::{
    HostRole, NodeId, NodeInfo, PlacementCandidate, PlacementReason, PlacementRejection,
    PlacementReport, PlacementRules, PlacementStrategy, VmId,
};

use crate::machine::ClusterState;

/// What a VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand<'a> {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub rules: &'a PlacementRules,
    /// The storage pool its disks go to; `None`: the host's data directory.
    pub pool: Option<&'a str>,
    /// The VM being placed, when it already exists (migration): its own reservation and group
    /// membership are left out.
    pub vm: Option<VmId>,
}

/// How a host is doing right now, as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Live {
    /// `online`, `offline`, `isolated`, `joining`.
    pub health: String,
    /// Free bytes per storage pool the host can use (`data`: its own data directory), as last
    /// reported. A pool missing here is one the host cannot see.
    pub disk_free_bytes: BTreeMap<String, u64>,
    pub load1: Option<f64>,
    /// Milliseconds since the host's last heartbeat, when that is longer than a host offered to
    /// new VMs may be silent (a few heartbeats): such a host is no placement target even
    /// before it counts as offline.
    pub silent_ms: Option<u64>,
}

/// What the VMs recorded on one host reserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub vms: u32,
}

/// Reservations per host, leaving out `except`.
pub fn reserved(state: &ClusterState, except: Option<VmId>) -> BTreeMap<u64, Reserved> {
    let mut out: BTreeMap<u64, Reserved> = BTreeMap::new();
    for vm in state.vms.values().filter(|v| Some(v.id) != except) {
        let r = out.entry(vm.node.0).or_default();
        r.vcpus += u64::from(vm.spec.vcpus);
        r.memory_mib += vm.spec.memory_mib;
        r.vms += 1;
        // A VM on its way somewhere holds room there too, until the move ends either way.
        if let Some(to) = vm.migrating_to {
            let r = out.entry(to.0).or_default();
            r.vcpus += u64::from(vm.spec.vcpus);
            r.memory_mib += vm.spec.memory_mib;
        }
    }
    out
}

fn reason(code: &str, message: String) -> PlacementReason {
    PlacementReason {
        code: code.to_string(),
        message,
    }
}

/// The hosts running VMs of `group` (by affinity or anti-affinity), leaving out `except`.
fn group_hosts(
    state: &ClusterState,
    except: Option<VmId>,
    pick: impl Fn(&PlacementRules) -> Option<&String>,
    group: &str,
) -> BTreeMap<u64, Vec<String>> {
    let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for vm in state.vms.values().filter(|v| Some(v.id) != except) {
        if pick(&vm.spec.placement).is_some_and(|g| g == group) {
            out.entry(vm.node.0).or_default().push(vm.name.clone());
        }
    }
    out
}

/// Every rule the replicated state alone decides, for one host. Empty: the VM may go there.
pub fn check_state(state: &ClusterState, node: &NodeInfo, demand: &Demand) -> Vec<PlacementReason> {
    let mut out = Vec::new();
    if node.role == HostRole::Witness {
        out.push(reason("witness", "a witness, runs no VMs".to_string()));
        return out;
    }
    if node.maintenance {
        out.push(reason(
            "maintenance",
            format!(
                "in maintenance (`novacron node restore {}` ends it)",
                node.id
            ),
        ));
    }
    for (k, v) in &demand.rules.host_labels {
        match node.labels.get(k) {
            Some(have) if have == v => {}
            Some(have) => out.push(reason(
                "missing_label",
                format!("requires {k}={v}, the host has {k}={have}"),
            )),
            None => out.push(reason(
                "missing_label",
                format!("requires {k}={v}, the host has no label {k}"),
            )),
        }
    }
    let used = reserved(state, demand.vm)
        .get(&node.id.0)
        .copied()
        .unwrap_or_default();
    let (vcpu_cap, mem_cap) = (node.vcpu_capacity(), node.memory_capacity_mib());
    if used.vcpus + u64::from(demand.vcpus) > vcpu_cap {
        out.push(reason(
            "not_enough_cpus",
            format!(
                "needs {} vCPUs, {} of {} free ({} CPUs at {}% overcommit)",
                demand.vcpus,
                vcpu_cap.saturating_sub(used.vcpus),
                vcpu_cap,
                node.cpus,
                node.cpu_overcommit_pct
            ),
        ));
    }
    if used.memory_mib + demand.memory_mib > mem_cap {
        out.push(reason(
            "not_enough_memory",
            format!(
                "needs {} MiB of memory, {} of {} MiB free for guests ({} MiB, {} MiB reserved, \
                 {}% overcommit)",
                demand.memory_mib,
                mem_cap.saturating_sub(used.memory_mib),
                mem_cap,
                node.memory_mib,
                node.reserved_memory_mib,
                node.memory_overcommit_pct
            ),
        ));
    }
    if let Some(g) = &demand.rules.affinity {
        let hosts = group_hosts(state, demand.vm, |r| r.affinity.as_ref(), g);
        if !hosts.is_empty() && !hosts.contains_key(&node.id.0) {
            let (h, names) = hosts
                .iter()
                .next()
                .map(|(h, n)| (*h, n.join(", ")))
                .unwrap_or_default();
            out.push(reason(
                "affinity",
                format!("affinity group '{g}' runs on host {h} ({names})"),
            ));
        }
    }
    if let Some(g) = &demand.rules.anti_affinity
        && let Some(names) =
            group_hosts(state, demand.vm, |r| r.anti_affinity.as_ref(), g).get(&node.id.0)
    {
        out.push(reason(
            "anti_affinity",
            format!(
                "already runs {} of anti-affinity group '{g}'",
                names.join(", ")
            ),
        ));
    }
    out
}

/// Filters every host (state rules, then health and disk from `live`), then orders those left
/// by `strategy`. `only` restricts the candidates to one host (a named `--node`); the others are
/// reported as `not_requested`.
pub fn rank(
    state: &ClusterState,
    live: &BTreeMap<u64, Live>,
    demand: &Demand,
    strategy: PlacementStrategy,
    only: Option<NodeId>,
) -> PlacementReport {
    let reservations = reserved(state, demand.vm);
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for node in state.nodes.values() {
        let mut reasons = Vec::new();
        if only.is_some_and(|o| o != node.id) {
            reasons.push(reason(
                "not_requested",
                "not the host asked for".to_string(),
            ));
        } else {
            reasons = check_state(state, node, demand);
            let facts = live.get(&node.id.0);
            if node.role != HostRole::Witness {
                match facts.map(|l| (l.health.as_str(), l.silent_ms)) {
                    Some(("online", Some(ms))) => reasons.push(reason(
                        "not_heartbeating",
                        format!("no heartbeat for {ms} ms"),
                    )),
                    Some(("online", None)) => {}
                    Some((h @ ("offline" | "isolated" | "joining"), _)) => {
                        reasons.push(reason(h, h.to_string()))
                    }
                    Some((other, _)) => reasons.push(reason("offline", other.to_string())),
                    None => reasons.push(reason(
                        "no_inventory",
                        "has not reported its health yet".to_string(),
                    )),
                }
                let pool = demand.pool.unwrap_or("data");
                match facts.map(|l| l.disk_free_bytes.get(pool)) {
                    Some(Some(free)) if demand.disk_mib > free >> 20 => reasons.push(reason(
                        "not_enough_disk",
                        format!(
                            "needs {} MiB of disk, {} MiB free in {}",
                            demand.disk_mib,
                            free >> 20,
                            match demand.pool {
                                Some(p) => format!("pool '{p}'"),
                                None => "its data directory".to_string(),
                            }
                        ),
                    )),
                    Some(None) if demand.pool.is_some() => reasons.push(reason(
                        "pool_unavailable",
                        format!("cannot see pool '{pool}' (not mounted or not marked)"),
                    )),
                    _ => {}
                }
            }
        }
        if !reasons.is_empty() {
            rejected.push(PlacementRejection {
                node: node.id,
                name: node.name.clone(),
                reasons,
            });
            continue;
        }
        let used = reservations.get(&node.id.0).copied().unwrap_or_default();
        let vcpu_free = node
            .vcpu_capacity()
            .saturating_sub(used.vcpus + u64::from(demand.vcpus));
        let mem_free = node
            .memory_capacity_mib()
            .saturating_sub(used.memory_mib + demand.memory_mib);
        let load1 = live.get(&node.id.0).and_then(|l| l.load1);
        let cpu_frac = vcpu_free as f64 / node.vcpu_capacity().max(1) as f64;
        let mem_frac = mem_free as f64 / node.memory_capacity_mib().max(1) as f64;
        let busy = load1.map_or(0.0, |l| (l / f64::from(node.cpus.max(1))).min(1.0));
        let room = 0.6 * mem_frac + 0.4 * cpu_frac;
        let score = match strategy {
            PlacementStrategy::Spread => 0.8 * room + 0.2 * (1.0 - busy),
            PlacementStrategy::Pack => 0.8 * (1.0 - room) + 0.2 * (1.0 - busy),
        };
        candidates.push(PlacementCandidate {
            node: node.id,
            name: node.name.clone(),
            score: (score * 1000.0).round() / 1000.0,
            vcpus_free_after: vcpu_free,
            memory_free_mib_after: mem_free,
            vms: used.vms,
            load1,
        });
    }
    // Best first; ties go to the host with fewer VMs (spread) or more (pack), then the lower ID.
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| match strategy {
                PlacementStrategy::Spread => a.vms.cmp(&b.vms),
                PlacementStrategy::Pack => b.vms.cmp(&a.vms),
            })
            .then_with(|| a.node.0.cmp(&b.node.0))
    });
    PlacementReport {
        strategy,
        chosen: candidates.first().map(|c| c.node),
        candidates,
        rejected,
    }
}

/// Why no host was chosen, for an error: the first reason's code (`no_host` if none) and every
/// considered host's reasons (`host 2 (b): needs ..., ...; host 3 ...`). Hosts not asked for, and
/// `skip` (the VM's own host when it moves), are left out.
pub fn explain(report: &PlacementReport, skip: Option<NodeId>) -> (String, String) {
    let considered = || {
        report
            .rejected
            .iter()
            .filter(|r| Some(r.node) != skip)
            .filter(|r| r.reasons.iter().all(|x| x.code != "not_requested"))
    };
    let code = considered()
        .flat_map(|r| r.reasons.iter())
        .map(|x| x.code.clone())
        .next()
        .unwrap_or_else(|| "no_host".into());
    let text = considered()
        .map(|r| {
            let why: Vec<&str> = r.reasons.iter().map(|x| x.message.as_str()).collect();
            format!("host {} ({}): {}", r.node, r.name, why.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    (code, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_types::*;

    fn host(id: u64, cpus: u32, memory_mib: u64) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            name: format!("h{id}"),
            api_address: String::new(),
            qemu_version: "7.2".into(),
            accelerator: "tcg".into(),
            cpus,
            memory_mib,
            registered_at: 0,
            labels: Default::default(),
            role: HostRole::Full,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
            reserved_memory_mib: 0,
            maintenance: false,
        }
    }

    fn vm_on(s: &mut ClusterState, name: &str, node: u64, vcpus: u32, mem: u64) -> VmId {
        vm_with(s, name, node, vcpus, mem, PlacementRules::default())
    }

    fn vm_with(
        s: &mut ClusterState,
        name: &str,
        node: u64,
        vcpus: u32,
        memory_mib: u64,
        placement: PlacementRules,
    ) -> VmId {
        let id = VmId::new_random();
        s.vms.insert(
            id,
            Vm {
                id,
                name: name.into(),
                state: VmState::Stopped,
                state_reason: None,
                desired: PowerState::Stopped,
                node: NodeId(node),
                spec: VmSpec {
                    name: name.into(),
                    image: ImageId::new_random(),
                    vcpus,
                    memory_mib,
                    disks: vec![],
                    boot: None,
                    placement,
                    pool: None,
                    ha: false,
                },
                snapshots: vec![],
                labels: Default::default(),
                created_at: 0,
                updated_at: 0,
                migrating_to: None,
                recovered_from: None,
            },
        );
        id
    }

    fn online(ids: &[u64]) -> BTreeMap<u64, Live> {
        ids.iter()
            .map(|i| {
                (
                    *i,
                    Live {
                        health: "online".into(),
                        disk_free_bytes: BTreeMap::from([("data".to_string(), 100 << 30)]),
                        load1: Some(0.0),
                        silent_ms: None,
                    },
                )
            })
            .collect()
    }

    fn demand(rules: &PlacementRules, vcpus: u32, memory_mib: u64) -> Demand<'_> {
        Demand {
            vcpus,
            memory_mib,
            disk_mib: 0,
            rules,
            pool: None,
            vm: None,
        }
    }

    fn codes(report: &PlacementReport, node: u64) -> Vec<String> {
        report
            .rejected
            .iter()
            .find(|r| r.node.0 == node)
            .map(|r| r.reasons.iter().map(|x| x.code.clone()).collect())
            .unwrap_or_default()
    }

    fn three_hosts() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.nodes.insert(id, host(id, 4, 4096));
        }
        s
    }

    #[test]
    fn spread_prefers_the_emptiest_host_and_pack_the_fullest_that_fits() {
        let mut s = three_hosts();
        vm_on(&mut s, "a", 1, 2, 2048);
        vm_on(&mut s, "b", 2, 1, 1024);
        let rules = PlacementRules::default();
        let live = online(&[1, 2, 3]);
        let spread = rank(
            &s,
            &live,
            &demand(&rules, 1, 1024),
            PlacementStrategy::Spread,
            None,
        );
        let order: Vec<u64> = spread.candidates.iter().map(|c| c.node.0).collect();
        assert_eq!(order, vec![3, 2, 1]);
        assert_eq!(spread.chosen, Some(NodeId(3)));
        let pack = rank(
            &s,
            &live,
            &demand(&rules, 1, 1024),
            PlacementStrategy::Pack,
            None,
        );
        let order: Vec<u64> = pack.candidates.iter().map(|c| c.node.0).collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert_eq!(pack.candidates[0].memory_free_mib_after, 1024);
    }

    #[test]
    fn load_breaks_ties_between_equal_hosts() {
        let s = three_hosts();
        let mut live = online(&[1, 2, 3]);
        live.get_mut(&1).expect("h1").load1 = Some(3.5);
        live.get_mut(&3).expect("h3").load1 = Some(1.0);
        let rules = PlacementRules::default();
        let r = rank(
            &s,
            &live,
            &demand(&rules, 1, 512),
            PlacementStrategy::Spread,
            None,
        );
        let order: Vec<u64> = r.candidates.iter().map(|c| c.node.0).collect();
        assert_eq!(order, vec![2, 3, 1]);
    }

    #[test]
    fn every_rejected_host_gets_its_reasons() {
        let mut s = three_hosts();
        s.nodes.insert(
            4,
            NodeInfo {
                role: HostRole::Witness,
                ..host(4, 1, 512)
            },
        );
        s.nodes.get_mut(&2).expect("h2").maintenance = true;
        vm_on(&mut s, "big", 3, 4, 4000);
        let mut live = online(&[1, 2, 3, 4]);
        live.get_mut(&1).expect("h1").health = "offline".into();
        let rules = PlacementRules::default();
        let r = rank(
            &s,
            &live,
            &demand(&rules, 1, 512),
            PlacementStrategy::Spread,
            None,
        );
        assert!(r.candidates.is_empty());
        assert_eq!(r.chosen, None);
        assert_eq!(codes(&r, 1), vec!["offline"]);
        assert_eq!(codes(&r, 2), vec!["maintenance"]);
        assert_eq!(codes(&r, 3), vec!["not_enough_cpus", "not_enough_memory"]);
        assert_eq!(codes(&r, 4), vec!["witness"]);
        let msg = &r
            .rejected
            .iter()
            .find(|x| x.node.0 == 3)
            .expect("h3")
            .reasons[1]
            .message;
        assert!(msg.contains("96 of 4096 MiB free"), "{msg}");
    }

    #[test]
    fn overcommit_and_reserve_change_capacity() {
        let mut s = ClusterState::default();
        s.nodes.insert(
            1,
            NodeInfo {
                cpu_overcommit_pct: 400,
                memory_overcommit_pct: 150,
                reserved_memory_mib: 1024,
                ..host(1, 2, 3072)
            },
        );
        vm_on(&mut s, "a", 1, 7, 2048);
        let rules = PlacementRules::default();
        let live = online(&[1]);
        // 2 CPUs × 400% = 8 vCPUs; (3072 − 1024) × 150% = 3072 MiB.
        let fits = rank(
            &s,
            &live,
            &demand(&rules, 1, 1024),
            PlacementStrategy::Spread,
            None,
        );
        assert_eq!(fits.chosen, Some(NodeId(1)));
        let r = rank(
            &s,
            &live,
            &demand(&rules, 2, 1025),
            PlacementStrategy::Spread,
            None,
        );
        assert_eq!(codes(&r, 1), vec!["not_enough_cpus", "not_enough_memory"]);
    }

    #[test]
    fn labels_affinity_and_anti_affinity() {
        let mut s = three_hosts();
        s.nodes
            .get_mut(&1)
            .expect("h1")
            .labels
            .insert("zone".into(), "a".into());
        s.nodes
            .get_mut(&2)
            .expect("h2")
            .labels
            .insert("zone".into(), "b".into());
        let live = online(&[1, 2, 3]);
        let zone_a = PlacementRules {
            host_labels: [("zone".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        let r = rank(
            &s,
            &live,
            &demand(&zone_a, 1, 256),
            PlacementStrategy::Spread,
            None,
        );
        assert_eq!(r.chosen, Some(NodeId(1)));
        assert_eq!(codes(&r, 2), vec!["missing_label"]);
        assert_eq!(codes(&r, 3), vec!["missing_label"]);

        let web = PlacementRules {
            anti_affinity: Some("web".into()),
            ..Default::default()
        };
        vm_with(&mut s, "web-1", 1, 1, 256, web.clone());
        vm_with(&mut s, "web-2", 3, 1, 256, web.clone());
        let r = rank(
            &s,
            &live,
            &demand(&web, 1, 256),
            PlacementStrategy::Pack,
            None,
        );
        assert_eq!(r.chosen, Some(NodeId(2)));
        assert_eq!(codes(&r, 1), vec!["anti_affinity"]);
        assert!(r.rejected[0].reasons[0].message.contains("web-1"));

        let db = PlacementRules {
            affinity: Some("db".into()),
            ..Default::default()
        };
        // The first of a group goes anywhere; the rest follow it.
        let first = rank(
            &s,
            &live,
            &demand(&db, 1, 256),
            PlacementStrategy::Spread,
            None,
        );
        assert_eq!(first.candidates.len(), 3);
        let db1 = vm_with(&mut s, "db-1", 2, 1, 256, db.clone());
        let r = rank(
            &s,
            &live,
            &demand(&db, 1, 256),
            PlacementStrategy::Spread,
            None,
        );
        assert_eq!(r.chosen, Some(NodeId(2)));
        assert_eq!(codes(&r, 1), vec!["affinity"]);
        // Moving db-1 itself: its own membership does not pin it.
        let moving = Demand {
            vm: Some(db1),
            ..demand(&db, 1, 256)
        };
        assert_eq!(
            rank(&s, &live, &moving, PlacementStrategy::Spread, None)
                .candidates
                .len(),
            3
        );
    }

    #[test]
    fn a_named_host_is_still_checked_and_the_rest_are_not_requested() {
        let mut s = three_hosts();
        vm_on(&mut s, "a", 2, 4, 4096);
        let live = online(&[1, 2, 3]);
        let rules = PlacementRules::default();
        let r = rank(
            &s,
            &live,
            &demand(&rules, 1, 256),
            PlacementStrategy::Spread,
            Some(NodeId(2)),
        );
        assert_eq!(r.chosen, None);
        assert_eq!(codes(&r, 2), vec!["not_enough_cpus", "not_enough_memory"]);
        assert_eq!(codes(&r, 1), vec!["not_requested"]);
        let (code, text) = explain(&r, None);
        assert_eq!(code, "not_enough_cpus");
        assert!(
            text.starts_with("host 2 (h2): needs 1 vCPUs") && !text.contains("host 1"),
            "{text}"
        );
        let r = rank(
            &s,
            &live,
            &demand(&rules, 1, 256),
            PlacementStrategy::Spread,
            Some(NodeId(3)),
        );
        assert_eq!(r.chosen, Some(NodeId(3)));
    }

    #[test]
    fn disk_and_missing_health_reports_reject() {
        let s = three_hosts();
        let mut live = online(&[1, 2]);
        live.get_mut(&1)
            .expect("h1")
            .disk_free_bytes
            .insert("data".into(), 512 << 20);
        let rules = PlacementRules::default();
        let d = Demand {
            disk_mib: 1024,
            ..demand(&rules, 1, 256)
        };
        let r = rank(&s, &live, &d, PlacementStrategy::Spread, None);
        assert_eq!(r.chosen, Some(NodeId(2)));
        assert_eq!(codes(&r, 1), vec!["not_enough_disk"]);
        assert_eq!(codes(&r, 3), vec!["no_inventory"]);
    }

    #[test]
    fn a_pool_counts_only_on_hosts_that_see_it() {
        let s = three_hosts();
        let mut live = online(&[1, 2, 3]);
        for (n, free) in [(1u64, 8u64 << 30), (2, 256 << 20)] {
            live.get_mut(&n)
                .expect("host")
                .disk_free_bytes
                .insert("shared".into(), free);
        }
        let rules = PlacementRules::default();
        let d = Demand {
            disk_mib: 1024,
            pool: Some("shared"),
            ..demand(&rules, 1, 256)
        };
        let r = rank(&s, &live, &d, PlacementStrategy::Spread, None);
        assert_eq!(r.chosen, Some(NodeId(1)));
        assert_eq!(codes(&r, 2), vec!["not_enough_disk"]);
        assert_eq!(codes(&r, 3), vec!["pool_unavailable"]);
    }

    #[test]
    fn reservations_follow_the_records() {
        let mut s = three_hosts();
        let a = vm_on(&mut s, "a", 1, 2, 1000);
        vm_on(&mut s, "b", 1, 1, 500);
        assert_eq!(
            reserved(&s, None)[&1],
            Reserved {
                vcpus: 3,
                memory_mib: 1500,
                vms: 2
            }
        );
        assert_eq!(reserved(&s, Some(a))[&1].memory_mib, 500);
        // Moved (the record's host changed): counted on the new host only.
        s.vms.get_mut(&a).expect("a").node = NodeId(2);
        let r = reserved(&s, None);
        assert_eq!((r[&1].vcpus, r[&2].vcpus), (1, 2));
        s.vms.remove(&a);
        assert!(!reserved(&s, None).contains_key(&2));
        // Migrating: held on both hosts.
        let b = s.vms.values().next().expect("b").id;
        s.vms.get_mut(&b).expect("b").migrating_to = Some(NodeId(3));
        let r = reserved(&s, None);
        assert_eq!((r[&1].memory_mib, r[&3].memory_mib), (500, 500));
    }
}
