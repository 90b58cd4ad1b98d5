//! The security report again every `security.remeasure_interval`, off the
//! request path: `keepd_security_level` follows the live system (a
//! certificate expiring, archiving failing, a role appearing) instead of
//! keeping the start's verdict, and each change of level is logged once,
//! with the checks that decided it. A running node is not stopped by what
//! it finds (strict mode judges at start); the alert on the gauge is how
//! an operator hears.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{Config, SecurityLevel};
use crate::edge::ApiCertificate;
use crate::identity::NodeIdentity;
use crate::metrics::Metrics;
use crate::pki::NodePki;
use crate::postgres::docker::ContainerFacts;
use crate::postgres::pool::RoleAwarePool;
use crate::postgres::tls::Endpoint;
use crate::report::Report;
use crate::report::measure::{Inputs, measure};
use crate::shutdown::Shutdown;

pub struct Remeasure {
    pub config: Config,
    pub identity: Arc<NodeIdentity>,
    pub superuser: Endpoint,
    pub pool: RoleAwarePool,
    pub container: Option<ContainerFacts>,
    pub pki: Option<Arc<NodePki>>,
    pub api_cert: Option<Arc<ApiCertificate>>,
    pub backups: Option<Arc<crate::backup::PgBackRest>>,
    pub metrics: Arc<Metrics>,
    /// The level measured at start.
    pub level: SecurityLevel,
}

impl Remeasure {
    pub async fn run(mut self, mut stop: Shutdown) {
        let every: Duration = self.config.security.remeasure_interval.get();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.requested() => return,
            }
            let report = self.measure().await;
            let level = report.level();
            let security = &self.config.security;
            self.metrics
                .set_security_level(level as u64 + 1, security.minimum_level as u64 + 1);
            if level == self.level {
                continue;
            }
            // Named as `policy` names them at start.
            let deciding: Vec<String> = report
                .findings()
                .map(|c| format!("{} ({:?}): {}", c.id, c.status, c.value))
                .collect();
            let from = self.level;
            if level < from {
                warn!(from = ?from, to = ?level, findings = ?deciding, "security level fell");
            } else {
                info!(from = ?from, to = ?level, findings = ?deciding, "security level rose");
            }
            self.level = level;
        }
    }

    async fn measure(&self) -> Report {
        let role = self.pool.credential_role();
        Report::new(
            measure(&Inputs {
                backups: self.backups.as_deref().map(Ok),
                config: &self.config,
                identity: &self.identity,
                superuser: &self.superuser,
                login_role: &role,
                container: self.container.as_ref(),
                server_certificate: self.pki.as_ref().map(|p| p.server.cert_pem.as_str()),
                api_certificate: self.api_cert.as_ref().map(|c| c.info()),
            })
            .await,
        )
    }
}
