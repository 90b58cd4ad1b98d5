//! Operator commands that talk to the managed database directly, with
//! credentials unsealed from `db.enc` in memory: `keepd psql`, `keepd
//! report`, `keepd audit verify`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::audit::Verdict;
use crate::config::{Config, ExternalSslMode, Layout, Topology};
use crate::fsutil;
use crate::identity::protection::IdentityStore;
use crate::identity::{IdentityError, NodeIdentity};
use crate::postgres::docker::DockerError;
use crate::postgres::external::ExternalError;
use crate::postgres::locate::locate;
use crate::postgres::native::PgBinaries;
use crate::postgres::replay::Replay;
use crate::postgres::tls::Endpoint;
use crate::postgres::{DATABASE, PgAddress, SUPERUSER, roles};
use crate::report::Report;
use crate::report::measure::{Inputs, measure};
use crate::secrets::store::{CredentialStore, Credentials, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no sealed credentials at {0} yet: start keepd once with `keepd run` first")]
    NoCredentials(PathBuf),
    #[error(
        "--role {given} is not a role keepd can log in as; use `superuser`, `login` (the active \
         login role) or one of: {choices}"
    )]
    UnknownRole { given: String, choices: String },
    #[error(
        "cannot connect to keepd's Postgres: {}; is keepd running with this configuration?",
        crate::postgres::describe_error(.0)
    )]
    Connect(#[source] tokio_postgres::Error),
    #[error("cannot read keepd.schema_migrations: {}", crate::postgres::describe_error(.0))]
    Migrations(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error(transparent)]
    State(#[from] crate::state_lock::StateError),
    #[error(transparent)]
    Render(#[from] crate::postgres::render::RenderError),
    #[error(transparent)]
    Native(#[from] crate::postgres::native::NativeError),
    #[error(transparent)]
    Entropy(#[from] crate::secrets::values::EntropyError),
    #[error("{0}")]
    BadS3Key(&'static str),
    #[error(
        "no db.enc at {0}: a bucket holds no copy of it; put back the sealed db.enc kept with the \
         identity's Shamir shares (it opens only with this identity), then restore again"
    )]
    NoS3Credentials(PathBuf),
    #[error(
        "interrupted: Postgres was stopped mid-replay; run `keepd restore` again, with the same \
         target"
    )]
    Interrupted,
    #[error(transparent)]
    Replay(#[from] crate::postgres::replay::ReplayError),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Locate(#[from] crate::postgres::locate::LocateError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Tls(#[from] crate::postgres::tls::TlsError),
    #[error("cannot prepare the client certificate directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

impl AdminError {
    /// Whether the command was called wrongly (exit 2): an argument or
    /// setting, not the state of the node.
    pub fn is_usage(&self) -> bool {
        match self {
            AdminError::UnknownRole { .. } | AdminError::BadS3Key(_) => true,
            AdminError::Backup(e) => e.is_configuration(),
            AdminError::Native(e) => e.is_configuration(),
            AdminError::Render(_) => true,
            _ => false,
        }
    }
}

/// The node identity and its unsealed credentials; never creates either.
fn unseal(config: &Config) -> Result<(NodeIdentity, Credentials), AdminError> {
    let layout = Layout::of(config);
    let identity = IdentityStore::of(config).load()?;
    let store = CredentialStore::new(layout.credentials().to_owned());
    let (credentials, _) = store
        .load(&identity)?
        .ok_or_else(|| AdminError::NoCredentials(store.path().to_owned()))?;
    Ok((identity, credentials))
}

/// The password as a libpq password file that exists only in memory (a
/// memfd, 0600, left open for psql to inherit and read as /dev/fd/N): it
/// never enters an environment, so neither psql's nor its children's
/// (`\!`, pg_dump) hold it. Linux only: elsewhere there is no memfd, and
/// keepd writes the password to no file, so `keepd psql` is refused.
#[cfg(target_os = "linux")]
fn passfile(
    user: &str,
    password: &crate::secrets::values::SecretString,
) -> Result<std::os::fd::OwnedFd, AdminError> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::sys::stat::{Mode, fchmod};
    use std::io::Write;
    let io = |source: std::io::Error| AdminError::Io {
        what: "hand the password to psql",
        source,
    };
    let fd = memfd_create("keepd-psql-passfile", MFdFlags::empty()).map_err(|e| io(e.into()))?;
    fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| io(e.into()))?;
    // hostname:port:database:username:password, `:` and `\` escaped.
    let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let line = zeroize::Zeroizing::new(format!(
        "*:*:*:{}:{}\n",
        escape(user),
        escape(password.expose())
    ));
    let mut file = std::fs::File::from(fd.try_clone().map_err(io)?);
    file.write_all(line.as_bytes()).map_err(io)?;
    Ok(fd)
}

#[cfg(not(target_os = "linux"))]
fn passfile(
    _user: &str,
    _password: &crate::secrets::values::SecretString,
) -> Result<std::os::fd::OwnedFd, AdminError> {
    Err(AdminError::Io {
        what: "hand the password to psql",
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "keepd psql passes the password in memory (a memfd), which only Linux has",
        ),
    })
}

