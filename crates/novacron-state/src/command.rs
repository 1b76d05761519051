//! Raft commands: every change to desired state is one of these, versioned.
//!
//! A command carries everything `apply` needs, including timestamps and generated IDs, so that
//! applying it is deterministic on every replica. New variants may be added; existing ones are
//! never changed in place: a changed shape gets a new variant (or a new `Command` version).

use serde::{Deserialize, Serialize};

use novacron_types::{
    ApiError, ApiToken, Image, ImageId, JoinToken, MigrationProgress, NodeId, NodeInfo, Operation,
    OperationId, OperationStatus, PowerState, StoragePool, TieringPolicy, TokenId, UnixMillis,
    User, UserId, Vm, VmId, VmSnapshot, VmState, Volume, VolumeFormat, VolumeId, VolumeSnapshot,
};

/// The envelope replicated through Raft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "version")]
pub enum Command {
    #[serde(rename = "1")]
    V1(CommandV1),
}

impl From<CommandV1> for Command {
    fn from(c: CommandV1) -> Self {
        Command::V1(c)
    }
}

/// Version 1 of the command set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandV1 {
    /// Sets cluster-wide secrets once, at bootstrap. A second call is rejected.
    InitCluster {
        jwt_secret: String,
        at: UnixMillis,
    },
    /// Adds or updates a host's record (inventory at start-up). Rejected for removed hosts.
    RegisterNode {
        node: NodeInfo,
    },
    CreateJoinToken {
        token: JoinToken,
    },
    /// A new host presents a join token: the token is used up and the host gets `node.id`.
    /// Rejected when the token is unknown, used, expired at `at`, or its secret does not match,
    /// or when the ID was ever used.
    JoinNode {
        token_id: String,
        secret_sha256: String,
        node: NodeInfo,
        at: UnixMillis,
    },
    /// Removes a host for good (its ID is never reused). Rejected while it owns VMs unless
    /// `force`, which marks them `unknown` (a dead host's VMs cannot be asked).
    RemoveNode {
        id: NodeId,
        force: bool,
        at: UnixMillis,
    },

    CreateVm {
        vm: Vm,
    },
    DeleteVm {
        id: VmId,
    },
    /// Puts a host in or out of maintenance (no new VMs are placed there while in).
    SetNodeMaintenance {
        node: NodeId,
        maintenance: bool,
    },
    /// A migration of the VM to `to` begins: its resources are held there too. Rejected if
    /// the VM is not on `from`, already migrating, or does not fit on `to`.
    BeginMigration {
        id: VmId,
        from: NodeId,
        to: NodeId,
    },
    /// A migration ended without moving the VM: the hold on the target goes.
    EndMigration {
        id: VmId,
    },
    /// A live migration finished: the VM now belongs to `to`. Rejected unless it belongs to
    /// `from` (so a stale or repeated switch changes nothing) and fits on `to`.
    MoveVm {
        id: VmId,
        from: NodeId,
        to: NodeId,
        at: UnixMillis,
    },
    /// Turns HA on or off for a VM. Rejected (on) unless its disks are on a shared pool.
    SetVmHa {
        id: VmId,
        ha: bool,
        at: UnixMillis,
    },
    /// HA: host `from` was lost (its lease ran out, plus the margin); the VM now belongs to `to`,
    /// which starts it. Rejected unless the VM is on `from`, marked HA, on a shared pool, and
    /// fits on `to`.
    RecoverVm {
        id: VmId,
        from: NodeId,
        to: NodeId,
        /// The VM record's `updated_at` when the leader decided: any change since (the lost
        /// host came back and recorded a start) rejects the move.
        seen: UnixMillis,
        at: UnixMillis,
    },
    CreatePool {
        pool: StoragePool,
    },
    /// Rejected while any VM's disks are on the pool.
    DeletePool {
        name: String,
    },
    SetVmDesired {
        id: VmId,
        desired: PowerState,
        at: UnixMillis,
    },
    /// What the owning host observed from QEMU.
    RecordVmObserved {
        id: VmId,
        state: VmState,
        reason: Option<String>,
        at: UnixMillis,
    },
    /// What host `node` observed from QEMU about one of its VMs. Rejected when the VM is no
    /// longer that host's (it moved meanwhile), so a late report cannot overwrite the new
    /// host's.
    RecordVmObservedOn {
        node: NodeId,
        id: VmId,
        state: VmState,
        reason: Option<String>,
        at: UnixMillis,
    },
    /// Sets (`Some`) or removes (`None`) labels. Rejected if the VM would have more than
    /// [`novacron_types::validate::MAX_LABELS`].
    SetVmLabels {
        id: VmId,
        changes: std::collections::BTreeMap<String, Option<String>>,
        at: UnixMillis,
    },
    AddVmSnapshot {
        id: VmId,
        snapshot: VmSnapshot,
    },
    RemoveVmSnapshot {
        id: VmId,
        name: String,
        at: UnixMillis,
    },

    CreateImage {
        image: Image,
    },
    DeleteImage {
        id: ImageId,
    },

    CreateUser {
        user: User,
    },
    CreateToken {
        token: ApiToken,
    },
    RevokeToken {
        id: TokenId,
    },

    CreateOperation {
        op: Operation,
    },
    UpdateOperation {
        id: OperationId,
        status: OperationStatus,
        progress: u8,
        message: String,
        error: Option<ApiError>,
        at: UnixMillis,
    },
    /// A running migration's figures (with the operation's progress and step).
    SetMigrationProgress {
        id: OperationId,
        progress: u8,
        message: String,
        migration: MigrationProgress,
        at: UnixMillis,
    },
    /// Drops finished operations older than `before`, to bound the state.
    PruneOperations {
        before: UnixMillis,
    },
    /// Drops finished operations older than `before`, then the oldest finished ones beyond
    /// `keep_at_most`: the state stays bounded by count as well as by age.
    PruneOperationsKeeping {
        before: UnixMillis,
        keep_at_most: u64,
    },

    /// A standalone volume (a VM's own disks are recorded with `CreateVm`). Rules in
    /// `volumes.rs`.
    CreateVolume {
        volume: Volume,
    },
    /// Rejected while attached or moving.
    DeleteVolume {
        id: VolumeId,
    },
    AttachVolume {
        id: VolumeId,
        vm: VmId,
        at: UnixMillis,
    },
    DetachVolume {
        id: VolumeId,
        at: UnixMillis,
    },
    /// Rejected unless it grows.
    ResizeVolume {
        id: VolumeId,
        size_mib: u64,
        at: UnixMillis,
    },
    AddVolumeSnapshot {
        id: VolumeId,
        snapshot: VolumeSnapshot,
    },
    RemoveVolumeSnapshot {
        id: VolumeId,
        name: String,
        at: UnixMillis,
    },
    /// A move to pool `to` begins (one at a time per volume).
    BeginVolumeMove {
        id: VolumeId,
        to: String,
        at: UnixMillis,
    },
    /// The move ended. `moved`: it is now on the target pool (held by `node` when that pool is
    /// local) as `format`; `None`: it failed and the volume stays where it was.
    EndVolumeMove {
        id: VolumeId,
        moved: Option<MovedVolume>,
        at: UnixMillis,
    },
    SetTieringPolicy {
        policy: TieringPolicy,
    },
    /// Records the missing volumes of a VM's own disks (a VM created before its disks were
    /// volumes). Does nothing when all are there.
    AddVmDiskVolumes {
        vm: VmId,
    },
}

/// Where a volume ended up after a move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedVolume {
    pub node: Option<NodeId>,
    pub format: VolumeFormat,
    pub compressed: bool,
}

/// The result of applying one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// `None` when applied; the reason it was rejected otherwise. A rejected command changes nothing.
    pub error: Option<ApiError>,
}

impl CommandResponse {
    pub fn ok() -> Self {
        Self { error: None }
    }
    pub fn rejected(e: ApiError) -> Self {
        Self { error: Some(e) }
    }
    pub fn into_result(self) -> Result<(), ApiError> {
        match self.error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Which stored entity a command touched, so the store persists exactly those rows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Touched {
    Meta,
    Node(u64),
    Vm(VmId),
    Image(ImageId),
    User(UserId),
    Token(TokenId),
    Operation(OperationId),
    Pool(String),
    Volume(VolumeId),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Log lines name the command, not its (possibly secret-bearing) payload.
        match self {
            Command::V1(c) => {
                let name = serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                write!(f, "v1/{name}")
            }
        }
    }
}
