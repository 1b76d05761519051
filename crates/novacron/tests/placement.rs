//! Placement on a real 3-host cluster: the dry run ranks hosts and gives every rejected host its
//! reasons; creates without a host follow labels, affinity and anti-affinity; a named host is
//! still checked; memory accounting refuses an overfull host and frees room on delete; the CLI
//! shows the same and fails with the reason.

mod common;

use common::cluster::TestCluster;
use common::{ADMIN_PASSWORD, Cli, demo_vm};
use novacron_client::ClientError;
use novacron_types::{CreateVmRequest, NodeId, PlacementReport, PlacementRequest, PlacementRules};

fn total_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    kib / 1024
}

fn rules(labels: &[(&str, &str)], affinity: Option<&str>, anti: Option<&str>) -> PlacementRules {
    PlacementRules {
        host_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        affinity: affinity.map(str::to_string),
        anti_affinity: anti.map(str::to_string),
    }
}

fn reasons(report: &PlacementReport, node: u64) -> Vec<String> {
    report
        .rejected
        .iter()
        .find(|r| r.node == NodeId(node))
        .map(|r| r.reasons.iter().map(|x| x.code.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_rules_capacity_and_explains_itself() {
    // Host 1 (zone a) gives guests 400 MiB; hosts 2 and 3 (zone b) all of their memory.
    let reserve = (total_memory_mib() - 400).to_string();
    let cluster = TestCluster::start_each(
        &["full", "full", "full"],
        &[],
        &[
            &["--label", "zone=a", "--reserved-memory-mib", &reserve],
            &["--label", "zone=b"],
            &["--label", "zone=b"],
        ],
    )
    .await;
    let c = cluster.admin(1).await;

    // Dry run: zone b → hosts 2 and 3 ranked, host 1 rejected for its label.
    let dry = PlacementRequest {
        vcpus: 1,
        memory_mib: 128,
        disk_mib: 0,
        image: Some("demo".into()),
        placement: rules(&[("zone", "b")], None, None),
        node: None,
        strategy: None,
        pool: None,
    };
    let report = c.place(&dry).await.expect("dry run");
    let ranked: Vec<u64> = report.candidates.iter().map(|x| x.node.0).collect();
    assert_eq!(ranked.len(), 2, "{report:?}");
    assert!(ranked.contains(&2) && ranked.contains(&3), "{report:?}");
    assert_eq!(reasons(&report, 1), vec!["missing_label"]);
    assert!(
        report.rejected[0].reasons[0]
            .message
            .contains("requires zone=b, the host has zone=a"),
        "{report:?}"
    );
    // A dry run creates nothing.
    assert!(c.list_vms().await.expect("list").is_empty());

    // Anti-affinity spreads a group over the zone-b hosts, and a third member has nowhere to go.
    let web = rules(&[("zone", "b")], None, Some("web"));
    let mut hosts = Vec::new();
    for name in ["web-1", "web-2"] {
        let vm = c
            .create_vm(&CreateVmRequest {
                placement: web.clone(),
                ..demo_vm(name)
            })
            .await
            .expect("create web");
        hosts.push(vm.node.0);
    }
    hosts.sort();
    assert_eq!(hosts, vec![2, 3], "one per zone-b host");
    let e = c
        .create_vm(&CreateVmRequest {
            placement: web.clone(),
            ..demo_vm("web-3")
        })
        .await
        .expect_err("no host left for the group");
    assert_eq!(e.status(), Some(409), "{e}");
    let body = e.to_string();
    assert!(body.contains("anti-affinity group 'web'"), "{body}");
    assert!(body.contains("requires zone=b"), "{body}");

    // Affinity: the second member of a group follows the first, wherever that went.
    let db = rules(&[], Some("db"), None);
    let db1 = c
        .create_vm(&CreateVmRequest {
            placement: db.clone(),
            ..demo_vm("db-1")
        })
        .await
        .expect("db-1");
    let db2 = c
        .create_vm(&CreateVmRequest {
            placement: db.clone(),
            ..demo_vm("db-2")
        })
        .await
        .expect("db-2");
    assert_eq!(db1.node, db2.node);

    // Capacity: host 1 takes three 128 MiB VMs (its 400 MiB), not a fourth, also when named.
    let on_1 = |name: &str| CreateVmRequest {
        node: Some(NodeId(1)),
        ..demo_vm(name)
    };
    let already = c
        .list_vms()
        .await
        .expect("list")
        .iter()
        .filter(|v| v.node == NodeId(1))
        .count();
    for i in already..3 {
        c.create_vm(&on_1(&format!("small-{i}")))
            .await
            .expect("fits on host 1");
    }
    let e = c
        .create_vm(&on_1("one-too-many"))
        .await
        .expect_err("host 1 is full");
    match &e {
        ClientError::Api { status, error } => {
            assert_eq!(*status, 409);
            assert_eq!(error.reason.as_deref(), Some("not_enough_memory"), "{e}");
        }
        other => panic!("{other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("needs 128 MiB of memory") && text.contains("free for guests"),
        "{text}"
    );
    let report = c
        .place(&PlacementRequest {
            node: Some(NodeId(1)),
            ..dry.clone()
        })
        .await
        .expect("dry run on host 1");
    assert_eq!(report.chosen, None);
    assert!(reasons(&report, 1).contains(&"not_enough_memory".to_string()));
    assert_eq!(reasons(&report, 2), vec!["not_requested"]);

    // Deleting one frees its room.
    let victim = c
        .list_vms()
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.node == NodeId(1))
        .expect("a VM on host 1");
    c.delete_vm(&victim.id.to_string()).await.expect("delete");
    c.create_vm(&on_1("fits-again"))
        .await
        .expect("room again after the delete");

    // Bad rules: 400 naming the field.
    let e = c
        .place(&PlacementRequest {
            placement: rules(&[("Zone", "a")], None, None),
            ..dry.clone()
        })
        .await
        .expect_err("bad label key");
    match &e {
        ClientError::Api { status, error } => {
            assert_eq!(*status, 400);
            assert_eq!(error.field.as_deref(), Some("placement.host_labels.Zone"));
        }
        other => panic!("{other}"),
    }

    // The CLI: a ranking table with the rejected hosts' reasons, and a failed create's reason.
    let cli = Cli {
        server: cluster.nodes[2].url.clone(),
        config: cluster.nodes[2].dir.path().join("client.toml"),
    };
    let (code, _, err) = cli.run(&["login", "--password-stdin"], Some(ADMIN_PASSWORD));
    assert_eq!(code, 0, "{err}");
    let out = cli.ok(&[
        "vm",
        "place",
        "--dry-run",
        "--memory",
        "128",
        "--host-label",
        "zone=b",
        "--anti-affinity",
        "web",
    ]);
    assert!(out.contains("no host fits"), "{out}");
    assert!(
        out.contains("missing_label") && out.contains("anti_affinity"),
        "{out}"
    );
    let out = cli.ok(&[
        "vm",
        "create",
        "cli-vm",
        "--host-label",
        "zone=b",
        "--dry-run",
    ]);
    assert!(out.contains("RANK") && out.contains("host-2"), "{out}");
    let (code, _, err) = cli.run(&["vm", "create", "cli-too-big", "--node", "1"], None);
    assert_ne!(code, 0);
    assert!(err.contains("needs 128 MiB of memory"), "{err}");
    assert!(
        !c.list_vms()
            .await
            .expect("list")
            .iter()
            .any(|v| v.name.starts_with("cli-")),
        "dry runs and refused creates leave nothing"
    );
}
