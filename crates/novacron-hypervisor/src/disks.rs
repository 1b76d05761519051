//! Disk files through `qemu-img`: overlays, blank disks, internal snapshots, image inspection.

use std::path::Path;

use novacron_types::{ImageFormat, VolumeFormat};
use serde::Deserialize;
use tokio::process::Command;

use crate::HvError;

async fn qemu_img(action: &'static str, args: &[&str]) -> Result<String, HvError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| HvError::Disk {
            action,
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(HvError::Disk {
            action,
            message: stderr.trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn p(path: &Path) -> Result<&str, HvError> {
    path.to_str().ok_or_else(|| HvError::Disk {
        action: "path",
        message: format!("path {} is not UTF-8", path.display()),
    })
}

/// A qcow2 overlay whose backing file is `base` (never written to).
pub async fn create_overlay(
    base: &Path,
    format: ImageFormat,
    overlay: &Path,
) -> Result<(), HvError> {
    create_overlay_sized(base, format, overlay, None).await
}

/// [`create_overlay`], `size_bytes` large (`None`: the size of `base`).
pub async fn create_overlay_sized(
    base: &Path,
    format: ImageFormat,
    overlay: &Path,
    size_bytes: Option<u64>,
) -> Result<(), HvError> {
    let size = size_bytes.map(|s| s.to_string());
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(base)?,
        "-F",
        format.as_str(),
        p(overlay)?,
    ];
    args.extend(size.as_deref());
    qemu_img("create overlay", &args).await.map(drop)
}

pub async fn create_blank(path: &Path, size_mib: u64) -> Result<(), HvError> {
    let size = format!("{size_mib}M");
    qemu_img(
        "create disk",
        &["create", "-q", "-f", "qcow2", p(path)?, &size],
    )
    .await
    .map(drop)
}

/// A blank volume file of `size_bytes` in `format`.
pub async fn create_volume(
    path: &Path,
    format: VolumeFormat,
    size_bytes: u64,
) -> Result<(), HvError> {
    let size = size_bytes.to_string();
    qemu_img(
        "create volume",
        &["create", "-q", "-f", format.as_str(), p(path)?, &size],
    )
    .await
    .map(drop)
}

/// A copy's target file: an empty overlay of `backing` (a boot disk's copy, which takes only
/// the disk's own layer) or a blank volume, `size_bytes` large.
pub async fn create_copy_target(
    path: &Path,
    format: VolumeFormat,
    backing: Option<&crate::Backing>,
    size_bytes: u64,
) -> Result<(), HvError> {
    match backing {
        Some(b) => create_overlay_sized(&b.path, b.format, path, Some(size_bytes)).await,
        None => create_volume(path, format, size_bytes).await,
    }
}

/// Grows a volume file that no QEMU has open.
pub async fn resize(path: &Path, format: VolumeFormat, size_bytes: u64) -> Result<(), HvError> {
    let size = size_bytes.to_string();
    qemu_img(
        "resize",
        &["resize", "-q", "-f", format.as_str(), p(path)?, &size],
    )
    .await
    .map(drop)
}

/// Copies a volume file no QEMU has open into `dest` as `to`, at most `rate` bytes a second
/// (`qemu-img convert -r`), compressed (`-c`, qcow2 only) when asked. `dest` is written under
/// its own name: the caller renames or removes it.
pub async fn copy_volume(
    src: &Path,
    from: VolumeFormat,
    dest: &Path,
    to: VolumeFormat,
    compress: bool,
    rate: u64,
) -> Result<(), HvError> {
    let rate = rate.max(1).to_string();
    let mut args = vec![
        "convert",
        "-q",
        "-f",
        from.as_str(),
        "-O",
        to.as_str(),
        "-r",
        &rate,
    ];
    if compress {
        args.push("-c");
    }
    args.extend([p(src)?, p(dest)?]);
    qemu_img("convert", &args).await.map(drop)
}

pub async fn snapshot_create(disk: &Path, name: &str) -> Result<(), HvError> {
    qemu_img("snapshot create", &["snapshot", "-c", name, p(disk)?])
        .await
        .map(drop)
}

pub async fn snapshot_apply(disk: &Path, name: &str) -> Result<(), HvError> {
    qemu_img("snapshot restore", &["snapshot", "-a", name, p(disk)?])
        .await
        .map(drop)
}

pub async fn snapshot_delete(disk: &Path, name: &str) -> Result<(), HvError> {
    qemu_img("snapshot delete", &["snapshot", "-d", name, p(disk)?])
        .await
        .map(drop)
}

/// What `qemu-img info` says about a file.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

pub async fn info(path: &Path) -> Result<ImageInfo, HvError> {
    let out = qemu_img("info", &["info", "--output=json", p(path)?]).await?;
    serde_json::from_str(&out).map_err(|e| HvError::Disk {
        action: "info",
        message: format!("unreadable output: {e}"),
    })
}

/// Copies an image file into `dest` in its own format (no backing chain left behind).
pub async fn import(src: &Path, format: ImageFormat, dest: &Path) -> Result<(), HvError> {
    // Copied under a temporary name and renamed into place once synced: a crash leaves either
    // the whole image or a `.part` file (removed at start), never a truncated image.
    let f = format.as_str();
    let part = crate::durable::partial_name(dest);
    let copied = qemu_img(
        "convert",
        &["convert", "-q", "-f", f, "-O", f, p(src)?, p(&part)?],
    )
    .await
    .map(drop)
    .and_then(|()| crate::durable::rename(&part, dest).map_err(HvError::from));
    if copied.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    copied
}
