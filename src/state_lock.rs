//! The state directory's single-owner lock: one keepd per state directory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "another keepd{holder} already runs on state directory {dir}; stop it first, or give \
         this one its own node.state_dir"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot use state directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// Held for the daemon's lifetime; the kernel releases it however keepd exits.
#[derive(Debug)]
pub struct StateLock {
    _file: Flock<File>,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, StateError> {
        let io_err = |source| StateError::Io {
            dir: state_dir.to_owned(),
            source,
        };
        // The provisioner sets the directory's final mode and group.
        fsutil::create_dir_if_missing(state_dir, 0o700).map_err(io_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(crate::config::Layout::lock_file_in(state_dir))
            .map_err(io_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StateError::Locked {
                    dir: state_dir.to_owned(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err((_, errno)) => return Err(io_err(errno.into())),
        };
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("another keepd"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }
}
