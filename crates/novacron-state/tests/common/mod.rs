//! Helpers shared by this crate's integration tests.

#![allow(dead_code)]

use novacron_types::{Image, ImageFormat, ImageId, NodeId};

/// A cheap command payload: an image record with a unique name.
pub fn image(name: &str) -> Image {
    Image {
        id: ImageId::new_random(),
        name: name.into(),
        description: String::new(),
        format: ImageFormat::Qcow2,
        path: "/images/x.qcow2".into(),
        virtual_size: 1 << 20,
        boot: None,
        node: NodeId(1),
        created_at: 1,
    }
}