/// keepd's superuser (an external server's administrator) on keepd's
/// database, as `application`.
fn superuser_endpoint(
    config: &Config,
    identity: &NodeIdentity,
    credentials: &Credentials,
    application: &str,
) -> Result<Endpoint, AdminError> {
    let located = locate(config, identity.node_id().as_str())?;
    let mut endpoint = located.superuser_endpoint(&credentials.superuser, DATABASE)?;
    endpoint.config.application_name(application);
    Ok(endpoint)
}

/// `keepd audit verify`: recomputes the audit chain as the superuser.
pub async fn audit_verify(config: &Config) -> Result<Verdict, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-audit-verify")?;
    let client = endpoint.connect().await.map_err(AdminError::Connect)?;
    let checkpoint = Layout::of(config).audit_checkpoint();
    Ok(crate::audit::verify(&client, &identity, &checkpoint).await?)
}

/// `keepd audit verify --export FILE`: checks an export with this node's
/// identity alone (no database).
pub fn audit_verify_export(
    config: &Config,
    file: &Path,
) -> Result<crate::audit::retention::ExportVerdict, AdminError> {
    let identity = IdentityStore::of(config).load()?;
    Ok(crate::audit::retention::verify_export(file, &identity)?)
}

/// `keepd migrate status`: every migration this keepd knows or the
/// database applied, as the superuser.
pub async fn migrate_status(
    config: &Config,
) -> Result<Vec<crate::postgres::migrate::MigrationStatus>, AdminError> {
    use crate::postgres::migrate;
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-migrate")?;
    let client = endpoint.connect().await.map_err(AdminError::Connect)?;
    let applied = migrate::applied(&client)
        .await
        .map_err(AdminError::Migrations)?;
    Ok(migrate::status(migrate::MIGRATIONS, &applied))
}

/// pgBackRest for `keepd backup now|list|verify`, with the repository
/// passphrase and the superuser's password unsealed from db.enc.
pub fn backups(config: &Config) -> Result<crate::backup::PgBackRest, AdminError> {
    let (identity, credentials) = unseal(config)?;
    Ok(crate::backup::PgBackRest::new(
        config,
        &credentials,
        identity.node_id().as_str(),
    )?)
}

/// What `keepd restore` did.
pub struct Restored {
    /// The audit checkpoint's seq before the restore, and the head of the
    /// chain as restored (the new checkpoint).
    pub checkpoint_before: Option<i64>,
    pub chain_head: i64,
}

/// `keepd restore`, for a stopped node (the state lock is taken, so a
/// running daemon refuses it): pgBackRest restores the data directory,
/// Postgres replays the archive to the target and promotes, and the audit
/// checkpoint moves to the restored head, signed; the daemon records the
/// restore in the audit trail at its next start.
pub async fn restore(
    config: &Config,
    target: crate::backup::RestoreTarget,
) -> Result<Restored, AdminError> {
    let layout = Layout::of(config);
    // Without its identity a node has nothing to restore into: refused
    // before the lock writes anything.
    IdentityStore::of(config).load()?;
    let _lock = crate::state_lock::StateLock::acquire(&config.node.state_dir)?;
    // A fresh state directory (a disaster: only identity.key came back,
    // from its Shamir shares): db.enc from the repository's copy.
    if let Some(repository) = &config.backup.repository {
        let copy = crate::repository::credentials_copy(repository);
        if !layout.credentials().exists() && copy.exists() {
            let identity = IdentityStore::of(config).load()?;
            CredentialStore::new(layout.credentials().to_owned()).adopt_copy(&identity, &copy)?;
            eprintln!("keepd: db.enc taken from the backup repository");
        }
    }
    if config.backup.s3.is_some() && !layout.credentials().exists() {
        return Err(AdminError::NoS3Credentials(layout.credentials().to_owned()));
    }
    let (identity, credentials) = unseal(config)?;
    let backups =
        crate::backup::PgBackRest::new(config, &credentials, identity.node_id().as_str())?;
    // Everything the replay needs is checked before the data directory
    // is touched.
    let node_id = identity.node_id().as_str();
    let mut replay = Replay::prepare(
        config,
        node_id,
        &credentials.superuser,
        backups.env().clone(),
    )
    .await?;
    eprintln!("keepd: restoring the data directory from the backup repository");
    let restored = async {
        backups.restore_into(&replay, &target).await?;
        let endpoint = replay.start(&credentials.superuser).await?;
        let rebase = Rebase {
            layout: &layout,
            identity: &identity,
            target: &target,
        };
        rebase
            .wait_and_rebase(&endpoint, || replay.done().map_err(AdminError::from))
            .await
    };
    let restored = restored.await;
    replay.stop().await;
    restored
}

