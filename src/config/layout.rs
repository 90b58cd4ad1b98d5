//! `Layout`: where keepd keeps its files, named once. Every path under
//! `node.state_dir` and `node.runtime_dir` comes from here, so a file is
//! never spelled twice.

use std::path::{Path, PathBuf};

use super::Config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    credentials: PathBuf,
}

impl Layout {
    pub fn of(config: &Config) -> Layout {
        let state_dir = config.node.state_dir.clone();
        Layout {
            credentials: config
                .credentials
                .encrypted_path
                .clone()
                .unwrap_or_else(|| state_dir.join("secrets").join("db.enc")),
            runtime_dir: config.node.runtime_dir.clone(),
            state_dir,
        }
    }

    /// Identity key, sealed credentials, PKI and the data directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Sockets and other files that do not survive a reboot.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The identity sealed under a passphrase (`node.identity.passphrase_file`).
    pub fn identity_sealed(&self) -> PathBuf {
        self.state_dir.join("identity.sealed")
    }

    /// The node's Ed25519 identity key, in the clear.
    pub fn identity_key(&self) -> PathBuf {
        self.state_dir.join("identity.key")
    }

    /// The sealed credentials (`credentials.encrypted_path` when set).
    pub fn credentials(&self) -> &Path {
        &self.credentials
    }

    /// The lock one keepd per state directory holds, in `state_dir` (taken
    /// before the rest of the layout is needed).
    pub fn lock_file_in(state_dir: &Path) -> PathBuf {
        state_dir.join("keepd.lock")
    }

    /// The Postgres data directory (native provider).
    pub fn data_dir(&self) -> PathBuf {
        self.state_dir.join("pgdata")
    }

    /// The fingerprint of the cluster key this node holds (pinned on first
    /// use).
    pub fn cluster_pin(&self) -> PathBuf {
        self.state_dir.join("cluster.fingerprint")
    }

    /// What `keepd restore` restored, for the daemon to record in the
    /// audit trail at its next start.
    pub fn restore_note(&self) -> PathBuf {
        self.state_dir.join("audit.restore.json")
    }

    /// pgBackRest's configuration, in a directory of Postgres's account
    /// (it runs `archive-push` and must read it), outside the data
    /// directory so a restore can fill an empty one.
    pub fn pgbackrest_conf(&self) -> PathBuf {
        self.state_dir.join("pgbackrest").join("pgbackrest.conf")
    }

    /// pgBackRest's lock files.
    pub fn pgbackrest_lock_dir(&self) -> PathBuf {
        self.runtime_dir.join("pgbackrest")
    }

    /// Where the native Postgres writes its log files: beside the data
    /// directory, never in it (CIS 3.1.3: a copy or restore of the data
    /// directory neither carries nor replaces the server's log).
    pub fn postgres_log_dir(&self) -> PathBuf {
        self.state_dir.join("pglog")
    }

    /// The node CA and the certificates it issued (TCP mode).
    pub fn pki_dir(&self) -> PathBuf {
        Layout::pki_dir_in(&self.state_dir)
    }

    /// The PKI directory in `state_dir` (`pki` takes the state directory
    /// alone).
    pub fn pki_dir_in(state_dir: &Path) -> PathBuf {
        state_dir.join("pki")
    }

    /// Postgres's server certificate as keepd issued it.
    pub fn server_certificate(&self) -> PathBuf {
        self.pki_dir().join("server.crt")
    }

    /// The signed audit checkpoint, outside the database on purpose.
    pub fn audit_checkpoint(&self) -> PathBuf {
        self.state_dir.join("audit.checkpoint")
    }

    /// Where audit retention writes its signed exports by default.
    pub fn audit_exports(&self) -> PathBuf {
        self.state_dir.join("audit-exports")
    }

    /// Postgres's Unix socket directory (native, and docker's bind mount).
    pub fn socket_dir(&self) -> PathBuf {
        self.runtime_dir.join("postgres")
    }

    /// The docker provider's rendered configuration, bind-mounted read-only.
    pub fn docker_conf_dir(&self) -> PathBuf {
        self.state_dir.join("docker-conf")
    }

    /// The docker provider's TLS files, bind-mounted read-only.
    pub fn docker_tls_dir(&self) -> PathBuf {
        self.state_dir.join("docker-tls")
    }

    /// Where the docker provider records the container's address (TCP).
    pub fn docker_address_file(&self) -> PathBuf {
        self.runtime_dir.join("postgres.address")
    }

    /// `keepd psql`'s private directory for its client certificate (TCP
    /// mode: psql reads certificates from files), removed when psql exits.
    pub fn psql_scratch_dir(&self, pid: u32) -> PathBuf {
        self.runtime_dir.join(format!("psql-{pid}"))
    }

    /// keepd's control socket (`keepd rotate`, ...).
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_node_directories() {
        let mut config = Config::default();
        config.node.state_dir = "/s".into();
        config.node.runtime_dir = "/r".into();
        let layout = Layout::of(&config);
        assert_eq!(layout.identity_key(), Path::new("/s/identity.key"));
        assert_eq!(layout.credentials(), Path::new("/s/secrets/db.enc"));
        assert_eq!(layout.postgres_log_dir(), Path::new("/s/pglog"));
        assert_eq!(layout.server_certificate(), Path::new("/s/pki/server.crt"));
        assert_eq!(layout.control_socket(), Path::new("/r/control.sock"));
        config.credentials.encrypted_path = Some("/elsewhere/db.enc".into());
        assert_eq!(
            Layout::of(&config).credentials(),
            Path::new("/elsewhere/db.enc")
        );
    }
}

/// The docker provider's layout inside the container, which the rendered
/// files name (the provider mounts what they point at).
pub mod container {
    /// The data directory, on the node's volume.
    pub const PGDATA: &str = "/var/lib/postgresql/data/pgdata";
    /// The rendered files, a read-only bind mount.
    pub const CONF: &str = "/etc/keepd";
    /// The server's log directory, on the node's volume beside the data
    /// directory.
    pub const LOG: &str = "/var/lib/postgresql/data/log";
    /// The socket directory, a bind mount shared with keepd.
    pub const SOCKET: &str = "/var/run/postgresql";
    /// A directory repository (`backup.repository`), a read-write bind mount.
    pub const REPOSITORY: &str = "/var/lib/keepd-backup";
    /// pgBackRest's lock and spool directory, on the container's tmpfs.
    pub const PGBACKREST_RUN: &str = "/tmp/pgbackrest";
    /// TCP mode's socket for pgBackRest alone, on the tmpfs (keepd itself
    /// reaches the server over TLS).
    pub const BACKUP_SOCKET: &str = "/tmp";
}
