//! The native provider: a Postgres cluster from the host's binaries, in
//! `state_dir/pgdata`, reachable only through a Unix socket in a 0700
//! directory. This module prepares the cluster and builds the commands that
//! run it; `supervise` owns the running process.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use tracing::{info, warn};

use super::child::ChildLauncher;
use super::render::{self, RenderError, RenderInputs, RenderedConfig};
use super::tls::{Endpoint, Tls, TlsError};
use super::{
    INITDB_ARGS, PgAddress, SINGLE_USER_ARGS, SUPERUSER, endpoint, stop_ladder,
    superuser_verifier_statement,
};
use crate::config::{Config, Layout};
use crate::fsutil;
use crate::pki::NodePki;
use crate::repository::RepositoryEnv;
use crate::secrets::values::{ScramVerifier, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "PostgreSQL server binaries (initdb and postgres{version}) were not found in {searched}; \
         install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora/RHEL: \
         `dnf install postgresql-server`) or set database.postgres.native.bin_dir"
    )]
    BinariesNotFound { searched: String, version: String },
    #[error(
        "database.postgres.native.bin_dir = {dir} does not hold an executable `{missing}`; \
         point it at the directory with initdb and postgres (e.g. /usr/lib/postgresql/15/bin)"
    )]
    BinDirIncomplete { dir: PathBuf, missing: &'static str },
    #[error(
        "the data directory {data_dir} holds a PostgreSQL {data} cluster, but {wanted}; a cluster \
         runs only with the binaries of its own major version: install PostgreSQL {data} (Debian: \
         apt install postgresql-{data}), or upgrade the cluster with pg_upgrade first (docs/\
         operations.md, \"Major upgrade\")"
    )]
    MajorMismatch {
        data_dir: PathBuf,
        data: u32,
        wanted: String,
        /// A setting asked for the other major (a configuration error),
        /// rather than the host lacking this one.
        by_setting: bool,
    },
    #[error(
        "cannot create the system user `{user}` for Postgres ({reason}); create it \
         (`useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user}`) \
         or set database.postgres.native.run_as to an existing unprivileged user"
    )]
    CreateUser { user: String, reason: String },
    #[error(
        "database.postgres.native.run_as = `{user}` is root or a superuser account; \
         Postgres must run as an unprivileged user"
    )]
    PrivilegedUser { user: String },
    #[error(
        "Postgres runs as `{user}` and cannot reach {target}: {blocking} is mode {mode:04o} owned by \
         uid {owner}; allow traversal (`chmod o+x {blocking}`) or choose a node.state_dir / \
         node.runtime_dir under a directory it can traverse"
    )]
    Unreachable {
        user: String,
        target: PathBuf,
        blocking: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error(
        "{path} exists but is not a Postgres data directory (no PG_VERSION); keepd will not \
         touch it: move it away or choose another node.state_dir"
    )]
    NotADataDir { path: PathBuf },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NativeError + 'a {
    move |source| NativeError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The directory of the host's `initdb` and `postgres`, and their version.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub dir: PathBuf,
    pub major_version: u32,
}

impl NativeError {
    /// A setting names what this host does not have (exit 2): binaries of
    /// a version or in a directory that are not there, or another major
    /// than the cluster's.
    pub fn is_configuration(&self) -> bool {
        match self {
            NativeError::BinariesNotFound { .. } | NativeError::BinDirIncomplete { .. } => true,
            NativeError::MajorMismatch { by_setting, .. } => *by_setting,
            _ => false,
        }
    }
}

