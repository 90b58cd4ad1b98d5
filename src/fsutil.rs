//! Small file-system helpers shared by the modules that keep private state.

use std::fs::{DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) so that the directory itself is 0700.
/// An existing directory with looser permissions is tightened, not trusted.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    ensure_dir_mode(dir, 0o700)
}

/// Creates `dir` with exactly `mode`; missing parents get the usual 0755 so
/// that an unprivileged Postgres can still traverse to its own directory.
pub fn ensure_dir_mode(dir: &Path, mode: u32) -> io::Result<()> {
    create_dir_if_missing(dir, mode)?;
    // The umask may have narrowed the mode we asked for, or the directory
    // existed with another one; set it exactly.
    if std::fs::metadata(dir)?.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates `dir` with `mode` (missing parents 0755) and leaves an existing
/// directory as it is.
pub fn create_dir_if_missing(dir: &Path, mode: u32) -> io::Result<()> {
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)?;
            if !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Makes a rename or file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` atomically with `bytes` (mode 0600, optionally handed to
/// `owner` uid/gid): a temporary file beside it, fsync, rename, fsync of the
/// directory. A crash leaves the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], owner: Option<(u32, u32)>) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The permission bits of a path, for messages and checks.
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_with_exact_mode_and_tightens_existing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/state");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir).unwrap(), 0o700);
        assert_eq!(mode_of(&root.path().join("a/b")).unwrap(), 0o755);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir).unwrap(), 0o700);
    }

    #[test]
    fn atomic_write_replaces_with_mode_0600_and_leaves_no_temp() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("f");
        write_atomic(&path, b"one", None).unwrap();
        write_atomic(&path, b"two", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path).unwrap(), 0o600);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_a_file_in_the_way() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("state");
        std::fs::write(&path, "x").unwrap();
        let err = ensure_private_dir(&path).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