/// After a restore's replay: the audit checkpoint moved to the restored
/// head.
struct Rebase<'a> {
    layout: &'a Layout,
    identity: &'a NodeIdentity,
    target: &'a crate::backup::RestoreTarget,
}

impl Rebase<'_> {
    /// Waits until Postgres has replayed to the target and promoted
    /// (`replayed` says so, or the server stops being in recovery), then
    /// moves the audit checkpoint to the restored head, signed, and leaves
    /// the note the daemon records at its next start.
    async fn wait_and_rebase(
        &self,
        endpoint: &Endpoint,
        mut replayed: impl FnMut() -> Result<bool, AdminError>,
    ) -> Result<Restored, AdminError> {
        eprintln!("keepd: replaying the WAL archive to {}", self.target);
        let mut interrupt = tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::interrupt(),
        )
        .map_err(|source| AdminError::Io {
            what: "handle Ctrl-C",
            source,
        })?;
        let mut waited = 0u64;
        let client = loop {
            if replayed()? {
                match endpoint.connect().await {
                    Ok(client) => break client,
                    Err(e) if waited > 300 => return Err(AdminError::Connect(e)),
                    Err(_) => {}
                }
            } else if let Ok(client) = endpoint.connect().await {
                // A server that answers and is out of recovery is done.
                let recovering = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .map(|row| row.get::<_, bool>(0));
                if let Ok(false) = recovering {
                    break client;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                // Postgres is stopped by the caller; `keepd restore` may be
                // run again with the same target.
                _ = interrupt.recv() => return Err(AdminError::Interrupted),
            }
            waited += 1;
            if waited.is_multiple_of(50) {
                eprintln!("keepd: still replaying ({} s)", waited / 5);
            }
        };
        let (before, head) = crate::audit::rebase_checkpoint(
            &client,
            self.identity,
            &self.layout.audit_checkpoint(),
        )
        .await?;
        let note = serde_json::json!({
            "target": self.target.to_string(),
            "restored_at_unix": crate::clock::unix_now(),
            "checkpoint_seq_before": before,
            "chain_seq_restored": head,
        });
        fsutil::write_atomic(
            &self.layout.restore_note(),
            note.to_string().as_bytes(),
            None,
        )
        .map_err(|source| AdminError::Io {
            what: "record the restore for the audit trail",
            source,
        })?;
        Ok(Restored {
            checkpoint_before: before,
            chain_head: head,
        })
    }
}

/// What `keepd cluster` does.
pub enum ClusterAction<'a> {
    /// Every node the cluster knows.
    Status,
    /// Admit a waiting node.
    Admit(&'a str),
    /// Remove a node: its sealed key and its login roles.
    Remove(&'a str),
}

/// `keepd cluster status | pending | admit | remove`, as the superuser;
/// answers the members after the action.
pub async fn cluster(
    config: &Config,
    action: ClusterAction<'_>,
) -> Result<Vec<crate::cluster::Member>, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-cluster")?;
    let mut client = endpoint.connect().await.map_err(AdminError::Connect)?;
    match action {
        ClusterAction::Status => {}
        ClusterAction::Admit(node) => crate::cluster::admit(&mut client, &identity, node).await?,
        ClusterAction::Remove(node) => crate::cluster::remove(&mut client, &identity, node).await?,
    }
    Ok(crate::cluster::members(&mut client).await?)
}

/// What `keepd cluster token` does.
pub enum TokenAction<'a> {
    Create { ttl: std::time::Duration, uses: u32 },
    List,
    Revoke(&'a str),
}

/// `keepd cluster token create|list|revoke`, as the superuser: the token
/// made (create), and the tokens as they stand after the action.
pub async fn join_tokens(
    config: &Config,
    action: TokenAction<'_>,
) -> Result<
    (
        Option<crate::cluster::JoinToken>,
        Vec<crate::cluster::by_token::TokenInfo>,
    ),
    AdminError,
