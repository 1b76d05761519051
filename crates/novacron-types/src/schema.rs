//! OpenAPI schemas the derive cannot express: maps whose keys follow a pattern. They state the
//! same rules as [`crate::validate`], so generated clients and fuzzers agree with the server.

use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
use utoipa::openapi::{Object, Schema};

/// A label key: 1 to 63 of `a-z 0-9 . _ / -`, starting with a letter or digit.
const LABEL_KEY: &str = r"^[a-z0-9][a-z0-9._/-]{0,62}$";

fn label_value() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(255))
        .build()
}

fn label_map(value: Object, description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(LABEL_KEY))
                .build(),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(value.into())))
        .max_properties(Some(crate::validate::MAX_LABELS))
        .description(Some(description))
        .build()
}

/// Labels (`key: value`).
pub fn labels() -> Schema {
    Schema::Object(label_map(
        label_value(),
        "Labels: keys are 1 to 63 of a-z, 0-9, '.', '_', '/', '-' (starting with a letter or \
         digit); values at most 255 bytes; at most 64 labels.",
    ))
}

/// Changes to labels (`key: value` sets, `key: null` removes).
pub fn label_changes() -> Schema {
    let value = ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::String,
            Type::Null,
        ]))
        .max_length(Some(255))
        .build();
    Schema::Object(label_map(
        value,
        "A merge patch of labels: a string sets a label, null removes it. Keys as for labels.",
    ))
}