impl PgBinaries {
    /// Uses `bin_dir` when set, else `pg_config --bindir`, the Debian and
    /// RPM layouts and PATH, preferring the newest (or the configured) major.
    pub fn locate(bin_dir: Option<&Path>, want: Option<u32>) -> Result<PgBinaries, NativeError> {
        if let Some(dir) = bin_dir {
            for tool in ["initdb", "postgres"] {
                if !is_executable(&dir.join(tool)) {
                    return Err(NativeError::BinDirIncomplete {
                        dir: dir.to_owned(),
                        missing: tool,
                    });
                }
            }
            let major_version = major_version(dir)?;
            return Ok(PgBinaries {
                dir: dir.to_owned(),
                major_version,
            });
        }
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
        for pattern_root in ["/usr/lib/postgresql", "/usr"] {
            let Ok(entries) = std::fs::read_dir(pattern_root) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    pattern_root == "/usr/lib/postgresql"
                        || p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("pgsql-"))
                })
                .map(|p| p.join("bin"))
                .collect();
            found.sort();
            found.reverse();
            candidates.extend(found);
        }
        candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        let mut best: Option<PgBinaries> = None;
        let mut searched = Vec::new();
        for dir in candidates {
            if searched.contains(&dir) {
                continue;
            }
            searched.push(dir.clone());
            if !is_executable(&dir.join("initdb")) || !is_executable(&dir.join("postgres")) {
                continue;
            }
            let Ok(major) = major_version(&dir) else {
                continue;
            };
            if want.is_some_and(|w| w != major) {
                continue;
            }
            if best.as_ref().is_none_or(|b| major > b.major_version) {
                best = Some(PgBinaries {
                    dir,
                    major_version: major,
                });
            }
        }
        best.ok_or_else(|| NativeError::BinariesNotFound {
            searched: "pg_config --bindir, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, \
                       /usr/local/pgsql/bin and PATH"
                .into(),
            version: want.map(|v| format!(" of version {v}")).unwrap_or_default(),
        })
    }

    /// Whether the server library `name` (as `shared_preload_libraries`
    /// names it) is installed: in `lib` beside `bin`, where Debian's,
    /// PGDG's and source installs put them.
    pub fn has_library(&self, name: &str) -> bool {
        self.dir
            .parent()
            .is_some_and(|root| root.join("lib").join(format!("{name}.so")).is_file())
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Whether the binaries this configuration would run carry pgAudit, as
/// `prepare` decides it; `None` when no binaries are found (then `prepare`
/// refuses to start anyway).
pub fn pgaudit_installed(config: &Config) -> Option<bool> {
    let pg = &config.database.postgres;
    let data_dir = Layout::of(config).data_dir();
    binaries_for(&data_dir, pg.native.bin_dir.as_deref(), pg.version)
        .ok()
        .map(|binaries| binaries.has_library("pgaudit"))
}

/// The binaries for the cluster in `data_dir`: of its major version
/// (`PG_VERSION`) when it exists, never silently another; a new cluster
/// gets the configured or newest one.
fn binaries_for(
    data_dir: &Path,
    bin_dir: Option<&Path>,
    configured: Option<u32>,
) -> Result<PgBinaries, NativeError> {
    let data = std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    let Some(data) = data else {
        return PgBinaries::locate(bin_dir, configured);
    };
    let mismatch = |wanted: String, by_setting: bool| NativeError::MajorMismatch {
        data_dir: data_dir.to_owned(),
        data,
        wanted,
        by_setting,
    };
    if let Some(version) = configured.filter(|v| *v != data) {
        return Err(mismatch(
            format!("database.postgres.version asks for {version}"),
            true,
        ));
    }
    match PgBinaries::locate(bin_dir, Some(data)) {
        Ok(binaries) if binaries.major_version == data => Ok(binaries),
        Ok(binaries) => Err(mismatch(
            format!(
                "database.postgres.native.bin_dir holds PostgreSQL {}",
                binaries.major_version
            ),
            true,
        )),
        Err(NativeError::BinariesNotFound { .. }) => {
            let installed = PgBinaries::locate(bin_dir, None)
                .map(|b| format!("only PostgreSQL {} is installed", b.major_version))
                .unwrap_or_else(|_| "no PostgreSQL is installed".into());
            Err(mismatch(installed, false))
        }
        Err(e) => Err(e),
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

fn major_version(dir: &Path) -> Result<u32, NativeError> {
    let tool = dir.join("postgres");
    let out = Command::new(&tool)
        .arg("--version")
        .output()
        .map_err(io_err("cannot run", &tool))?;
    // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| NativeError::Command {
            what: format!("{} --version", tool.display()),
            detail: format!("unexpected output {:?}", text.trim()),
        })
}

/// The unprivileged account Postgres runs as when keepd is root.
#[derive(Debug, Clone)]
pub struct PgAccount {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl PgAccount {
    /// None when keepd is not root: Postgres then runs as keepd's own user.
    pub fn resolve(name: &str) -> Result<Option<PgAccount>, NativeError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let lookup = |name: &str| {
            User::from_name(name).map_err(|e| NativeError::CreateUser {
                user: name.into(),
                reason: e.to_string(),
            })
        };
        let user = match lookup(name)? {
            Some(user) => user,
            None => {
                info!(user = name, "creating the system user Postgres runs as");
                let out = Command::new("useradd")
                    .args(["--system", "--user-group", "--no-create-home"])
                    .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
                    .args(["--comment", "keepd PostgreSQL"])
                    .arg(name)
                    .output()
                    .map_err(|e| NativeError::CreateUser {
                        user: name.into(),
                        reason: e.to_string(),
                    })?;
                if !out.status.success() {
                    return Err(NativeError::CreateUser {
                        user: name.into(),
                        reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
                lookup(name)?.ok_or_else(|| NativeError::CreateUser {
                    user: name.into(),
                    reason: "useradd succeeded but the user is not visible".into(),
                })?
            }
        };
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            return Err(NativeError::PrivilegedUser { user: name.into() });
        }
        Ok(Some(PgAccount {
            name: name.into(),
            uid: user.uid,
            gid: user.gid,
        }))
    }
}

/// A prepared native cluster: binaries found, directories owned and locked
/// down, data directory initialised, rendered configuration installed.
#[derive(Debug)]
pub struct NativeCluster {
    binaries: PgBinaries,
    account: Option<PgAccount>,
    data_dir: PathBuf,
    log_dir: PathBuf,
    socket_dir: PathBuf,
    address: PgAddress,
    superuser_tls: Tls,
    port: u16,
    pub start_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// pgBackRest's repository passphrase, for the archive command: in the
    /// postmaster's environment only (readable by its account and root).
    archive_env: RepositoryEnv,
    pgbackrest_conf: PathBuf,
}

impl NativeCluster {
    /// `pki` is given in TCP mode: its server certificate is installed
    /// and the superuser connects with a client certificate.
    /// Renders the configuration for the binaries found.
    pub fn prepare(
        config: &Config,
        inputs: RenderInputs,
        pki: Option<&Arc<NodePki>>,
        archive_env: RepositoryEnv,
    ) -> Result<(NativeCluster, RenderedConfig), NativeError> {
        let cluster = NativeCluster::open(config, pki, archive_env)?;
        let pgaudit = cluster.binaries.has_library("pgaudit");
        if !pgaudit {
            warn!(bin_dir = %cluster.binaries.dir.display(), package = %format!("postgresql-{}-pgaudit", cluster.binaries.major_version), "pgAudit is not installed beside the server; Postgres runs without it (the security report's audit.pgaudit)");
        }
        let inputs = match super::tuning::host_memory() {
            Some((bytes, source)) => {
                info!(
                    memory_mb = bytes >> 20,
                    source, "Postgres's memory settings are sized from it"
                );
                inputs.with_memory(bytes)
            }
            None => inputs,
        };
        let rendered = render::render(&inputs.with_pgaudit(pgaudit))?;
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        cluster.install(&rendered, pki.map(|p| &**p))?;
        Ok((cluster, rendered))
    }

    /// A fresh state directory about to receive a restore (`keepd
    /// restore` after a disaster): keepd's directories and an empty data
    /// directory of Postgres's account holding pgBackRest's configuration.
    pub fn prepare_restore_target(
        config: &Config,
        rendered: &RenderedConfig,
    ) -> Result<(), NativeError> {
        let cluster = NativeCluster::open(config, None, RepositoryEnv::default())?;
        cluster.ensure_owned_dir(&cluster.data_dir)?;
        cluster.install_pgbackrest_conf(rendered)
    }

    fn install_pgbackrest_conf(&self, rendered: &RenderedConfig) -> Result<(), NativeError> {
        let Some(conf) = &rendered.pgbackrest_conf else {
            return Ok(());
        };
        let owner = self
            .account
            .as_ref()
            .map(|a| (a.uid.as_raw(), a.gid.as_raw()));
        fsutil::write_atomic(&self.pgbackrest_conf, conf.as_bytes(), owner)
            .map_err(io_err("cannot install", &self.pgbackrest_conf))
    }

    /// The cluster's settings and keepd's directories, nothing installed.
    fn open(
        config: &Config,
        pki: Option<&Arc<NodePki>>,
        archive_env: RepositoryEnv,
    ) -> Result<NativeCluster, NativeError> {
        let pg = &config.database.postgres;
        let data_dir = Layout::of(config).data_dir();
        let binaries = binaries_for(&data_dir, pg.native.bin_dir.as_deref(), pg.version)?;
        info!(
            bin_dir = %binaries.dir.display(),
            version = binaries.major_version,
            "using the host's PostgreSQL"
        );
        let account = PgAccount::resolve(&pg.native.run_as)?;
        let cluster = NativeCluster {
            binaries,
            account,
            data_dir: Layout::of(config).data_dir(),
            log_dir: render::log_dir(config),
            socket_dir: render::socket_dir(config),
            address: match pki {
                Some(_) => PgAddress::Tcp(config.network.bind_address),
                None => PgAddress::Socket(render::socket_dir(config)),
            },
            superuser_tls: Tls::maybe(pki, SUPERUSER)?,
            port: config.network.port,
            start_timeout: pg.native.start_timeout.get(),
            shutdown_timeout: pg.native.shutdown_timeout.get(),
            archive_env,
            pgbackrest_conf: Layout::of(config).pgbackrest_conf(),
        };
        cluster.prepare_dirs(&config.node.state_dir, &config.node.runtime_dir)?;
        if config.backup.enabled() {
            // Postgres's account writes these: it runs the archive command.
            let conf_dir = cluster
                .pgbackrest_conf
                .parent()
                .expect("a file in a directory");
            let lock_dir = Layout::of(config).pgbackrest_lock_dir();
            let dirs = [
                Some(&lock_dir),
                Some(&conf_dir.to_path_buf()),
                config.backup.repository.as_ref(),
            ];
            for dir in dirs.into_iter().flatten() {
                cluster.ensure_owned_dir(dir)?;
            }
        }
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where this cluster writes its log files.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// keepd's directories stay private; when Postgres runs as another user
    /// it gets search (not read) access to them and owns only its own.
    fn prepare_dirs(&self, state_dir: &Path, runtime_dir: &Path) -> Result<(), NativeError> {
        for shared in [state_dir, runtime_dir] {
            match &self.account {
                None => fsutil::ensure_private_dir(shared),
                Some(account) => fsutil::ensure_dir_mode(shared, 0o710).and_then(|()| {
                    nix::unistd::chown(shared, None, Some(account.gid)).map_err(io::Error::from)
                }),
            }
            .map_err(io_err("cannot prepare directory", shared))?;
        }
        self.ensure_owned_dir(&self.socket_dir)?;
        // Postgres cannot create it in keepd's own state directory.
        self.ensure_owned_dir(&self.log_dir)?;
        // A missing data directory is created by initdb; an existing one is
        // (re)claimed so Postgres accepts its ownership and mode.
        if self.data_dir.join("PG_VERSION").exists() {
            self.ensure_owned_dir(&self.data_dir)?;
        }
        if let Some(account) = &self.account {
            for target in [&self.data_dir, &self.socket_dir] {
                check_reachable(target, account)?;
            }
        }
        Ok(())
    }

    /// A 0700 directory owned by the Postgres account.
    fn ensure_owned_dir(&self, dir: &Path) -> Result<(), NativeError> {
        fsutil::ensure_private_dir(dir).map_err(io_err("cannot create directory", dir))?;
        if let Some(account) = &self.account {
            nix::unistd::chown(dir, Some(account.uid), Some(account.gid))
                .map_err(|e| io_err("cannot hand over directory", dir)(e.into()))?;
        }
        Ok(())
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.binaries.tool(tool));
        // Postgres inherits nothing of keepd's environment, and starts in a
        // directory it can read whatever keepd's working directory is.
        cmd.env_clear().env("LC_ALL", "C").current_dir("/");
        if let Some(account) = &self.account {
            cmd.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        cmd
    }

    /// Runs initdb into a scratch directory and renames it into place, so a
    /// crash never leaves a half-initialised data directory behind.
    fn initdb(&self) -> Result<(), NativeError> {
        if self.data_dir.exists() {
            let empty = std::fs::read_dir(&self.data_dir)
                .map_err(io_err("cannot read", &self.data_dir))?
                .next()
                .is_none();
            if !empty {
                return Err(NativeError::NotADataDir {
                    path: self.data_dir.clone(),
                });
            }
            std::fs::remove_dir(&self.data_dir).map_err(io_err("cannot remove", &self.data_dir))?;
        }
        let scratch = self.data_dir.with_extension("initdb");
        if scratch.exists() {
            warn!(path = %scratch.display(), "removing an interrupted initdb");
            std::fs::remove_dir_all(&scratch).map_err(io_err("cannot remove", &scratch))?;
        }
        self.ensure_owned_dir(&scratch)?;
        info!(data_dir = %self.data_dir.display(), "initdb: creating the cluster (checksums on)");
        let started = Instant::now();
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&scratch).args(INITDB_ARGS);
        run_to_completion(cmd, "initdb", None)?;
        std::fs::rename(&scratch, &self.data_dir)
            .map_err(io_err("cannot move into place", &scratch))?;
        if let Some(parent) = self.data_dir.parent() {
            fsutil::sync_dir(parent).map_err(io_err("cannot sync", parent))?;
        }
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initdb: done"
        );
        Ok(())
    }

    /// Writes the rendered files, and in TCP mode the server certificate,
    /// its key and the CA, into the data directory (0600, atomically).
    fn install(&self, rendered: &RenderedConfig, pki: Option<&NodePki>) -> Result<(), NativeError> {
        let mut files: Vec<(&str, &str)> = rendered.server_files().to_vec();
        if let Some(pki) = pki {
            files.extend(pki.server_files());
        }
        self.write_files(&files)?;
        self.install_pgbackrest_conf(rendered)
    }

    /// Installs a renewed server certificate (TCP mode); a reload applies it.
    pub fn install_tls(&self, pki: &NodePki) -> Result<(), NativeError> {
        self.write_files(&pki.server_files())
    }

    /// The TCP address keepd dials, if in TCP mode.
    pub fn tls_address(&self) -> Option<std::net::IpAddr> {
        match self.address {
            PgAddress::Tcp(ip) => Some(ip),
            PgAddress::Socket(_) | PgAddress::Host(_) => None,
        }
    }

    fn write_files(&self, files: &[(&str, &str)]) -> Result<(), NativeError> {
        for (name, text) in files {
            let path = self.data_dir.join(name);
            let owner = self
                .account
                .as_ref()
                .map(|a| (a.uid.as_raw(), a.gid.as_raw()));
            fsutil::write_atomic(&path, text.as_bytes(), owner)
                .map_err(io_err("cannot install", &path))?;
        }
        Ok(())
    }

    /// Handles a `postmaster.pid` left behind: if it names a live postgres
    /// serving this data directory (an orphan of an earlier keepd), that
    /// server is shut down; otherwise the stale file is removed.
    pub fn clear_stale_pid(&self) -> Result<(), NativeError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let text = match std::fs::read_to_string(&pid_file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot read", &pid_file)(e)),
        };
        let pid = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok());
        match pid {
            Some(pid) if pid > 0 && self.is_our_postmaster(pid) => {
                warn!(
                    pid,
                    "an orphaned postgres serves this data directory; shutting it down"
                );
                stop_process(Pid::from_raw(pid), self.shutdown_timeout);
            }
            _ => {
                info!(
                    pid = pid.unwrap_or(0),
                    "removing a stale postmaster.pid: that process is not a postgres on this data directory"
                );
                std::fs::remove_file(&pid_file).map_err(io_err("cannot remove", &pid_file))?;
            }
        }
        Ok(())
    }

    /// Whether `pid` is a postgres whose working directory is our data
    /// directory (Postgres chdirs into it), so a recycled PID is never
    /// mistaken for our server. Linux reads `/proc`; elsewhere (macOS, no
    /// `/proc`) `ps` names the program and `lsof` its working directory,
    /// and a process neither can describe is not ours.
    fn is_our_postmaster(&self, pid: i32) -> bool {
        #[cfg(target_os = "linux")]
        let (comm, cwd) = (
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default(),
            std::fs::read_link(format!("/proc/{pid}/cwd")),
        );
        #[cfg(not(target_os = "linux"))]
        let (comm, cwd) = {
            let out = |program: &str, args: &[&str]| {
                Command::new(program)
                    .args(args)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let pid = pid.to_string();
            let program = out("ps", &["-o", "comm=", "-p", &pid]);
            let comm = Path::new(program.trim())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // `-Fn`: one field per line, the name after `n`.
            let cwd = out("lsof", &["-a", "-d", "cwd", "-p", &pid, "-Fn"])
                .lines()
                .find_map(|l| l.strip_prefix('n').map(PathBuf::from))
                .ok_or_else(|| io::Error::other("lsof names no working directory"));
            (comm, cwd)
        };
        let ours = std::fs::canonicalize(&self.data_dir);
        comm.trim() == "postgres" && matches!((cwd, ours), (Ok(a), Ok(b)) if a == b)
    }

    /// Sets the superuser's SCRAM verifier in single-user mode, before the
    /// server accepts any connection. The statement travels over a pipe and
    /// is never logged.
    pub fn set_superuser_verifier(&self, verifier: &ScramVerifier) -> Result<(), NativeError> {
        let mut cmd = self.command("postgres");
        cmd.arg("--single")
            .arg("-D")
            .arg(&self.data_dir)
            .args(SINGLE_USER_ARGS)
            .arg("postgres");
        let statement = superuser_verifier_statement(verifier);
        run_to_completion(
            cmd,
            "postgres --single (setting the superuser verifier)",
            Some(statement.as_bytes()),
        )
    }

    /// The postmaster, in its own process group, as the Postgres account.
    pub fn postmaster_command(&self) -> Command {
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(&self.data_dir).process_group(0);
        self.archive_env.apply(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Connection settings for the bootstrap superuser: the socket, or
    /// TCP with TLS and the superuser's client certificate.
    pub fn superuser_endpoint(&self, password: &SecretString, dbname: &str) -> Endpoint {
        endpoint(
            &self.address,
            self.port,
            SUPERUSER,
            password,
            dbname,
            self.superuser_tls.clone(),
        )
    }
}

/// Walks up from `target` and checks the Postgres account may search every
/// directory on the way (owner, group or other execute bit).
fn check_reachable(target: &Path, account: &PgAccount) -> Result<(), NativeError> {
    let mut dir = target.parent();
    while let Some(d) = dir {
        let meta = std::fs::metadata(d).map_err(io_err("cannot inspect", d))?;
        let mode = meta.mode();
        let can = if meta.uid() == account.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == account.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can {
            return Err(NativeError::Unreachable {
                user: account.name.clone(),
                target: target.to_owned(),
                blocking: d.to_owned(),
                mode: mode & 0o7777,
                owner: meta.uid(),
            });
        }
        dir = d.parent();
    }
    Ok(())
}

/// Asks a postgres to stop fast (SIGINT), then immediately (SIGQUIT), then
/// kills it, waiting for it to go away in between.
pub fn stop_process(pid: Pid, timeout: Duration) {
    for (signal, wait) in stop_ladder(timeout) {
        if kill(pid, signal).is_err() {
            return;
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs a short-lived Postgres tool to completion, optionally feeding it
/// `input` on stdin, and turns a failure into an error with its output.
fn run_to_completion(
    mut cmd: Command,
    what: &str,
    input: Option<&[u8]>,
) -> Result<(), NativeError> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let failed = |detail: String| NativeError::Command {
        what: what.into(),
        detail,
    };
    let mut child = ChildLauncher::get()
        .spawn(cmd, Signal::SIGKILL)
        .map_err(|e| failed(e.to_string()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input).map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaint = stderr
        .lines()
        .chain(stdout.lines())
        .find(|l| l.contains("ERROR:") || l.contains("FATAL:") || l.contains("PANIC:"));
    if !out.status.success() || complaint.is_some() {
        let detail = complaint
            .map(str::to_string)
            .or_else(|| {
                stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("exited with {}", out.status));
        return Err(failed(detail));
    }
    for line in stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| !l.trim().is_empty())
    {
        tracing::debug!(target: "postgres", tool = what, "{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn explicit_bin_dir_must_hold_both_tools() {
        let dir = tempfile::tempdir().unwrap();
        let err = PgBinaries::locate(Some(dir.path()), None).unwrap_err();
        assert!(
            matches!(
                err,
                NativeError::BinDirIncomplete {
                    missing: "initdb",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("database.postgres.native.bin_dir"),
            "{err}"
        );
    }

    #[test]
    fn missing_version_names_the_package() {
        let err = PgBinaries::locate(None, Some(99)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("version 99"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
    }

    #[test]
    fn unreachable_directory_is_named() {
        let root = tempfile::tempdir().unwrap();
        let locked = root.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
        let account = PgAccount {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
        };
        std::fs::create_dir(locked.join("state")).unwrap();
        let err = check_reachable(&locked.join("state/pgdata"), &account).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&locked.display().to_string()), "{msg}");
        assert!(msg.contains("0700"), "{msg}");
    }
}
