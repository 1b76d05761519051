//! Images: importing a local qcow2 or raw file, registering the demo image, listing, deleting.

use std::path::{Path, PathBuf};

use novacron_hypervisor::{disks, durable};
use novacron_state::CommandV1;
use novacron_types::{
    ApiError, Image, ImageFormat, ImageId, ImportImageRequest, KernelBoot, Operation, now_millis,
    validate,
};
use serde::Deserialize;

use super::{Service, hv_error};
use crate::auth::Principal;

/// `image.json` written by `scripts/build-demo-image.sh`.
#[derive(Deserialize)]
struct DemoManifest {
    name: String,
    description: String,
    disk: String,
    kernel: String,
    initrd: String,
    cmdline: String,
}

impl Service {
    /// Images by name, a page at a time.
    pub async fn list_images(
        &self,
        page: &novacron_types::PageRequest,
    ) -> Result<novacron_types::Page<Image>, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| {
                let mut images: Vec<&Image> = s.images.values().collect();
                images.sort_by(|a, b| a.name.cmp(&b.name));
                page.page(images, |i| i.name.clone())
                    .map(|p| p.map(|i| i.clone()))
            })
            .await?
    }

    pub async fn get_image(&self, key: &str) -> Result<Image, ApiError> {
        self.inner.state.read_linearizable(|_| ()).await?;
        self.inner
            .state
            .read(|s| match key.parse::<ImageId>() {
                Ok(id) => s.images.get(&id).cloned(),
                Err(_) => s.image_by_name(key).cloned(),
            })
            .ok_or_else(|| ApiError::not_found("image", key))
    }

    /// Checks the request, then copies the file into the image store in an operation.
    pub async fn import_image(
        &self,
        req: ImportImageRequest,
        who: &Principal,
    ) -> Result<Operation, ApiError> {
        validate::name("name", &req.name)?;
        if let Some(boot) = &req.boot {
            validate::kernel_boot("boot", boot)?;
        }
        let src = PathBuf::from(&req.source_path);
        if !src.is_absolute() {
            return Err(ApiError::invalid(
                "source_path",
                "source_path must be an absolute path on the host",
            ));
        }
        match std::fs::metadata(&src) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(ApiError::invalid(
                    "source_path",
                    format!("{} is not a file", src.display()),
                ));
            }
            Err(e) => {
                return Err(ApiError::invalid(
                    "source_path",
                    format!("cannot read {}: {e}", src.display()),
                ));
            }
        }
        if self
            .inner
            .state
            .read(|s| s.image_by_name(&req.name).is_some())
        {
            return Err(ApiError::conflict(format!(
                "an image named '{}' already exists",
                req.name
            )));
        }
        let info = disks::info(&src).await.map_err(|e| {
            ApiError::invalid(
                "source_path",
                format!(
                    "{} is not a disk image qemu-img can read: {e}",
                    src.display()
                ),
            )
        })?;
        let detected = match info.format.as_str() {
            "qcow2" => ImageFormat::Qcow2,
            "raw" => ImageFormat::Raw,
            other => {
                return Err(ApiError::invalid(
                    "source_path",
                    format!(
                        "{} is in format '{other}'; only qcow2 and raw can be imported",
                        src.display()
                    ),
                ));
            }
        };
        if info.backing_filename.is_some() {
            return Err(ApiError::invalid(
                "source_path",
                "the image has a backing file; import a standalone image (qemu-img convert it first)",
            ));
        }
        if let Some(f) = req.format
            && f != detected
        {
            return Err(ApiError::invalid(
                "format",
                format!(
                    "format is '{}' but the file is '{}'",
                    f.as_str(),
                    detected.as_str()
                ),
            ));
        }
        let id = ImageId::new_random();
        let dest = self
            .inner
            .images_dir
            .join(format!("{id}.{}", detected.as_str()));
        let image = Image {
            id,
            name: req.name.clone(),
            description: req.description.unwrap_or_default(),
            format: detected,
            path: dest.display().to_string(),
            virtual_size: info.virtual_size,
            boot: req.boot,
            node: self.inner.node,
            created_at: now_millis(),
        };
        let svc = self.clone();
        let resources = vec![format!("/api/v1/images/{id}")];
        self.spawn_operation(
            "image.import",
            resources,
            who,
            vec![],
            move |ctx| async move {
                ctx.progress(5, format!("copying {}", src.display())).await;
                std::fs::create_dir_all(&svc.inner.images_dir)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                disks::import(&src, detected, &dest)
                    .await
                    .map_err(hv_error)?;
                if let Err(e) = svc
                    .inner
                    .state
                    .propose(CommandV1::CreateImage { image })
                    .await
                {
                    // Unless the record's fate is unknown (a timeout): it may still apply,
                    // and must then find its file.
                    if e.code != novacron_types::ErrorCode::Timeout {
                        let _ = std::fs::remove_file(&dest);
                    }
                    return Err(e);
                }
                Ok(())
            },
        )
        .await
    }

    pub async fn delete_image(&self, key: &str, _who: &Principal) -> Result<(), ApiError> {
        let image = self.get_image(key).await?;
        self.inner
            .state
            .propose(CommandV1::DeleteImage { id: image.id })
            .await?;
        // Only files inside the image store are ours to remove.
        if Path::new(&image.path).starts_with(&self.inner.images_dir) {
            let _ = std::fs::remove_file(&image.path);
        }
        Ok(())
    }

    /// Registers the demo image from a directory built by `scripts/build-demo-image.sh`, copying
    /// its files into the image store. Does nothing if an image of that name exists.
    pub async fn register_demo_image(&self, dir: &Path) -> Result<(), ApiError> {
        let manifest_path = dir.join("image.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| ApiError::internal(format!("reading {}: {e}", manifest_path.display())))?;
        let m: DemoManifest = serde_json::from_str(&text)
            .map_err(|e| ApiError::internal(format!("{}: {e}", manifest_path.display())))?;
        if self
            .inner
            .state
            .read(|s| s.image_by_name(&m.name).is_some())
        {
            return Ok(());
        }
        let id = ImageId::new_random();
        let store = self.inner.images_dir.join(id.to_string());
        // Copied into a temporary directory, synced, then renamed into place: a crash leaves a
        // `.part` directory (removed at start), never a recorded image with truncated files.
        let part = durable::partial_name(&store);
        let copy = || -> std::io::Result<()> {
            std::fs::create_dir_all(&part)?;
            for f in [&m.disk, &m.kernel, &m.initrd] {
                std::fs::copy(dir.join(f), part.join(f))?;
                durable::sync_file(&part.join(f))?;
            }
            durable::sync_dir(&part)?;
            durable::rename(&part, &store)
        };
        if let Err(e) = copy() {
            let _ = std::fs::remove_dir_all(&part);
            return Err(ApiError::internal(format!(
                "copying the demo image into {}: {e}",
                self.inner.images_dir.display()
            )));
        }
        let disk = store.join(&m.disk);
        let info = disks::info(&disk).await.map_err(hv_error)?;
        let image = Image {
            id,
            name: m.name.clone(),
            description: m.description,
            format: ImageFormat::Qcow2,
            path: disk.display().to_string(),
            virtual_size: info.virtual_size,
            boot: Some(KernelBoot {
                kernel: store.join(&m.kernel).display().to_string(),
                initrd: Some(store.join(&m.initrd).display().to_string()),
                cmdline: Some(m.cmdline),
            }),
            node: self.inner.node,
            created_at: now_millis(),
        };
        self.inner
            .state
            .propose(CommandV1::CreateImage { image })
            .await?;
        tracing::info!(image = %m.name, "registered the demo image");
        Ok(())
    }
}
