//! Carries out credential rotations: the pure state machine of
//! `secrets::rotation` applied to `db.enc` (through `secrets::store`), to
//! Postgres (through `postgres::roles`) and to the pool. One at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tracing::{error, info, warn};

use crate::config::SealMethod;
use crate::identity::NodeIdentity;
use crate::metrics::Metrics;
use crate::postgres::describe_error;
use crate::postgres::pool::{LoginCredential, RoleAwarePool};
use crate::postgres::roles::{self, RoleAdmin, RoleError};
use crate::postgres::tls::{Endpoint, TlsError, TlsSource};
use crate::secrets::rotation::{self, Phase};
use crate::secrets::store::{CredentialStatus, CredentialStore, Credentials, StoreError};
use crate::secrets::values::{self, EntropyError, ScramVerifier};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("a credential rotation is already under way ({0}); try again when it has finished")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error(transparent)]
    Entropy(#[from] EntropyError),
    #[error("cannot connect to Postgres as the superuser: {}", describe_error(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("db.enc has no active login credential")]
    NoActive,
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(
        "the superuser is the external server's administrator, not keepd's: rotate its \
         password on the server and in database.postgres.external"
    )]
    NotOurSuperuser,
}

/// Settings of a rotation, from `credentials.*` and `database.pool.*`.
#[derive(Debug, Clone, Copy)]
pub struct RotationSettings {
    pub method: SealMethod,
    pub password_length: usize,
    pub interval: Duration,
    /// keepd's own superuser's (`credentials.superuser_rotation_interval`).
    pub superuser_interval: Duration,
    pub grace: Duration,
    pub connection_limit: i32,
}

impl RotationSettings {
    /// From `credentials.*`; the login roles' connection limit leaves the
    /// pool (`database.pool.max_size`) two more for the rotation itself.
    pub fn of(config: &crate::config::Config) -> RotationSettings {
        RotationSettings {
            method: config.credentials.encryption_method,
            password_length: config.credentials.password_length,
            interval: config.credentials.rotation_interval.get(),
            superuser_interval: config.credentials.superuser_rotation_interval.get(),
            grace: config.credentials.rotation_grace_period.get(),
            connection_limit: config.database.pool.max_size as i32 + 2,
        }
    }
}

/// Environment variable naming a rotation step (1-9) after which keepd
/// kills itself with SIGKILL: a fault point for crash-convergence tests.
pub const FAULT_STEP_ENV: &str = "KEEPD_FAULT_ROTATION_STEP";

pub struct Rotator {
    identity: Arc<NodeIdentity>,
    store: CredentialStore,
    settings: RotationSettings,
    credentials: Mutex<Credentials>,
    superuser: Endpoint,
    pool: RoleAwarePool,
    wake: Notify,
    fault_step: Option<u8>,
    metrics: Arc<Metrics>,
    tls: TlsSource,
    pki_changed: Arc<Notify>,
}

use crate::clock::unix_now as now;

/// The pool's view of the active credential; over TCP with a client
/// certificate issued for its role.
pub fn login_credential(
    identity: &NodeIdentity,
    credentials: &Credentials,
    tls: &TlsSource,
) -> Result<LoginCredential, RotationError> {
    let active = credentials.active().ok_or(RotationError::NoActive)?;
    let role = roles::login_role_name(identity.node_id(), active.version);
    Ok(LoginCredential {
        tls: tls.for_role(&role)?,
        role,
        version: active.version,
        password: active.password.clone().ok_or(RotationError::NoActive)?,
    })
}

/// How the rotator reaches Postgres: the superuser's endpoint, and where
/// each new login role's TLS comes from.
pub struct PgAccess {
    pub superuser: Endpoint,
    pub tls: TlsSource,
    /// Told when a retired role's client certificates were revoked, so the
    /// new CRL is installed and applied.
    pub pki_changed: Arc<Notify>,
}

