//! What `keepd run` runs once it serves: the named tasks, their start
//! from each component's own settings, and their stop in order.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::backups::BackupSchedule;
use super::db_metrics::DatabaseMetrics;
use super::janitor::Janitor;
use super::keys::KeyGauges;
use super::reencrypt::Reencryption;
use super::remeasure::Remeasure;
use super::renewal::CertificateRenewal;
use super::root::RootWatch;
use super::rotator::Rotator;
use super::signals::{Request, Signals};
use super::{
    BroughtUp, DaemonError, Node, Provisioned, bring_up, control, notify, reload, renewal,
};

use super::token_admission::TokenAdmission;
use crate::api::{self, Api, ApiSettings, WebPolicy};
use crate::audit::AuditSealer;
use crate::audit::retention::Retention;
use crate::backup::PgBackRest;
use crate::cluster::heartbeat::Beat;
use crate::config::Config;
use crate::edge::{self, ApiCertificate, EdgeSettings, TrustedProxies};
use crate::field_crypto::FieldCipher;
use crate::field_keys::RotationPolicy;
use crate::metrics::Metrics;
use crate::postgres::supervise::Supervisor;
use crate::postgres::tls::Endpoint;
use crate::shutdown;

/// What the tasks are made of: the components bringing up built, and the
/// listeners they serve.
pub(super) struct Wiring {
    pub api: Arc<Api>,
    pub trusted: TrustedProxies,
    pub api_cert: Option<Arc<ApiCertificate>>,
    pub listener: tokio::net::TcpListener,
    pub metrics_listener: Option<tokio::net::TcpListener>,
    pub control: tokio::net::UnixListener,
    pub rotator: Arc<Rotator>,
    pub sealer: AuditSealer,
    pub fields: Arc<FieldCipher>,
    /// What the report is measured again from (`remeasure`).
    pub container: Option<crate::postgres::docker::ContainerFacts>,
    pub pki: Option<Arc<crate::pki::NodePki>>,
    pub level: crate::config::SecurityLevel,
    /// The cluster key as this node holds it at start, and its pin.
    pub cluster: crate::cluster::ClusterKey,
    pub pin: std::path::PathBuf,
    /// For the background tasks' audit entries.
    pub pool: crate::postgres::pool::RoleAwarePool,
    pub backups: Option<Arc<PgBackRest>>,
    pub renewal: Option<CertificateRenewal>,
    pub renew: Arc<Notify>,
    /// The log directory of a server keepd runs on this host.
    pub postgres_logs: Option<std::path::PathBuf>,
    pub superuser: Endpoint,
    pub metrics: Arc<Metrics>,
    pub node_id: String,
    pub identity: Arc<crate::identity::NodeIdentity>,
    pub credentials: crate::secrets::store::CredentialStore,
}

/// `/metrics` on its own listener (`api.metrics_listen`).
pub(super) fn serve_metrics(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    mut stop: shutdown::Shutdown,
) -> Result<JoinHandle<std::io::Result<()>>, DaemonError> {
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    info!(%addr, "metrics listening");
    let router = api::metrics_router(api);
    Ok(tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.requested().await })
            .await
    }))
}

/// The daemon's running tasks, each named, stopped together.
pub(super) struct Tasks {
    watchdog: Option<JoinHandle<()>>,
    api: JoinHandle<std::io::Result<()>>,
    /// The API's state, to send its pending live events at the end.
    api_state: Arc<Api>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    rotation: JoinHandle<()>,
    control: JoinHandle<()>,
    sealer: JoinHandle<()>,
    reencrypt: JoinHandle<()>,
    janitor: JoinHandle<()>,
    /// Exports and prunes entries past `audit.retention`.
    audit_retention: Option<JoinHandle<()>>,
    /// Admits nodes waiting with a valid join token.
    token_admission: JoinHandle<()>,
    /// LISTENs for new entries and feeds the live-update streams.
    events: JoinHandle<()>,
    /// Marks this node live and counts the live nodes for rate budgets.
    heartbeat: JoinHandle<()>,
    /// Aborted at shutdown: a backup under way is not waited for (its
    /// pgBackRest is killed, and the next start takes it again).
    backups: Option<JoinHandle<()>>,
    renewal: Option<JoinHandle<()>>,
    cert_watch: Option<JoinHandle<()>>,
    /// The `keepd_key_*` gauges.
    keys: JoinHandle<()>,
    /// Adopts a rotated cluster key.
    root: JoinHandle<()>,
    /// The security report again, every `security.remeasure_interval`.
    remeasure: JoinHandle<()>,
    /// Postgres's own figures for /metrics.
    database: JoinHandle<()>,
}

