//! The OpenAPI document, generated from the handlers' and types' annotations. A copy is checked in
//! at `docs/openapi.json`; a test fails when the two differ (run with `NOVACRON_BLESS=1` to update).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::handlers;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "NovaCron API", version = "1", description = "Manage virtual machines on a NovaCron cluster."),
    modifiers(&BearerAuth),
    components(schemas(handlers::Consistency)),
    paths(
        handlers::healthz, handlers::readyz, handlers::metrics, handlers::openapi_json, handlers::list_nodes,
        handlers::login, handlers::list_users, handlers::create_user,
        handlers::list_tokens, handlers::create_token, handlers::revoke_token,
        handlers::list_vms, handlers::create_vm, handlers::get_vm, handlers::update_vm, handlers::delete_vm,
        handlers::vm_action, handlers::migrate_vm, handlers::place, handlers::vm_console,
        handlers::vm_console_ws, handlers::vm_disk_stats,
        handlers::list_snapshots, handlers::create_snapshot, handlers::restore_snapshot,
        handlers::delete_snapshot,
        handlers::list_images, handlers::get_image, handlers::import_image, handlers::delete_image,
        handlers::list_pools, handlers::get_pool, handlers::create_pool, handlers::delete_pool,
        handlers::list_volumes, handlers::get_volume, handlers::create_volume, handlers::delete_volume,
        handlers::attach_volume, handlers::detach_volume, handlers::resize_volume,
        handlers::snapshot_volume, handlers::delete_volume_snapshot,
        handlers::restore_volume_snapshot, handlers::move_volume, handlers::get_tiering_policy,
        handlers::set_tiering_policy, handlers::tiering_plan,
        handlers::list_operations, handlers::get_operation, handlers::cancel_operation,
        handlers::wait_operation,
        handlers::cluster_status, handlers::create_join_token, handlers::join_cluster,
        handlers::remove_member, handlers::transfer_leader, handlers::evacuate_node,
        handlers::restore_node,
    ),
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn checked_in_openapi_document_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = super::document();
        if std::env::var_os("NOVACRON_BLESS").is_some() {
            std::fs::write(&path, &generated).expect("write docs/openapi.json");
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is out of date: run `NOVACRON_BLESS=1 cargo test -p novacron-server openapi`"
        );
    }
}
