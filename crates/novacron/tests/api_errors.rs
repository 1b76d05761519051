//! A table of bad requests per route (missing fields, wrong types, negative or huge sizes, unknown
//! IDs, bad tokens, wrong roles): each gets the right 4xx with the JSON error shape, and the
//! stored state is exactly the same afterwards.

mod common;

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use novacron_chaos::seeded::Seeded as Lcg;
use novacron_client::Client;
use novacron_types::VmState;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    Garbage,
    Revoked,
    Viewer,
    Operator,
    Admin,
}

struct Case {
    who: Who,
    method: Method,
    path: String,
    /// Raw body, sent as JSON unless it starts with `text:`.
    body: Option<String>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

fn case(
    who: Who,
    method: Method,
    path: &str,
    body: Option<&str>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        who,
        method,
        path: path.to_string(),
        body: body.map(str::to_string),
        status,
        code,
        field,
    }
}

async fn snapshot(c: &Client) -> Value {
    let vms: Value = c.get("/api/v1/vms").await.expect("vms");
    let images: Value = c.get("/api/v1/images").await.expect("images");
    let users: Value = c.get("/api/v1/users").await.expect("users");
    let tokens: Value = c.get("/api/v1/tokens").await.expect("tokens");
    serde_json::json!({"vms": vms, "images": images, "users": users, "tokens": tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_error_and_change_nothing() {
    let node = Node::start();
    let admin = node.admin().await;
    admin
        .post::<_, Value>(
            "/api/v1/users",
            &serde_json::json!({"username": "vera", "password": "viewer-pass", "role": "viewer"}),
        )
        .await
        .expect("viewer");
    admin.post::<_, Value>("/api/v1/users", &serde_json::json!({"username": "otto", "password": "operator-pass", "role": "operator"})).await.expect("operator");
    let viewer = Client::new(&node.url, None)
        .login("vera", "viewer-pass")
        .await
        .expect("viewer login");
    let operator = Client::new(&node.url, None)
        .login("otto", "operator-pass")
        .await
        .expect("operator login");
    let revoked: Value = admin
        .post("/api/v1/tokens", &serde_json::json!({"name": "old"}))
        .await
        .expect("token");
    let revoked_secret = revoked["token"].as_str().expect("secret").to_string();
    admin
        .delete(&format!(
            "/api/v1/tokens/{}",
            revoked["id"].as_str().expect("id")
        ))
        .await
        .expect("revoke");

    admin.create_vm(&demo_vm("running")).await.expect("create");
    admin
        .wait_success(
            &admin.vm_action("running", "start").await.expect("start"),
            Duration::from_secs(60),
        )
        .await
        .expect("start op");
    assert_eq!(
        admin.get_vm("running").await.expect("get").state,
        VmState::Running
    );
    admin
        .create_vm(&demo_vm("idle"))
        .await
        .expect("create idle");
    let tmp = node.dir.path().display().to_string();

    let token_of = |who: Who| -> Option<String> {
        match who {
            Who::Nobody => None,
            Who::Garbage => Some("not-a-token".into()),
            Who::Revoked => Some(revoked_secret.clone()),
            Who::Viewer => Some(viewer.clone()),
            Who::Operator => Some(operator.clone()),
            Who::Admin => admin.token().map(str::to_string),
        }
    };

    use Method as M;
    use Who::*;
    let vm = r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128}"#;
    let big = format!(
        r#"{{"name":"{}","image":"demo","vcpus":1,"memory_mib":128}}"#,
        "a".repeat(1024 * 1024 + 1000)
    );
    let uuid = "0b6f6f3e-1d7a-4a43-9a35-3f8c1c2b9d11";
    let cases = vec![
        // Authentication and roles.
        case(
            Nobody,
            M::GET,
            "/api/v1/vms",
            None,
            401,
            "unauthenticated",
            None,
        ),
        case(
            Garbage,
            M::GET,
            "/api/v1/vms",
            None,
            401,
            "unauthenticated",
            None,
        ),
        case(
            Revoked,
            M::GET,
            "/api/v1/vms",
            None,
            401,
            "unauthenticated",
            None,
        ),
        case(
            Nobody,
            M::GET,
            "/metrics",
            None,
            401,
            "unauthenticated",
            None,
        ),
        case(
            Nobody,
            M::GET,
            "/api/v1/openapi.json",
            None,
            401,
            "unauthenticated",
            None,
        ),
        case(
            Viewer,
            M::POST,
            "/api/v1/vms",
            Some(vm),
            403,
            "permission_denied",
            None,
        ),
        case(
            Viewer,
            M::DELETE,
            "/api/v1/vms/idle",
            None,
            403,
            "permission_denied",
            None,
        ),
        case(
            Viewer,
            M::POST,
            "/api/v1/vms/running/actions/stop",
            Some("{}"),
            403,
            "permission_denied",
            None,
        ),
        case(
            Viewer,
            M::POST,
            "/api/v1/tokens",
            Some(r#"{"name":"t"}"#),
            403,
            "permission_denied",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/users",
            Some(r#"{"username":"eve","password":"12345678","role":"admin"}"#),
            403,
            "permission_denied",
            None,
        ),
        case(
            Operator,
            M::GET,
            "/api/v1/users",
            None,
            403,
            "permission_denied",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/tokens",
            Some(r#"{"name":"t","role":"admin"}"#),
            403,
            "permission_denied",
            None,
        ),
        case(
            Nobody,
            M::POST,
            "/api/v1/auth/login",
            Some(r#"{"username":"admin","password":"wrong-password"}"#),
            401,
            "unauthenticated",
            None,
        ),
        case(
            Nobody,
            M::POST,
            "/api/v1/auth/login",
            Some(r#"{"username":"nobody","password":"wrong-password"}"#),
            401,
            "unauthenticated",
            None,
        ),
        case(
            Nobody,
            M::POST,
            "/api/v1/auth/login",
            Some(r#"{"username":"admin"}"#),
            400,
            "invalid_argument",
            Some("password"),
        ),
        // Creating VMs: missing fields, wrong types, out-of-range sizes, unknown references.
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"image":"demo","vcpus":1,"memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("name"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("vcpus"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":"one","memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("vcpus"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":-5}"#),
            400,
            "invalid_argument",
            Some("memory_mib"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":99999999999999999999999}"#),
            400,
            "invalid_argument",
            Some("memory_mib"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":1000000000000}"#),
            400,
            "invalid_argument",
            Some("memory_mib"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":0,"memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("vcpus"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":100000,"memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("vcpus"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"Bad Name","image":"demo","vcpus":1,"memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("name"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"nope","vcpus":1,"memory_mib":128}"#),
            400,
            "invalid_argument",
            Some("image"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(
                r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128,"disks":[{"size_mib":0}]}"#,
            ),
            400,
            "invalid_argument",
            Some("disks[0].size_mib"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(
                r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128,"disks":[{"size_mib":-1}]}"#,
            ),
            400,
            "invalid_argument",
            Some("disks[0].size_mib"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128,"gpu":true}"#),
            400,
            "invalid_argument",
            Some("gpu"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(
                r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128,"boot":{"kernel":"relative"}}"#,
            ),
            400,
            "invalid_argument",
            Some("boot.kernel"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"new","#),
            400,
            "invalid_argument",
            Some("body"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some("text:name=new"),
            400,
            "invalid_argument",
            Some("body"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(&big),
            413,
            "payload_too_large",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(r#"{"name":"idle","image":"demo","vcpus":1,"memory_mib":128}"#),
            409,
            "conflict",
            None,
        ),
        // Unknown IDs and names.
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/ghost",
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            &format!("/api/v1/vms/{uuid}"),
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Operator,
            M::DELETE,
            "/api/v1/vms/ghost",
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/ghost/actions/start",
            Some("{}"),
            404,
            "not_found",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/actions/fly",
            Some("{}"),
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/ghost/console",
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/operations/not-a-uuid",
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            &format!("/api/v1/operations/{uuid}"),
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            &format!("/api/v1/operations/{uuid}/wait?timeout=1"),
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/images/ghost",
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Operator,
            M::DELETE,
            &format!("/api/v1/tokens/{uuid}"),
            None,
            404,
            "not_found",
            None,
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/nothing-here",
            None,
            404,
            "not_found",
            None,
        ),
        // Conflicting state.
        case(
            Operator,
            M::POST,
            "/api/v1/vms/running/actions/start",
            Some("{}"),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/running/actions/resume",
            Some("{}"),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/actions/stop",
            Some("{}"),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/actions/pause",
            Some("{}"),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/actions/reboot",
            Some("{}"),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::DELETE,
            "/api/v1/vms/running",
            None,
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/running/snapshots",
            Some(r#"{"name":"s1"}"#),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::DELETE,
            "/api/v1/images/demo",
            None,
            409,
            "conflict",
            None,
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/users",
            Some(r#"{"username":"admin","password":"12345678","role":"admin"}"#),
            409,
            "conflict",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"x","source_path":"/etc/hostname"}"#),
            403,
            "permission_denied",
            None,
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms",
            Some(
                r#"{"name":"new","image":"demo","vcpus":1,"memory_mib":128,"boot":{"kernel":"/etc/shadow"}}"#,
            ),
            403,
            "permission_denied",
            None,
        ),
        // Rejections axum produces itself still use the JSON shape.
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/%FF",
            None,
            400,
            "invalid_argument",
            None,
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/idle/console/ws",
            None,
            426,
            "invalid_argument",
            Some("upgrade"),
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/no-such-vm/console/ws",
            None,
            404,
            "not_found",
            None,
        ),
        // Query parameters and other bodies.
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/idle/console?offset=abc",
            None,
            400,
            "invalid_argument",
            Some("offset"),
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/idle/console?offset=-1",
            None,
            400,
            "invalid_argument",
            Some("offset"),
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/vms/idle/console?tail=99999999999",
            None,
            400,
            "invalid_argument",
            Some("tail"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/snapshots",
            Some(r#"{"name":"Bad!"}"#),
            400,
            "invalid_argument",
            Some("name"),
        ),
        case(
            Operator,
            M::POST,
            "/api/v1/vms/idle/snapshots/none/restore",
            Some("{}"),
            404,
            "not_found",
            None,
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"x"}"#),
            400,
            "invalid_argument",
            Some("source_path"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"x","source_path":"relative.qcow2"}"#),
            400,
            "invalid_argument",
            Some("source_path"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"x","source_path":"/does/not/exist.qcow2"}"#),
            400,
            "invalid_argument",
            Some("source_path"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(&format!(r#"{{"name":"x","source_path":"{tmp}"}}"#)),
            400,
            "invalid_argument",
            Some("source_path"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"X Y","source_path":"/etc/hostname"}"#),
            400,
            "invalid_argument",
            Some("name"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"demo","source_path":"/etc/hostname"}"#),
            409,
            "conflict",
            None,
        ),
        case(
            Viewer,
            M::POST,
            "/api/v1/images",
            Some(r#"{"name":"x","source_path":"/etc/hostname"}"#),
            403,
            "permission_denied",
            None,
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/users",
            Some(r#"{"username":"eve","password":"short","role":"viewer"}"#),
            400,
            "invalid_argument",
            Some("password"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/users",
            Some(r#"{"username":"eve","password":"12345678","role":"god"}"#),
            400,
            "invalid_argument",
            Some("role"),
        ),
        case(
            Admin,
            M::POST,
            "/api/v1/tokens",
            Some(r#"{"name":"t","expires_in_days":0}"#),
            400,
            "invalid_argument",
            Some("expires_in_days"),
        ),
        case(
            Viewer,
            M::GET,
            "/api/v1/operations/x/wait?timeout=99999",
            None,
            400,
            "invalid_argument",
            Some("timeout"),
        ),
        case(
            Admin,
            M::PUT,
            "/api/v1/vms",
            Some("{}"),
            405,
            "invalid_argument",
            None,
        ),
    ];

    let before = snapshot(&admin).await;
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for c in &cases {
        let mut req = http.request(c.method.clone(), format!("{}{}", node.url, c.path));
        if let Some(t) = token_of(c.who) {
            req = req.bearer_auth(t);
        }
        if let Some(body) = &c.body {
            req = match body.strip_prefix("text:") {
                Some(text) => req
                    .header("content-type", "text/plain")
                    .body(text.to_string()),
                None => req
                    .header("content-type", "application/json")
                    .body(body.clone()),
            };
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let got_code = body["error"]["code"].as_str();
        let got_field = body["error"]["field"].as_str();
        let has_message = body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty());
        if status != c.status || got_code != Some(c.code) || got_field != c.field || !has_message {
            failures.push(format!(
                "{:?} {} {} ({:?}): want {} {} {:?}, got {status} {text}",
                c.who,
                c.method,
                c.path,
                c.body.as_deref().map(|b| &b[..b.len().min(60)]),
                c.status,
                c.code,
                c.field
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Give any stray operation a moment to land, then compare everything stored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        snapshot(&admin).await,
        before,
        "a rejected request changed stored state"
    );
    let ops: Vec<Value> = admin.list_all("/api/v1/operations").await.expect("ops");
    assert_eq!(ops.len(), 1, "only the one start operation exists: {ops:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_openapi_and_tokens() {
    let node = Node::start();
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{}/healthz", node.url))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");

    let admin = node.admin().await;
    // An operator API token works like a session with the operator role.
    let created: Value = admin
        .post(
            "/api/v1/tokens",
            &serde_json::json!({"name": "ci", "role": "operator", "expires_in_days": 30}),
        )
        .await
        .expect("token");
    let token = created["token"].as_str().expect("secret").to_string();
    assert!(token.starts_with("nct_"));
    let ci = Client::new(&node.url, Some(token.clone()));
    ci.create_vm(&demo_vm("from-token"))
        .await
        .expect("operator can create");
    let e = ci
        .get::<Value>("/api/v1/users")
        .await
        .expect_err("operator cannot list users");
    assert_eq!(e.status(), Some(403));
    let e = ci
        .post::<_, Value>("/api/v1/tokens", &serde_json::json!({"name": "child"}))
        .await
        .expect_err("a token cannot mint tokens");
    assert_eq!(e.status(), Some(403));
    let listed: Vec<Value> = admin.list_all("/api/v1/tokens").await.expect("list");
    assert!(
        listed
            .iter()
            .all(|t| t.get("secret_sha256").is_none() && t.get("token").is_none()),
        "no secrets listed"
    );

    let metrics = http
        .get(format!("{}/metrics", node.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "novacron_http_requests_total{",
        "novacron_http_request_duration_seconds_bucket{",
        "novacron_vms{state=\"stopped\"} 1",
        "novacron_qemu_start_seconds",
        "novacron_raft_term 1",
        "novacron_raft_last_log_index",
        "novacron_raft_applied_index",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    assert!(
        metrics.contains("route=\"/api/v1/vms\""),
        "routes are labelled by template"
    );

    let doc: Value = admin.get("/api/v1/openapi.json").await.expect("openapi");
    assert!(doc["paths"]["/api/v1/vms/{vm}/actions/{action}"]["post"].is_object());

    let nodes: Vec<Value> = admin.list_all("/api/v1/nodes").await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["accelerator"], "tcg");
    assert_eq!(nodes[0]["raft"]["role"], "leader");
}

fn random_value(g: &mut Lcg, depth: u32) -> Value {
    match g.next_u64() % if depth > 2 { 7 } else { 9 } {
        0 => Value::Null,
        1 => Value::Bool(g.next_u64().is_multiple_of(2)),
        2 => serde_json::json!(g.next_u64() as i64 - (1 << 30)),
        3 => serde_json::json!(*g.pick(&[u64::MAX, 0, 1, 1 << 53])),
        4 => serde_json::json!(*g.pick(&[-1.5e308, 0.5, 1e300, -0.0])),
        5 => Value::String(
            g.pick(&[
                "",
                "demo",
                "a-b",
                "💥",
                "../../etc/passwd",
                "\u{0}",
                "x,y=z",
            ])
            .to_string(),
        ),
        6 => Value::String("z".repeat((g.next_u64() % 5000) as usize)),
        7 => Value::Array(
            (0..g.next_u64() % 4)
                .map(|_| random_value(g, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "name",
                "image",
                "vcpus",
                "memory_mib",
                "disks",
                "boot",
                "size_mib",
                "kernel",
                "source_path",
                "format",
                "role",
                "password",
                "username",
                "expires_in_days",
            ];
            let mut m = serde_json::Map::new();
            for _ in 0..g.next_u64() % 6 {
                m.insert(g.pick(&keys).to_string(), random_value(g, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// Random bodies and path segments at every route: never a 5xx, always the JSON error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_never_produces_a_server_error() {
    let node = Node::start();
    let admin = node.admin().await;
    admin.create_vm(&demo_vm("target")).await.expect("create");
    let token = admin.token().expect("token").to_string();
    let http = reqwest::Client::new();
    let seed = std::env::var("NOVACRON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut g = Lcg::new(seed);
    let segments = [
        "target",
        "ghost",
        "%00",
        "..",
        "%F0%9F%92%A5",
        "a%2Fb",
        &"q".repeat(300),
        "0b6f6f3e-1d7a-4a43-9a35-3f8c1c2b9d11",
    ];
    let routes: &[(Method, &str)] = &[
        (Method::POST, "/api/v1/vms"),
        (Method::POST, "/api/v1/images"),
        (Method::POST, "/api/v1/users"),
        (Method::POST, "/api/v1/tokens"),
        (Method::POST, "/api/v1/auth/login"),
        (Method::GET, "/api/v1/vms/{}"),
        (Method::DELETE, "/api/v1/vms/{}"),
        (Method::POST, "/api/v1/vms/{}/actions/{}"),
        (Method::GET, "/api/v1/vms/{}/console?offset={}"),
        (Method::POST, "/api/v1/vms/{}/snapshots"),
        (Method::POST, "/api/v1/vms/{}/snapshots/{}/restore"),
        (Method::GET, "/api/v1/images/{}"),
        (Method::GET, "/api/v1/operations/{}/wait?timeout={}"),
    ];
    let mut bad = Vec::new();
    for _ in 0..400 {
        let (method, template) = g.pick(routes).clone();
        let mut path = template.to_string();
        while path.contains("{}") {
            let seg = g.pick(&segments).to_string();
            path = path.replacen("{}", &seg, 1);
        }
        let body = random_value(&mut g, 0).to_string();
        let resp = http
            .request(method.clone(), format!("{}{}", node.url, path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let shaped = (200..300).contains(&status)
            || serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"]["code"].is_string());
        if status >= 500 || !shaped {
            bad.push(format!(
                "{method} {path} {}: {status} {text}",
                &body[..body.len().min(120)]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "seed {seed}: {} bad answers:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // The VM is still there, unharmed (random deletes may have removed it only with a 2xx).
    let _ = admin.list_vms().await.expect("still serving");
}