/// What serving keeps once the tasks run: the node, the superuser (for
/// the last WAL segment), the supervisor (stopped last), the reloader.
pub(super) struct Serving {
    pub node: Node,
    pub superuser: Endpoint,
    pub supervisor: Supervisor,
    pub reloader: reload::Reloader,
    pub renew: Arc<Notify>,
}

impl BroughtUp {
    /// The API made from bringing up's parts, and everything the tasks are
    /// made of; the API and the edge share one reading of the trusted
    /// proxies.
    pub(super) fn wire(self) -> Result<(Serving, Wiring), DaemonError> {
        let BroughtUp { provisioned, parts } = self;
        let Provisioned {
            node,
            server,
            pki,
            maintenance,
            superuser,
            metrics,
            supervisor,
            ..
        } = provisioned;
        let config = &node.config;
        let addr = parts.listener.local_addr().map_err(DaemonError::Serve)?;
        let fields = bring_up::field_cipher(&parts.cluster, parts.field_version, config);
        // One reading of api.trusted_proxies for the API and the edge.
        let trusted = TrustedProxies::new(&config.api.trusted_proxies);
        let settings = ApiSettings::new(&config.api, trusted.clone());
        let api = Arc::new(Api::new(
            &node.identity,
            parts.pool.clone(),
            supervisor.state(),
            &parts.cluster,
            metrics.clone(),
            settings,
            fields.clone(),
        )?);
        let reloader = reload::Reloader {
            api: api.clone(),
            running: config.clone(),
        };
        let renewal = renewal::CertificateRenewal::of(
            &server,
            pki.as_ref(),
            &config.node.state_dir,
            &node.node_id,
            &maintenance,
        );
        let renew = parts.renew.clone();
        let scheme = if node.api_cert.is_some() {
            "https"
        } else {
            "http"
        };
        info!(%addr, node_id = node.node_id, scheme, fd_limit = node.fd_limit, "api listening");
        let wiring = Wiring {
            api,
            trusted,
            api_cert: node.api_cert.clone(),
            listener: parts.listener,
            metrics_listener: parts.metrics_listener,
            control: parts.control,
            rotator: parts.rotator,
            sealer: parts.sealer,
            fields,
            backups: parts.backups,
            renewal,
            renew: renew.clone(),
            postgres_logs: server.own_log_dir(),
            superuser: superuser.clone(),
            metrics,
            node_id: node.node_id.clone(),
            pool: parts.pool,
            cluster: parts.cluster,
            container: parts.container,
            pki,
            level: parts.level,
            pin: node.layout.cluster_pin(),
            identity: node.identity.clone(),
            credentials: crate::secrets::store::CredentialStore::new(
                node.layout.credentials().to_owned(),
            ),
        };
        let serving = Serving {
            node,
            superuser,
            supervisor,
            reloader,
            renew,
        };
        Ok((serving, wiring))
    }
}

