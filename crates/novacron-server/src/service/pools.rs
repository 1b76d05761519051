//! Storage pools: directories VM disks live in, recorded in the replicated state.
//!
//! Layout of a pool directory:
//! - shared pool (the same files on every host): `.novacron-pool` (a mark naming the pool, so
//!   a host can tell the directory it sees is that pool and not an empty mount point),
//!   `images/<image id>.<format>` (base images, copied in on first use, so any host can open a
//!   VM's backing chain), `vms/<vm id>/` (the disks);
//! - local pool (a directory of that path on each host): `host-<node>/vms/<vm id>/`. The host
//!   ID in the path keeps two hosts apart even if the "local" directory turns out to be shared.
//!
//! Invariants: a host reports (and placement offers) only the pools it can see; a pool holding
//! any VM's disks cannot be deleted (checked in `apply`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use novacron_state::CommandV1;
use novacron_types::{
    ApiError, CreatePoolRequest, ErrorCode, Image, StoragePool, Vm, now_millis, validate,
};
use serde::{Deserialize, Serialize};

use super::Service;
use crate::cluster::host;

const MARK: &str = ".novacron-pool";

#[derive(Serialize, Deserialize)]
struct Mark {
    pool: String,
}

/// The last answer of the pool probe (see `visible_pools`).
#[derive(Default)]
pub(crate) struct PoolProbe {
    cached: BTreeMap<String, u64>,
    in_flight: bool,
}

/// Where a VM's disks go when they are in a pool.
pub(crate) struct PoolPlace {
    pub shared: bool,
    /// The base image as seen from the pool (shared pools only).
    pub base_image: Option<PathBuf>,
}

/// Where a shared pool keeps its copy of an image (boot disks there overlay it).
pub(crate) fn pool_image(pool_root: &Path, image: &Image) -> PathBuf {
    pool_root
        .join("images")
        .join(format!("{}.{}", image.id, image.format.as_str()))
}

fn uuid_suffix() -> String {
    novacron_types::VmId::new_random().to_string()
}

fn read_mark(dir: &Path) -> Option<String> {
    let text = std::fs::read(dir.join(MARK)).ok()?;
    serde_json::from_slice::<Mark>(&text).ok().map(|m| m.pool)
}

/// A shared pool is usable when mounted (its mark there); a local one when its directory can
/// be made.
fn usable(p: &StoragePool) -> bool {
    let dir = Path::new(&p.path);
    if p.shared {
        read_mark(dir).as_deref() == Some(p.name.as_str())
    } else {
        std::fs::create_dir_all(dir).is_ok()
    }
}

