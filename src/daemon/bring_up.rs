//! The steps of stage 3 (`Provisioned::bring_up`), each a component made
//! from its own settings: Postgres ready, the container inspected, the
//! schema current, the pool and its rotator, the security report applied.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::rotator::{self, PgAccess, RotationSettings, Rotator};
use super::{DaemonError, Provisioned, policy};
use crate::backup::PgBackRest;
use crate::cluster::ClusterKey;
use crate::config::{Config, Topology};
use crate::field_crypto::FieldCipher;
use crate::postgres::bootstrap;
use crate::postgres::docker::ContainerFacts;
use crate::postgres::migrate;
use crate::postgres::pool::{PoolSettings, RoleAwarePool};
use crate::report::Report;
use crate::report::measure::{Inputs, measure};

impl Provisioned {
    /// Waits until Postgres accepts connections, or names where its log is.
    pub(super) async fn wait_ready(&self) -> Result<(), DaemonError> {
        let start_timeout = self.server.start_timeout();
        if self.supervisor.wait_ready(start_timeout).await {
            return Ok(());
        }
        Err(DaemonError::StartTimeout {
            seconds: start_timeout.as_secs(),
            logs: self.server.where_to_look(),
            key: Topology::of(&self.node.config).start_timeout_key(),
        })
    }

    /// The container as the engine reports it (the security report's
    /// inputs), logged once.
    pub(super) async fn container_facts(&self) -> Result<Option<ContainerFacts>, DaemonError> {
        let facts = self.server.container_facts().await?;
        if let Some(facts) = &facts {
            info!(
                container = facts.name,
                user = %facts.user,
                network_mode = %facts.network_mode,
                cap_drop = ?facts.cap_drop,
                cap_add = ?facts.cap_add,
                readonly_rootfs = facts.readonly_rootfs,
                privileged = facts.privileged,
                published_ports = facts.published_ports,
                security_opt = ?facts.security_opt,
                "docker: container as inspected"
            );
        }
        Ok(facts)
    }

    /// `database.postgres.version`, where set, is the server's major version
    /// whatever the provider (natively it also chose the binaries): an
    /// image or an external server of another major is refused by name.
    async fn check_server_version(&self, client: &Client) -> Result<(), DaemonError> {
        let Some(wanted) = self.node.config.database.postgres.version else {
            return Ok(());
        };
        let number: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(DaemonError::Connect)?
            .get(0);
        let running = number.parse::<u32>().unwrap_or(0) / 10_000;
        if running == wanted {
            return Ok(());
        }
        Err(DaemonError::ServerVersion {
            wanted,
            running,
            hint: self.server.version_hint(),
        })
    }

    /// Roles and database bootstrapped, every migration applied; the
    /// superuser's connection, for the cluster's join.
    pub(super) async fn bootstrap_and_migrate(&self) -> Result<Client, DaemonError> {
        bootstrap::apply(
            &self.maintenance,
            &self.superuser,
            &self.rendered,
            self.server.superuser_is_keepds(),
        )
        .await?;
        let mut client = self
            .superuser
            .connect()
            .await
            .map_err(DaemonError::Connect)?;
        self.check_server_version(&client).await?;
        let applied = migrate::apply(&mut client, migrate::MIGRATIONS).await?;
        info!(applied = ?applied, "schema up to date");
        Ok(client)
    }

    /// The pool, logged in as the active login role, and the rotator that
    /// keeps its roles (`credentials.*`, `database.pool.*`).
    pub(super) fn pool_and_rotator(
        &self,
        renew: &Arc<Notify>,
    ) -> Result<(RoleAwarePool, Arc<Rotator>), DaemonError> {
        let node = &self.node;
        let config = &node.config;
        let login = rotator::login_credential(&node.identity, &node.credentials, &self.tls)?;
        let mut base = self.superuser.config.clone();
        base.application_name("keepd-pool");
        let pool = RoleAwarePool::new(base, login, PoolSettings::of(config));
        let rotator = Arc::new(Rotator::new(
            node.identity.clone(),
            node.store.clone(),
            RotationSettings::of(config),
            node.credentials.clone(),
            PgAccess {
                superuser: self.superuser.clone(),
                tls: self.tls.clone(),
                pki_changed: renew.clone(),
            },
            pool.clone(),
            self.metrics.clone(),
        ));
        Ok((pool, rotator))
    }

    /// Measures the security report from the live system, applies
    /// `security.fallback_mode` and publishes the level, which it returns.
    pub(super) async fn measure_and_apply(
        &self,
        pool: &RoleAwarePool,
        backups: Option<&PgBackRest>,
        container: Option<&ContainerFacts>,
    ) -> Result<crate::config::SecurityLevel, DaemonError> {
        let node = &self.node;
        let config = &node.config;
        let active_role = pool.credential_role();
        let report = Report::new(
            measure(&Inputs {
                backups: backups.map(Ok),
                config,
                identity: &node.identity,
                superuser: &self.superuser,
                login_role: &active_role,
                container,
                server_certificate: self.pki.as_ref().map(|p| p.server.cert_pem.as_str()),
                api_certificate: node.api_cert.as_ref().map(|c| c.info()),
            })
            .await,
        );
        policy::apply(config, &report)?;
        self.metrics.set_security_level(
            report.level() as u64 + 1,
            config.security.minimum_level as u64 + 1,
        );
        self.metrics.set_backup_enabled(config.backup.enabled());
        Ok(report.level())
    }
}

/// Field encryption from the cluster key and `encryption_at_rest`,
/// sealing under the cluster's `version`; names configured columns
/// keepd's schema does not have.
pub(super) fn field_cipher(
    cluster: &ClusterKey,
    version: u32,
    config: &Config,
) -> Arc<FieldCipher> {
    let fields = Arc::new(FieldCipher::new(cluster, config));
    fields.seal_under(version);
    let unsupported = fields.plan().unsupported();
    if !unsupported.is_empty() {
        warn!(
            columns = ?unsupported,
            supported = crate::field_crypto::supported_list(),
            "encryption_at_rest.application.encrypted_fields names columns keepd's schema does not have; they are ignored"
        );
    }
    fields
}
