//! `identity.json` in the data dir: which host this is and the secret it shares with the rest
//! of its cluster. Written once (bootstrap or join), read at every start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use novacron_types::HostRole;

const FILE: &str = "identity.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub node_id: u64,
    pub role: HostRole,
    /// Authenticates hosts to each other; never leaves the cluster's hosts.
    pub cluster_secret: String,
    /// Joined an existing cluster (its Raft state arrives from the leader) rather than
    /// bootstrapping one.
    #[serde(default)]
    pub joined: bool,
}

impl Identity {
    pub fn new(node_id: u64, role: HostRole, cluster_secret: String) -> Self {
        Self {
            format: FORMAT,
            node_id,
            role,
            cluster_secret,
            joined: false,
        }
    }

    pub fn joined(node_id: u64, role: HostRole, cluster_secret: String) -> Self {
        Self {
            joined: true,
            ..Self::new(node_id, role, cluster_secret)
        }
    }

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// `Ok(None)` when the data dir has no identity yet.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let id: Identity =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if id.format > FORMAT {
            return Err(format!(
                "{} has format {}, newer than this binary knows",
                path.display(),
                id.format
            ));
        }
        Ok(Some(id))
    }

    /// Writes the file (mode 0600) through a temporary file and a rename.
    /// Writes the identity durably (temporary file, sync, rename, directory sync), readable by
    /// this user only: a crash leaves the old identity or the new one, never half of one.
    pub fn save(&self, data_dir: &Path) -> Result<(), String> {
        let path = Self::path(data_dir);
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        novacron_hypervisor::durable::write(&path, text.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// A fresh random secret (256 bits, hex).
pub fn new_secret() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Identity::load(dir.path()), Ok(None));
        let id = Identity::new(3, HostRole::Witness, new_secret());
        id.save(dir.path()).expect("save");
        assert_eq!(Identity::load(dir.path()), Ok(Some(id)));
        let mode = std::fs::metadata(Identity::path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
