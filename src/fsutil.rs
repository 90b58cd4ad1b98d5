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
    fn refuses_a_file_in_the_way() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("state");
        std::fs::write(&path, "x").unwrap();
        let err = ensure_private_dir(&path).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