impl Rotator {
    pub fn new(
        identity: Arc<NodeIdentity>,
        store: CredentialStore,
        settings: RotationSettings,
        credentials: Credentials,
        access: PgAccess,
        pool: RoleAwarePool,
        metrics: Arc<Metrics>,
    ) -> Rotator {
        let PgAccess {
            superuser,
            tls,
            pki_changed,
        } = access;
        let fault_step = std::env::var(FAULT_STEP_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Rotator {
            identity,
            store,
            settings,
            credentials: Mutex::new(credentials),
            superuser,
            pool,
            wake: Notify::new(),
            fault_step,
            metrics,
            tls,
            pki_changed,
        }
    }

    fn role_name(&self, version: u32) -> String {
        roles::login_role_name(self.identity.node_id(), version)
    }

    /// Records a rotation step in the audit trail, then passes the step's
    /// fault point.
    async fn step_done(
        &self,
        step: u8,
        version: u32,
        started: std::time::Instant,
    ) -> Result<(), RotationError> {
        let entry = crate::audit::AuditEntry {
            action: crate::audit::AuditAction::CredentialRotation,
            rows_affected: 1,
            duration: started.elapsed(),
            source_component: "rotation",
            metadata: serde_json::json!({"step": step, "version": version}),
        };
        crate::audit::record_alone(&self.pool, self.identity.node_id().as_str(), &entry).await?;
        self.fault_point(step);
        Ok(())
    }

    fn fault_point(&self, step: u8) {
        if self.fault_step == Some(step) {
            error!(step, "fault injection: killing keepd after rotation step");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        }
    }

    async fn admin(&self) -> Result<tokio_postgres::Client, RotationError> {
        self.superuser
            .connect()
            .await
            .map_err(RotationError::Connect)
    }

    fn save(&self, credentials: &Credentials) -> Result<(), RotationError> {
        Ok(self
            .store
            .save(&self.identity, self.settings.method, credentials)?)
    }

    /// At start: every active or pending credential has its role with its
    /// verifier; any other login role of this node that is not retiring is
    /// an orphan and is dropped.
    pub async fn reconcile(&self) -> Result<(), RotationError> {
        if self.credentials.lock().await.superuser_next.is_some() {
            info!("rotation: finishing an interrupted superuser password rotation");
            self.rotate_superuser().await?;
        }
        let credentials = self.credentials.lock().await;
        let mut client = self.admin().await?;
        let mut admin = RoleAdmin::new(&mut client);
        let mut keep = Vec::new();
        for c in credentials.live() {
            keep.push(c.version);
            if c.status == CredentialStatus::Retiring {
                continue;
            }
            let password = c.password.as_ref().ok_or(RotationError::NoActive)?;
            admin
                .ensure_login_role(
                    &self.role_name(c.version),
                    &ScramVerifier::of(password),
                    self.settings.connection_limit,
                )
                .await?;
        }
        for version in admin.node_role_versions(self.identity.node_id()).await? {
            if !keep.contains(&version) {
                let name = self.role_name(version);
                warn!(role = name, "dropping an orphaned login role");
                admin.terminate_sessions(&name).await?;
                admin.drop_role(&name).await?;
            }
        }
        Ok(())
    }

    /// Steps 1-4 now; the old credential retires in the background after
    /// the grace period. Returns a one-line summary.
    pub async fn rotate_now(&self) -> Result<String, RotationError> {
        let started = std::time::Instant::now();
        let mut credentials = self.credentials.lock().await;
        let phase = rotation::next_phase(&credentials, self.settings.grace);
        if phase != Phase::Idle {
            return Err(RotationError::Busy(phase.to_string()));
        }
        let old = credentials.active().ok_or(RotationError::NoActive)?.version;
        let password = values::generate_password(self.settings.password_length)?;
        let version = rotation::begin(&mut credentials, password, now());
        self.save(&credentials)?;
        info!(
            version,
            step = 1,
            "rotation: new credential generated and sealed"
        );
        self.step_done(1, version, started).await?;
        self.activate(&mut credentials, version).await?;
        self.metrics.rotation_completed();
        self.wake.notify_one();
        Ok(format!(
            "login role v{version} is active; v{old} keeps working for the {}s grace period, then is dropped",
            self.settings.grace.as_secs()
        ))
    }

    /// A new password for keepd's own superuser: sealed as the next one,
    /// given to Postgres, then sealed as the current one and handed to
    /// every endpoint. Sessions already logged in stay; an interruption at
    /// any point is finished by the next start (`reconcile`), whichever
    /// of the two passwords Postgres holds.
    pub async fn rotate_superuser(&self) -> Result<String, RotationError> {
        let shared = self
            .superuser
            .shared
            .clone()
            .ok_or(RotationError::NotOurSuperuser)?;
        let started = std::time::Instant::now();
        let mut credentials = self.credentials.lock().await;
        let next = match &credentials.superuser_next {
            Some(next) => next.clone(),
            None => {
                let next = values::generate_password(self.settings.password_length)?;
                credentials.superuser_next = Some(next.clone());
                self.save(&credentials)?;
                next
            }
        };
        // Connections opened from here on try the new one if refused.
        shared.stage(next.clone());
        let mut client = self.admin().await?;
        RoleAdmin::new(&mut client)
            .set_superuser_password(&ScramVerifier::of(&next))
            .await?;
        drop(client);
        credentials.superuser = next.clone();
        credentials.superuser_next = None;
        credentials.superuser_created_at = now();
        self.save(&credentials)?;
        shared.set(next);
        drop(credentials);
        let entry = crate::audit::AuditEntry {
            action: crate::audit::AuditAction::CredentialRotation,
            rows_affected: 1,
            duration: started.elapsed(),
            source_component: "rotation",
            metadata: serde_json::json!({"role": "superuser"}),
        };
        crate::audit::record_alone(&self.pool, self.identity.node_id().as_str(), &entry).await?;
        info!("rotation: the superuser has a new password");
        Ok("the superuser has a new password; its open sessions stay logged in".into())
    }

    /// Steps 2-4 for a pending version.
    async fn activate(
        &self,
        credentials: &mut Credentials,
        version: u32,
    ) -> Result<(), RotationError> {
        let started = std::time::Instant::now();
        let password = credentials
            .get(version)
            .and_then(|c| c.password.clone())
            .ok_or(RotationError::NoActive)?;
        let name = self.role_name(version);
        let mut client = self.admin().await?;
        RoleAdmin::new(&mut client)
            .ensure_login_role(
                &name,
                &ScramVerifier::of(&password),
                self.settings.connection_limit,
            )
            .await?;
        info!(role = name, step = 2, "rotation: new login role created");
        self.step_done(2, version, started).await?;
        rotation::activate(credentials, version, now());
        self.save(credentials)?;
        info!(
            version,
            step = 3,
            "rotation: new credential active, previous one retiring"
        );
        self.step_done(3, version, started).await?;
        let login = login_credential(&self.identity, credentials, &self.tls)?;
        self.pool.switch_credential(login);
        info!(
            version,
            step = 4,
            "rotation: pool switched to the new credential"
        );
        self.step_done(4, version, started).await?;
        Ok(())
    }

    /// Steps 6-8 for a retiring version whose grace period is over.
    async fn retire(&self, version: u32) -> Result<(), RotationError> {
        let started = std::time::Instant::now();
        info!(version, step = 5, "rotation: grace period over");
        self.step_done(5, version, started).await?;
        let name = self.role_name(version);
        let mut client = self.admin().await?;
        let mut admin = RoleAdmin::new(&mut client);
        let left = admin.sessions(&name).await?;
        if left > 0 {
            let ended = admin.terminate_sessions(&name).await?;
            warn!(
                role = name,
                sessions = ended,
                "rotation: ended sessions still using the retired credential"
            );
        }
        info!(
            role = name,
            step = 6,
            "rotation: no session uses the retired credential"
        );
        self.step_done(6, version, started).await?;
        admin.drop_role(&name).await?;
        info!(
            role = name,
            step = 7,
            "rotation: retired login role dropped"
        );
        if let TlsSource::NodePki(pki) = &self.tls {
            // The role is gone, so its certificates admit no one; the CRL
            // says so to Postgres before they expire.
            match pki.revoke(&name) {
                Ok(revoked) => {
                    info!(
                        role = name,
                        revoked, "rotation: the retired role's client certificates revoked"
                    );
                    self.pki_changed.notify_one();
                }
                Err(e) => {
                    warn!(role = name, error = %e, "rotation: cannot revoke the retired role's client certificates")
                }
            }
        }
        self.step_done(7, version, started).await?;
        let mut credentials = self.credentials.lock().await;
        rotation::expire(&mut credentials, version, now());
        self.save(&credentials)?;
        info!(
            version,
            step = 8,
            "rotation: retired credential marked expired"
        );
        drop(credentials);
        self.step_done(8, version, started).await?;
        Ok(())
    }

    /// Step 9: the completed rotation goes into the audit trail.
    async fn audit(&self, version: u32) -> Result<(), RotationError> {
        let started = std::time::Instant::now();
        let mut credentials = self.credentials.lock().await;
        let active = credentials.active().map(|c| c.version).unwrap_or(0);
        let entry = crate::audit::AuditEntry {
            action: crate::audit::AuditAction::CredentialRotationComplete,
            rows_affected: 2,
            duration: started.elapsed(),
            source_component: "rotation",
            metadata: serde_json::json!({"step": 9, "retired": version, "active": active}),
        };
        crate::audit::record_alone(&self.pool, self.identity.node_id().as_str(), &entry).await?;
        info!(
            retired = version,
            active,
            step = 9,
            "credential rotation complete"
        );
        rotation::mark_audited(&mut credentials, version);
        self.save(&credentials)?;
        self.fault_point(9);
        Ok(())
    }

    /// Finishes any rotation under way, then rotates on schedule, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: Shutdown) {
        loop {
            let result = self.step(&mut stop).await;
            match result {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    error!(error = %e, "credential rotation step failed; retrying in 5s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = stop.requested() => return,
                    }
                }
            }
        }
    }

    /// One move of the driver; false when stopped.
    async fn step(&self, stop: &mut Shutdown) -> Result<bool, RotationError> {
        let (phase, due_at, superuser_due) = {
            let credentials = self.credentials.lock().await;
            let due_at = credentials.active().map(|a| {
                a.status_since
                    .saturating_add(self.settings.interval.as_secs())
            });
            let superuser_due = self.superuser.shared.as_ref().map(|_| {
                credentials
                    .superuser_created_at
                    .saturating_add(self.settings.superuser_interval.as_secs())
            });
            (
                rotation::next_phase(&credentials, self.settings.grace),
                due_at,
                superuser_due,
            )
        };
        let wait_until = |at: u64| Duration::from_secs(at.saturating_sub(now()));
        if let Some(at) = superuser_due
            && now() >= at
        {
            info!("scheduled superuser password rotation");
            self.rotate_superuser().await?;
            return Ok(true);
        }
        let superuser_wait = superuser_due.map_or(Duration::MAX, wait_until);
        let sleep = match phase {
            Phase::Activate { version } => {
                let mut credentials = self.credentials.lock().await;
                self.activate(&mut credentials, version).await?;
                return Ok(true);
            }
            Phase::Retire {
                version,
                not_before,
            } if now() >= not_before => {
                self.retire(version).await?;
                return Ok(true);
            }
            Phase::Retire { not_before, .. } => wait_until(not_before),
            Phase::Audit { version } => {
                self.audit(version).await?;
                return Ok(true);
            }
            Phase::Idle => match due_at {
                Some(at) if now() >= at => {
                    info!("scheduled credential rotation");
                    match self.rotate_now().await {
                        Ok(_) | Err(RotationError::Busy(_)) => return Ok(true),
                        Err(e) => return Err(e),
                    }
                }
                Some(at) => wait_until(at),
                None => return Err(RotationError::NoActive),
            },
        };
        let sleep = sleep.min(superuser_wait);
        tokio::select! {
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(200))) => Ok(true),
            _ = self.wake.notified() => Ok(true),
            _ = stop.requested() => Ok(false),
        }
    }
}
