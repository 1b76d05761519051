//! Typed identifiers. A `VmId` can never be passed where an `ImageId` is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random ID.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A virtual machine.
    VmId
);
uuid_id!(
    /// A registered disk image.
    ImageId
);
uuid_id!(
    /// A user account.
    UserId
);
uuid_id!(
    /// A long-lived API token.
    TokenId
);
uuid_id!(
    /// A long-running operation (start, stop, ...).
    OperationId
);
uuid_id!(
    /// A storage volume (a VM's own disks are volumes too).
    VolumeId
);

impl VolumeId {
    /// The volume of VM `vm`'s own disk `disk` (`root`, `disk1`, ...): derived, so every
    /// replica names it the same without an ID in the command.
    pub fn of_vm_disk(vm: VmId, disk: &str) -> Self {
        Self(Uuid::new_v5(&vm.0, disk.as_bytes()))
    }

    /// A short form for QEMU node names (at most 31 characters).
    pub fn short(&self) -> String {
        self.0.simple().to_string()[..12].to_string()
    }
}

/// A cluster member. Raft needs a small integer; it is still its own type.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings_and_json() {
        let id = VmId::new_random();
        let parsed: VmId = id.to_string().parse().expect("parse");
        assert_eq!(parsed, id);
        let json = serde_json::to_string(&id).expect("json");
        assert_eq!(json, format!("\"{id}\""));
        assert!("not-a-uuid".parse::<VmId>().is_err());
    }
}