> {
    use crate::cluster::by_token;
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-cluster")?;
    let mut client = endpoint.connect().await.map_err(AdminError::Connect)?;
    match action {
        TokenAction::Create { ttl, uses } => {
            let token = by_token::create_token(&mut client, &identity, ttl, uses).await?;
            Ok((Some(token), Vec::new()))
        }
        TokenAction::List => Ok((None, by_token::tokens(&mut client).await?)),
        TokenAction::Revoke(id) => {
            by_token::revoke_token(&mut client, id).await?;
            Ok((None, by_token::tokens(&mut client).await?))
        }
    }
}

/// `keepd cluster rotate-key`, as the superuser.
pub async fn cluster_rotate_key(config: &Config) -> Result<crate::cluster::RotatedKey, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-cluster")?;
    let mut client = endpoint.connect().await.map_err(AdminError::Connect)?;
    Ok(crate::cluster::rotate_key(&mut client, &identity).await?)
}

/// `keepd keys status`: every key keepd holds or derives, with its
/// version, age and schedule. The cluster's founding and its field key
/// versions are read from the database when it answers; without it those
/// ages are unknown.
pub async fn keys_status(config: &Config) -> Result<Vec<crate::keys::KeyStatus>, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let database = match Layout::of(config).cluster_pin().exists() {
        true => {
            let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-keys")?;
            match endpoint.connect().await {
                Ok(client) => crate::keys::DatabaseFacts::read(&client, config).await,
                Err(_) => Default::default(),
            }
        }
        false => Default::default(),
    };
    let facts = crate::keys::facts(config, &credentials, &database);
    Ok(crate::keys::statuses(&facts, crate::clock::unix_now()))
}

/// `keepd report`: the security report, measured now.
pub async fn report(config: &Config) -> Result<Report, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let endpoint = superuser_endpoint(config, &identity, &credentials, "keepd-report")?;
    let login_role = credentials
        .active()
        .map(|c| roles::login_role_name(identity.node_id(), c.version))
        .ok_or_else(|| AdminError::NoCredentials(Layout::of(config).credentials().to_owned()))?;
    let facts =
        crate::postgres::locate::container_facts(config, identity.node_id().as_str()).await?;
    let certificate = Topology::of(config)
        .issues_certificates()
        .then(|| std::fs::read_to_string(Layout::of(config).server_certificate()).ok())
        .flatten();
    let backups = config.backup.enabled().then(|| {
        crate::backup::PgBackRest::new(config, &credentials, identity.node_id().as_str())
            .map_err(|e| e.to_string())
    });
    let checks = measure(&Inputs {
        backups: backups.as_ref().map(|b| b.as_ref().map_err(String::clone)),
        config,
        identity: &identity,
        superuser: &endpoint,
        login_role: &login_role,
        container: facts.as_ref(),
        server_certificate: certificate.as_deref(),
        api_certificate: config
            .api
            .tls
            .as_ref()
            .and_then(|tls| crate::edge::ApiCertificate::load(tls).ok())
            .map(|cert| cert.info()),
    })
    .await;
    Ok(Report::new(checks))
}

