//! Files that must survive a power loss in a known state: written under a temporary name,
//! synced, renamed into place, and the directory synced, so that after a crash the final name
//! holds either nothing or the whole file, never a truncated one.
//!
//! The order matters: the data is synced before the rename (or the rename may reach the disk
//! first and name a file whose blocks never did), and the directory after it (or the rename
//! itself may be lost). A caller records the file in the replicated state only after
//! [`rename`] returns.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name beside `dest` (`.NAME.part`): hidden, and never a name NovaCron gives a
/// finished file, so leftovers of a crash can be recognised ([`is_partial`]) and removed.
pub fn partial_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// Whether `path` is a temporary file of [`partial_name`]'s making.
pub fn is_partial(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.ends_with(".part"))
}

/// Flushes a file's data and metadata to the disk.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Flushes a directory's entries (names created, renamed or removed in it) to the disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs `from`, renames it to `to` and syncs the directories involved.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    sync_file(from)?;
    std::fs::rename(from, to)?;
    sync_dir(parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(parent(from))?;
    }
    Ok(())
}

/// Writes `bytes` to `dest` durably (temporary name, sync, rename, directory sync), with `mode`
/// for a new file.
pub fn write(dest: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = partial_name(dest);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    let renamed = rename(&tmp, dest);
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// Removes the temporary files and directories a crash left in `dir` (not looking into other
/// subdirectories). Returns what it removed.
pub fn remove_partials(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !is_partial(&path) {
            continue;
        }
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_lands_whole_under_its_name_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("identity.json");
        write(&dest, b"{\"a\": 1}", 0o600).expect("write");
        assert_eq!(std::fs::read(&dest).expect("read"), b"{\"a\": 1}");
        assert!(!partial_name(&dest).exists());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write(&dest, b"{}", 0o600).expect("overwrite");
        assert_eq!(std::fs::read(&dest).expect("read"), b"{}");
    }

    #[test]
    fn leftovers_of_a_crash_are_recognised_and_only_they_are_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let done = dir.path().join("disk.qcow2");
        std::fs::write(&done, b"whole").expect("write");
        let partial = partial_name(&dir.path().join("other.qcow2"));
        std::fs::write(&partial, b"half").expect("write");
        let partial_dir = partial_name(&dir.path().join("some-image"));
        std::fs::create_dir(&partial_dir).expect("mkdir");
        std::fs::write(partial_dir.join("vmlinuz"), b"half").expect("write");
        assert!(is_partial(&partial) && !is_partial(&done));
        let mut removed = remove_partials(dir.path());
        removed.sort();
        let mut want = vec![partial.clone(), partial_dir.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(done.exists() && !partial.exists() && !partial_dir.exists());
    }

    #[test]
    fn a_rename_moves_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let from = dir.path().join("a");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(&from, b"x").expect("write");
        rename(&from, &sub.join("b")).expect("rename");
        assert!(!from.exists());
        assert_eq!(std::fs::read(sub.join("b")).expect("read"), b"x");
    }
}