impl Service {
    /// Pools by name, a page at a time.
    pub async fn list_pools(
        &self,
        page: &novacron_types::PageRequest,
    ) -> Result<novacron_types::Page<StoragePool>, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| {
                page.page(s.pools.values(), |p| p.name.clone())
                    .map(|p| p.map(|pool| pool.clone()))
            })
            .await?
    }

    pub async fn get_pool(&self, name: &str) -> Result<StoragePool, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| s.pools.get(name).cloned())
            .await?
            .ok_or_else(|| ApiError::not_found("pool", name))
    }

    /// Records a pool. A shared pool's directory must exist here (mounted); it gets the mark
    /// by which every host recognises it. A local pool's directory is made on each host.
    pub async fn create_pool(&self, req: CreatePoolRequest) -> Result<StoragePool, ApiError> {
        validate::create_pool(&req)?;
        let dir = PathBuf::from(&req.path);
        let mut marked = false;
        if req.shared {
            if !dir.is_dir() {
                return Err(ApiError::invalid(
                    "path",
                    format!(
                        "{} is not a directory on this host (host {}); mount the shared file \
                         system first",
                        req.path, self.inner.node
                    ),
                ));
            }
            match read_mark(&dir) {
                Some(other) if other != req.name => {
                    return Err(ApiError::conflict(format!(
                        "{} is already pool '{other}'",
                        req.path
                    ))
                    .with_reason("pool_path_in_use"));
                }
                Some(_) => {}
                None => {
                    let mark = serde_json::to_vec(&Mark {
                        pool: req.name.clone(),
                    })
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                    std::fs::write(dir.join(MARK), mark).map_err(|e| {
                        ApiError::invalid("path", format!("cannot write to {}: {e}", req.path))
                    })?;
                    marked = true;
                }
            }
        } else {
            std::fs::create_dir_all(&dir).map_err(|e| {
                ApiError::invalid("path", format!("cannot create {}: {e}", req.path))
            })?;
        }
        let pool = StoragePool {
            performance_class: req
                .performance_class
                .clone()
                .unwrap_or_else(|| req.tier.as_str().to_string()),
            name: req.name,
            path: req.path,
            tier: req.tier,
            shared: req.shared,
            capacity_bytes: req.capacity_bytes,
            cost_per_gib_month: req.cost_per_gib_month,
            created_at: now_millis(),
        };
        if let Err(e) = self
            .inner
            .state
            .propose(CommandV1::CreatePool { pool: pool.clone() })
            .await
        {
            if marked {
                let _ = std::fs::remove_file(dir.join(MARK));
            }
            return Err(e);
        }
        Ok(pool)
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), ApiError> {
        let pool = self.get_pool(name).await?;
        self.inner
            .state
            .propose(CommandV1::DeletePool {
                name: name.to_string(),
            })
            .await?;
        if pool.shared && read_mark(Path::new(&pool.path)).as_deref() == Some(name) {
            let _ = std::fs::remove_file(Path::new(&pool.path).join(MARK));
        }
        Ok(())
    }

    /// Free bytes of every pool this host can use, with `data` for its own data directory
    /// (reported with each heartbeat; placement offers only pools a host sees). Returns the
    /// last probe's answer and starts a new probe in a blocking thread, at most one at a time:
    /// a hung mount must not hold up the lease keeper that calls this.
    pub(crate) fn visible_pools(&self) -> BTreeMap<String, u64> {
        let mut probe = self
            .inner
            .pool_probe
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !probe.in_flight {
            probe.in_flight = true;
            let svc = self.clone();
            tokio::task::spawn_blocking(move || {
                let found = svc.probe_pools();
                let mut probe = svc
                    .inner
                    .pool_probe
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                probe.cached = found;
                probe.in_flight = false;
            });
        }
        probe.cached.clone()
    }

    fn probe_pools(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(free) = host::free_bytes(self.data_dir()) {
            out.insert("data".to_string(), free);
        }
        let pools: Vec<StoragePool> = self
            .inner
            .state
            .read(|s| s.pools.values().cloned().collect());
        for p in pools {
            if usable(&p)
                && let Some(free) = host::free_bytes(Path::new(&p.path))
            {
                out.insert(p.name, free);
            }
        }
        out
    }

    /// Whether this host can use pool `name` now (checked on the spot, for file work).
    pub(crate) fn pool_usable_here(&self, name: &str) -> bool {
        self.inner
            .state
            .read(|s| s.pools.get(name).cloned())
            .is_some_and(|p| usable(&p))
    }

    /// A VM's shared pool must be mounted here (its mark in place) before files are made,
    /// linked or deleted there: an unmounted mount point is an empty local directory.
    pub(crate) fn require_pool_here(&self, vm: &Vm) -> Result<(), ApiError> {
        let Some(name) = &vm.spec.pool else {
            return Ok(());
        };
        let pool = self
            .inner
            .state
            .read(|s| s.pools.get(name).cloned())
            .ok_or_else(|| ApiError::not_found("pool", name))?;
        if pool.shared && read_mark(Path::new(&pool.path)).as_deref() != Some(name.as_str()) {
            return Err(ApiError::conflict(format!(
                "pool '{name}' is not mounted on host {} ({} has no pool mark)",
                self.inner.node, pool.path
            ))
            .with_reason("pool_unavailable"));
        }
        Ok(())
    }

    /// Where `vm`'s boot disk lives on this host, when it is in a pool (its `spec.pool`).
    pub(crate) fn pool_place(&self, vm: &Vm, image: &Image) -> Result<Option<PoolPlace>, ApiError> {
        let Some(name) = &vm.spec.pool else {
            return Ok(None);
        };
        let (_, shared, root) = self.vm_disk_dir(vm.id, name)?;
        Ok(Some(PoolPlace {
            shared,
            base_image: shared.then(|| pool_image(&root, image)),
        }))
    }

    /// The directory of `vm`'s disks in pool `name` on this host, whether the pool is shared,
    /// and the pool's own directory.
    pub(crate) fn vm_disk_dir(
        &self,
        vm: novacron_types::VmId,
        name: &str,
    ) -> Result<(PathBuf, bool, PathBuf), ApiError> {
        let pool = self
            .inner
            .state
            .read(|s| s.pools.get(name).cloned())
            .ok_or_else(|| ApiError::not_found("pool", name))?;
        let root = PathBuf::from(&pool.path);
        let dir = if pool.shared {
            root.join("vms").join(vm.to_string())
        } else {
            root.join(format!("host-{}", self.inner.node))
                .join("vms")
                .join(vm.to_string())
        };
        Ok((dir, pool.shared, root))
    }

    /// Copies the image into a shared pool unless it is there already (written under a
    /// temporary name and renamed, so a host never opens half an image).
    pub(crate) async fn ensure_pool_image(
        &self,
        image: &Image,
        into: &Path,
    ) -> Result<(), ApiError> {
        if into.exists() {
            return Ok(());
        }
        let src = PathBuf::from(&image.path);
        let dest = into.to_path_buf();
        let node = self.inner.node;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let into = dest;
            if let Some(dir) = into.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // Unique per host and attempt: two hosts may copy the same image at once.
            let tmp = into.with_extension(format!("part-{}-{}", node, uuid_suffix()));
            std::fs::copy(&src, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &into)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "copying image '{}' into the pool ({}): {e}",
                    image.name,
                    into.display()
                ),
            )
        })
    }
}