/// Runs psql as `role` (`superuser` when None) with `args`, and returns
/// its exit status. The password reaches psql through an in-memory
/// password file it inherits (`passfile`), never argv or an environment.
pub fn psql(
    config: &Config,
    role: Option<&str>,
    args: &[String],
) -> Result<ExitStatus, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let node = identity.node_id();
    let live: Vec<(String, _)> = credentials
        .live()
        .filter_map(|c| Some((roles::login_role_name(node, c.version), c.password.clone()?)))
        .collect();
    let (user, password) = match role.unwrap_or("superuser") {
        "superuser" | SUPERUSER => (SUPERUSER.to_string(), credentials.superuser.clone()),
        "login" => {
            let active = credentials
                .active()
                .and_then(|c| Some((roles::login_role_name(node, c.version), c.password.clone()?)));
            active.ok_or_else(|| {
                AdminError::NoCredentials(Layout::of(config).credentials().to_owned())
            })?
        }
        other => live
            .iter()
            .find(|(name, _)| name == other)
            .cloned()
            .ok_or_else(|| AdminError::UnknownRole {
                given: other.into(),
                choices: live
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let pg = &config.database.postgres;
    let program = PgBinaries::locate(pg.native.bin_dir.as_deref(), pg.version)
        .ok()
        .map(|b| b.dir.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let located = locate(config, node.as_str())?;
    let (user, password) = located.login(user, password);
    let port = located.ports.clone();
    // Kept open until psql exits: psql reads the password from it.
    let passfile = passfile(&user, &password)?;
    let mut command = Command::new(&program);
    command
        .args(args)
        .env("PGPORT", port)
        .env("PGDATABASE", DATABASE)
        .env("PGUSER", &user)
        .env(
            "PGPASSFILE",
            format!("/dev/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&passfile)),
        )
        .env("PGAPPNAME", "keepd-psql");
    // TCP mode: psql reads certificates from files, so a client
    // certificate for this role goes into a private directory that is
    // removed when psql exits.
    let mut scratch = None;
    match (located.address, located.pki) {
        (PgAddress::Socket(dir), _) => {
            command.env("PGHOST", dir);
        }
        (PgAddress::Host(host), _) => {
            let ext = &pg.external;
            command
                .env("PGHOST", host)
                .env("PGTARGETSESSIONATTRS", "read-write");
            match (&ext.sslmode, &ext.ca_file) {
                (ExternalSslMode::VerifyFull, Some(ca)) => {
                    command
                        .env("PGSSLMODE", "verify-full")
                        .env("PGSSLROOTCERT", ca);
                }
                _ => {
                    command.env("PGSSLMODE", "disable");
                }
            }
        }
        (PgAddress::Tcp(ip), pki) => {
            let pki = pki.expect("TCP mode has a PKI");
            let dir = Layout::of(config).psql_scratch_dir(std::process::id());
            let io = |source| AdminError::Scratch {
                path: dir.clone(),
                source,
            };
            fsutil::ensure_private_dir(&dir).map_err(io)?;
            let client = pki.issue_client(&user)?;
            for (name, text) in [
                ("ca.crt", pki.ca.cert_pem.as_str()),
                ("client.crt", client.cert_pem.as_str()),
                ("client.key", client.key_pem.as_str()),
            ] {
                fsutil::write_atomic(&dir.join(name), text.as_bytes(), None).map_err(io)?;
            }
            command
                .env("PGHOST", ip.to_string())
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", dir.join("ca.crt"))
                .env("PGSSLCERT", dir.join("client.crt"))
                .env("PGSSLKEY", dir.join("client.key"));
            scratch = Some(dir);
        }
    }
    // Ctrl-C at psql's prompt reaches the whole process group: keepd
    // ignores it while psql runs (psql handles its own), so it lives to
    // remove the scratch directory with the client key.
    let interrupts = ignore_interrupts();
    let status = command
        .status()
        .map_err(|source| AdminError::Spawn { program, source });
    drop(interrupts);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    status
}

/// SIGINT ignored until dropped, then as it was.
struct IgnoredInterrupts(Option<nix::sys::signal::SigHandler>);

fn ignore_interrupts() -> IgnoredInterrupts {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN runs no handler code; the previous disposition is
    // put back as it was.
    IgnoredInterrupts(unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) }.ok())
}

impl Drop for IgnoredInterrupts {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, signal};
        if let Some(previous) = self.0 {
            // SAFETY: restores the disposition this process had before.
            let _ = unsafe { signal(Signal::SIGINT, previous) };
        }
    }
}

/// Seals an S3 access key into db.enc for `backup.s3`, on a stopped node
/// (the state lock says so). A node that never ran gets its identity and
/// db.enc made here as its first start would make them.
pub fn set_s3_credentials(
    config: &Config,
    key_id: &str,
    secret: crate::secrets::values::SecretString,
) -> Result<(), AdminError> {
    if key_id.is_empty() || !key_id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(AdminError::BadS3Key(
            "--key-id must be the access key's id: printable ASCII, no spaces",
        ));
    }
    if secret.expose().is_empty() || !secret.expose().chars().all(|c| c.is_ascii_graphic()) {
        return Err(AdminError::BadS3Key(
            "the secret access key (one line on stdin) must be printable ASCII, no spaces",
        ));
    }
    let _lock = crate::state_lock::StateLock::acquire(&config.node.state_dir)?;
    let layout = Layout::of(config);
    let (identity, _) = IdentityStore::of(config).load_or_create()?;
    let store = CredentialStore::new(layout.credentials().to_owned());
    let (mut credentials, method) = match store.load(&identity)? {
        Some(found) => found,
        None => (
            Credentials::generate(config.credentials.password_length, crate::clock::unix_now())?,
            config.credentials.encryption_method,
        ),
    };
    credentials.s3 = Some(crate::secrets::store::S3Credentials {
        key_id: crate::secrets::values::SecretString::new(key_id.to_string()),
        secret,
    });
    store.save(&identity, method, &credentials)?;
    Ok(())
}