impl Tasks {
    /// Starts every task, each component built from its own section of
    /// `config`; the API and the edge share one reading of the trusted
    /// proxies.
    pub(super) fn start(
        config: &Config,
        w: Wiring,
        shutdown: &shutdown::Shutdown,
    ) -> Result<Tasks, DaemonError> {
        let stop = || shutdown.clone();
        let web = WebPolicy {
            cors_origins: config.api.cors_origins.clone(),
            hsts: w.api_cert.is_some(),
        };
        let (events, operator, limited) = (w.api.events.clone(), w.api.clone(), w.api.clone());
        let rooted = w.api.clone();
        let metrics_api = w.metrics_listener.map(|listener| (listener, w.api.clone()));
        let edge = EdgeSettings::new(&config.api, w.trusted, w.api_cert.clone())
            .with_streams(api::STREAM_PATHS);
        let api_state = w.api.clone();
        let app = api::router(w.api, &web);
        let superuser = &w.superuser;
        let node_id = w.node_id.clone();
        let generation = Arc::new(AtomicU32::new(w.cluster.generation()));
        let (beats, beat_rx) = tokio::sync::watch::channel(Beat::default());
        let remeasure = Remeasure {
            config: config.clone(),
            identity: w.identity.clone(),
            superuser: w.superuser.clone(),
            pool: w.pool.clone(),
            container: w.container,
            pki: w.pki,
            api_cert: w.api_cert.clone(),
            backups: w.backups.clone(),
            metrics: w.metrics.clone(),
            level: w.level,
        };
        Ok(Tasks {
            api_state,
            watchdog: notify::Notifier::spawn_watchdog(stop()),
            api: tokio::spawn(edge::serve(
                w.listener,
                app,
                edge,
                w.metrics.clone(),
                stop(),
            )),
            metrics: match metrics_api {
                Some((listener, api)) => Some(serve_metrics(listener, api, stop())?),
                None => None,
            },
            rotation: tokio::spawn(w.rotator.clone().run(stop())),
            control: tokio::spawn(control::serve(w.control, w.rotator, operator, stop())),
            sealer: tokio::spawn(w.sealer.run(stop())),
            events: tokio::spawn(api::events::listen(superuser.clone(), events, stop())),
            heartbeat: tokio::spawn(crate::cluster::heartbeat::run(
                superuser.clone(),
                w.node_id,
                generation.clone(),
                move |beat| {
                    limited.set_cluster_nodes(beat.nodes);
                    let _ = beats.send(beat);
                },
                stop(),
            )),
            root: tokio::spawn(
                RootWatch {
                    api: rooted,
                    identity: w.identity.clone(),
                    superuser: superuser.clone(),
                    pin: w.pin,
                    held: w.cluster,
                    generation,
                }
                .run(beat_rx, stop()),
            ),
            reencrypt: tokio::spawn(
                Reencryption {
                    fields: w.fields,
                    policy: RotationPolicy::of(config),
                    superuser: superuser.clone(),
                    pool: w.pool.clone(),
                    node_id: node_id.clone(),
                }
                .run(stop()),
            ),
            backups: w.backups.map(|pgbackrest| {
                let schedule =
                    BackupSchedule::new(config, pgbackrest, superuser.clone(), w.metrics.clone());
                tokio::spawn(schedule.run(stop()))
            }),
            janitor: tokio::spawn(
                Janitor::new(config, superuser.clone(), w.postgres_logs).run(stop()),
            ),
            audit_retention: Retention::new(config, w.identity.clone(), superuser.clone())
                .map(|retention| tokio::spawn(retention.run(stop()))),
            token_admission: tokio::spawn(
                TokenAdmission {
                    superuser: superuser.clone(),
                    identity: w.identity.clone(),
                    pool: w.pool.clone(),
                    node_id: node_id.clone(),
                }
                .run(stop()),
            ),
            renewal: w
                .renewal
                .map(|renewal| tokio::spawn(renewal.run(w.renew.clone(), stop()))),
            cert_watch: w
                .api_cert
                .map(|cert| tokio::spawn(cert.watch(std::time::Duration::from_secs(5), stop()))),
            remeasure: tokio::spawn(remeasure.run(stop())),
            database: tokio::spawn(
                DatabaseMetrics {
                    superuser: superuser.clone(),
                    metrics: w.metrics.clone(),
                }
                .run(stop()),
            ),
            keys: tokio::spawn(
                KeyGauges {
                    config: config.clone(),
                    identity: w.identity,
                    credentials: w.credentials,
                    superuser: superuser.clone(),
                    metrics: w.metrics.clone(),
                }
                .run(stop()),
            ),
        })
    }

    /// Asks every task to stop and waits for each: the watchdog and the
    /// API first (no new work), then the background tasks.
    pub(super) async fn shutdown(self, stop: shutdown::ShutdownTrigger) {
        stop.trigger();
        if let Some(task) = self.watchdog {
            let _ = task.await;
        }
        match self.api.await {
            Ok(Err(e)) => error!(error = %e, "api server failed"),
            Err(e) => error!(error = %e, "api server task failed"),
            Ok(Ok(())) => {}
        }
        // No push is answered any more: what committed is announced.
        self.api_state.close_announcer().await;
        let _ = tokio::join!(
            self.rotation,
            self.control,
            self.sealer,
            self.reencrypt,
            self.janitor,
            self.token_admission,
            self.events,
            self.heartbeat,
            self.keys,
            self.root,
            self.remeasure,
            self.database
        );
        if let Some(task) = self.backups {
            task.abort();
            let _ = task.await;
        }
        for task in [self.renewal, self.cert_watch, self.audit_retention]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        if let Some(task) = self.metrics {
            let _ = task.await;
        }
    }
}

/// Returns on SIGTERM or SIGINT. SIGHUP reloads (see `reload`) and checks
/// the TLS certificate.
pub(super) async fn wait_for_shutdown(
    signals: &mut Signals,
    config_path: &Path,
    renew: &Notify,
    reloader: &mut reload::Reloader,
    api_cert: Option<&ApiCertificate>,
) {
    loop {
        match signals.next().await {
            Request::Stop(signal) => {
                info!(signal, "stop requested");
                return;
            }
            Request::Reload => {
                info!(signal = "SIGHUP", path = %config_path.display(), "reloading the configuration");
                reloader.reload(config_path);
                renew.notify_one();
                if let Some(cert) = api_cert {
                    cert.reload_logged("SIGHUP");
                }
            }
        }
    }
}
